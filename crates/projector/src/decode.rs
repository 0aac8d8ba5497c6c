use domain::{DecodeError, DomainEvent, EventEnvelope};
use eventstore::{LogPosition, RecordedEvent};
use tracing::warn;

/// Turns a stored event into a domain event with its identity, upcasting old versions.
pub fn to_envelope(rec: &RecordedEvent) -> Result<EventEnvelope, DecodeError> {
    let event = DomainEvent::decode(&rec.event_type, rec.schema_version, &rec.payload)?;
    Ok(envelope(rec, rec.stream_name.clone(), event))
}

/// A stored event read as text ([`EventStore::read_all_text`]) into a domain event
/// with its identity: the payload is deserialised from its JSON text directly (upcast
/// first if older), and the stream name moves instead of being copied.
///
/// [`EventStore::read_all_text`]: eventstore::EventStore::read_all_text
pub fn text_into_envelope(mut rec: RecordedEvent<String>) -> Result<EventEnvelope, DecodeError> {
    let event = DomainEvent::decode_text(&rec.event_type, rec.schema_version, &rec.payload)?;
    let stream_name = std::mem::take(&mut rec.stream_name);
    Ok(envelope(&rec, stream_name, event))
}

fn envelope<P>(rec: &RecordedEvent<P>, stream_name: String, event: DomainEvent) -> EventEnvelope {
    EventEnvelope {
        event_id: rec.event_id,
        stream_name,
        stream_version: rec.stream_version,
        global_position: rec.global_position,
        recorded_at: rec.recorded_at,
        correlation_id: rec.metadata.correlation_id,
        causation_id: rec.metadata.causation_id,
        event,
    }
}

/// Decodes a page; an event this version cannot decode (say, written by a newer one)
/// is skipped with a warning rather than stopping every read model.
pub(crate) fn decode_page(records: Vec<RecordedEvent<String>>) -> Vec<EventEnvelope> {
    decode_page_at(records)
        .into_iter()
        .map(|(_, env)| env)
        .collect()
}

/// [`decode_page`], each event with its place in the log.
pub(crate) fn decode_page_at(
    records: Vec<RecordedEvent<String>>,
) -> Vec<(LogPosition, EventEnvelope)> {
    records
        .into_iter()
        .filter_map(|rec| {
            let position = rec.log_position();
            match text_into_envelope(rec) {
                Ok(env) => Some((position, env)),
                Err(error) => {
                    warn!(global_position = position.global_position, %error, "skipping an event the projector cannot decode");
                    None
                }
            }
        })
        .collect()
}
