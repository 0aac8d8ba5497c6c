//! The event log over PostgreSQL (sqlx): optimistic-concurrency appends, stream reads,
//! a gap-safe `read_all` for followers, checkpoints and wake-ups.
//!
//! The store knows nothing of the domain: events are `(type, schema_version, payload)`.

mod append;
mod database;
mod error;
mod group_commit;
mod read;
mod store;
mod transaction;
mod types;
mod wakeup;

pub use database::drop_database;
pub use error::StoreError;
pub use store::{connect, connect_with, EventStore, StreamPages, MIGRATOR};
pub use transaction::begin;
pub use types::{
    AppendResult, ExpectedVersion, LogPosition, Metadata, NewEvent, RecordedEvent, StreamAppend,
};
pub use wakeup::{Wake, Wakeups, CHANNEL as NOTIFY_CHANNEL};
