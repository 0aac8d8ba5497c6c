//! The event log over PostgreSQL (sqlx): optimistic-concurrency appends, stream reads,
//! a gap-safe `read_all` for followers, checkpoints and wake-ups.
//!
//! The store knows nothing of the domain: events are `(type, schema_version, payload)`.

mod error;
mod store;
mod types;

pub use error::StoreError;
pub use store::{connect, EventStore, MIGRATOR};
pub use types::{
    AppendResult, ExpectedVersion, LogPosition, Metadata, NewEvent, RecordedEvent, StreamAppend,
};
