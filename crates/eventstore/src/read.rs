//! Turning stored rows into `RecordedEvent`s.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Metadata, RecordedEvent, StoreError};

/// The column list every event query selects, in `EventRow`'s field names.
pub(crate) const EVENT_COLUMNS: &str = "global_position, transaction_id, stream_name, \
    stream_version, event_id, event_type, schema_version, payload, metadata, recorded_at";

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    global_position: i64,
    transaction_id: i64,
    stream_name: String,
    stream_version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    recorded_at: DateTime<Utc>,
}

impl TryFrom<EventRow> for RecordedEvent {
    type Error = StoreError;

    /// Metadata is decoded here rather than by sqlx so that a bad row is reported with
    /// its position instead of as an anonymous decode error.
    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        let metadata: Metadata =
            serde_json::from_value(row.metadata).map_err(|error| StoreError::Malformed {
                global_position: row.global_position,
                reason: format!("metadata: {error}"),
            })?;
        Ok(RecordedEvent {
            global_position: row.global_position,
            transaction_id: row.transaction_id,
            stream_name: row.stream_name,
            stream_version: row.stream_version,
            event_id: row.event_id,
            event_type: row.event_type,
            schema_version: row.schema_version,
            payload: row.payload,
            metadata,
            recorded_at: row.recorded_at,
        })
    }
}

pub(crate) fn into_events(rows: Vec<EventRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.into_iter().map(RecordedEvent::try_from).collect()
}

/// [`EVENT_COLUMNS`] with the JSON columns as text, in `TextEventRow`'s field names.
pub(crate) const EVENT_COLUMNS_TEXT: &str = "global_position, transaction_id, stream_name, \
    stream_version, event_id, event_type, schema_version, payload::text AS payload, \
    metadata::text AS metadata, recorded_at";

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TextEventRow {
    global_position: i64,
    transaction_id: i64,
    stream_name: String,
    stream_version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    payload: String,
    metadata: String,
    recorded_at: DateTime<Utc>,
}

impl TryFrom<TextEventRow> for RecordedEvent<String> {
    type Error = StoreError;

    /// Metadata is parsed from its text straight into `Metadata` (no intermediate
    /// `serde_json::Value`), a bad row reported with its position.
    fn try_from(row: TextEventRow) -> Result<Self, StoreError> {
        let metadata: Metadata =
            serde_json::from_str(&row.metadata).map_err(|error| StoreError::Malformed {
                global_position: row.global_position,
                reason: format!("metadata: {error}"),
            })?;
        Ok(RecordedEvent {
            global_position: row.global_position,
            transaction_id: row.transaction_id,
            stream_name: row.stream_name,
            stream_version: row.stream_version,
            event_id: row.event_id,
            event_type: row.event_type,
            schema_version: row.schema_version,
            payload: row.payload,
            metadata,
            recorded_at: row.recorded_at,
        })
    }
}
