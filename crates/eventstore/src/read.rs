//! Turning stored rows into `RecordedEvent`s.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Metadata, RecordedEvent, StoreError};

/// The column list every event query selects, in `EventRow`'s field names.
pub(crate) const EVENT_COLUMNS: &str = "global_position, transaction_id, stream_name, \
    stream_version, event_id, event_type, schema_version, payload, metadata, recorded_at";

/// [`EVENT_COLUMNS`] with the JSON columns as text, in `TextEventRow`'s field names.
pub(crate) const EVENT_COLUMNS_TEXT: &str = "global_position, transaction_id, stream_name, \
    stream_version, event_id, event_type, schema_version, payload::text AS payload, \
    metadata->>'correlation_id' AS correlation_id, metadata->>'causation_id' AS causation_id, \
    recorded_at";

/// The columns both row shapes read the same way.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RowHead {
    global_position: i64,
    transaction_id: i64,
    stream_name: String,
    stream_version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    recorded_at: DateTime<Utc>,
}

impl RowHead {
    /// Metadata is decoded by the caller rather than by sqlx so that a bad row is
    /// reported here with its position instead of as an anonymous decode error.
    fn into_event<P>(
        self,
        payload: P,
        metadata: Result<Metadata, serde_json::Error>,
    ) -> Result<RecordedEvent<P>, StoreError> {
        let metadata = metadata.map_err(|error| StoreError::Malformed {
            global_position: self.global_position,
            reason: format!("metadata: {error}"),
        })?;
        Ok(RecordedEvent {
            global_position: self.global_position,
            transaction_id: self.transaction_id,
            stream_name: self.stream_name,
            stream_version: self.stream_version,
            event_id: self.event_id,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload,
            metadata,
            recorded_at: self.recorded_at,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    #[sqlx(flatten)]
    head: RowHead,
    payload: serde_json::Value,
    metadata: serde_json::Value,
}

impl TryFrom<EventRow> for RecordedEvent {
    type Error = StoreError;

    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        let metadata = serde_json::from_value(row.metadata);
        row.head.into_event(row.payload, metadata)
    }
}

pub(crate) fn into_events(rows: Vec<EventRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.into_iter().map(RecordedEvent::try_from).collect()
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TextEventRow {
    #[sqlx(flatten)]
    head: RowHead,
    payload: String,
    /// The two fields of the metadata, extracted by the server: writing the whole
    /// metadata out as JSON text and parsing it again cost a replay about a third of
    /// its reading (the metadata is about 40% of an event's JSON).
    correlation_id: Option<String>,
    causation_id: Option<String>,
}

/// The metadata of a text row from its two ids, as the server extracted them.
fn text_metadata(
    correlation_id: Option<&str>,
    causation_id: Option<&str>,
) -> Result<Metadata, serde_json::Error> {
    Ok(Metadata {
        correlation_id: metadata_field(correlation_id, "correlation_id")?,
        causation_id: metadata_field(causation_id, "causation_id")?,
    })
}

impl TryFrom<TextEventRow> for RecordedEvent<String> {
    type Error = StoreError;

    fn try_from(row: TextEventRow) -> Result<Self, StoreError> {
        let metadata = text_metadata(row.correlation_id.as_deref(), row.causation_id.as_deref());
        row.head.into_event(row.payload, metadata)
    }
}

/// A metadata id read as text; missing or not a UUID is the error `Metadata`'s own
/// deserialisation would give.
fn metadata_field(text: Option<&str>, field: &'static str) -> Result<Uuid, serde_json::Error> {
    use serde::de::Error;
    let text = text.ok_or_else(|| serde_json::Error::missing_field(field))?;
    Uuid::parse_str(text).map_err(|e| serde_json::Error::custom(format!("{field}: {e}")))
}
