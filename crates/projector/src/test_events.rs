//! Envelopes for the projections' unit tests.
use chrono::{DateTime, TimeZone, Utc};
use domain::{DomainEvent, EventEnvelope};
use uuid::Uuid;

/// Second `second` of a fixed minute.
pub fn at(second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, second)
        .single()
        .unwrap_or_default()
}

/// `event` at `version` of `stream` and at `position` in the log, recorded at second
/// `version`.
pub fn envelope(stream: &str, version: i64, position: i64, event: DomainEvent) -> EventEnvelope {
    EventEnvelope {
        event_id: Uuid::from_u128(u128::try_from(version).unwrap_or(0)),
        stream_name: stream.to_owned(),
        stream_version: version,
        global_position: position,
        recorded_at: at(u32::try_from(version).unwrap_or(0)),
        correlation_id: Uuid::nil(),
        causation_id: Uuid::nil(),
        event,
    }
}
