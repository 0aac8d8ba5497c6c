use domain::{DecodeError, DomainEvent, EventEnvelope};
use eventstore::RecordedEvent;

/// Turns a stored event into a domain event with its identity, upcasting old versions.
pub fn to_envelope(rec: &RecordedEvent) -> Result<EventEnvelope, DecodeError> {
    let event = DomainEvent::decode(&rec.event_type, rec.schema_version, &rec.payload)?;
    Ok(EventEnvelope {
        event_id: rec.event_id,
        stream_name: rec.stream_name.clone(),
        stream_version: rec.stream_version,
        global_position: rec.global_position,
        recorded_at: rec.recorded_at,
        correlation_id: rec.metadata.correlation_id,
        causation_id: rec.metadata.causation_id,
        event,
    })
}
