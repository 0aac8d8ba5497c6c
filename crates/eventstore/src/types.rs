use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Correlation and causation of an event, stored in `events.metadata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The id of the first message of the conversation (e.g. the `order.place` command).
    pub correlation_id: Uuid,
    /// The id of the message or event that directly caused this event.
    pub causation_id: Uuid,
}

/// An event to append. `event_id` is chosen by the caller (derived deterministically
/// from the causing message, so that a redelivery produces the same ids).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    pub metadata: Metadata,
}

/// What the writer believes the stream's last version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version (still atomic and gap-free).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have this version (0-based).
    Exact(i64),
}

/// One stream's part of a batch append.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAppend {
    pub stream_name: String,
    pub expected_version: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// The result of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append (for a batch: of the last stream).
    pub next_expected_version: i64,
    /// The highest `global_position` written.
    pub last_global_position: i64,
}

/// A follower's place in the log: the pair (transaction id, global position).
/// Ordered lexicographically; `LogPosition::START` is before every event.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct LogPosition {
    pub transaction_id: i64,
    pub global_position: i64,
}

impl LogPosition {
    pub const START: LogPosition = LogPosition {
        transaction_id: 0,
        global_position: 0,
    };
}

/// An event as stored. The payload is a `serde_json::Value`, or with
/// [`EventStore::read_all_text`](crate::EventStore::read_all_text) its JSON text, for a
/// reader that deserialises it straight into its own types.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent<P = serde_json::Value> {
    pub global_position: i64,
    pub transaction_id: i64,
    pub stream_name: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: P,
    pub metadata: Metadata,
    pub recorded_at: DateTime<Utc>,
}

impl<P> RecordedEvent<P> {
    pub fn log_position(&self) -> LogPosition {
        LogPosition {
            transaction_id: self.transaction_id,
            global_position: self.global_position,
        }
    }
}
