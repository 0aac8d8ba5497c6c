//! How commands and events travel on RabbitMQ: ids, headers, and decoding of events
//! published by the relay.
use bus::{Incoming, OutgoingMessage, OutgoingProperties};
use domain::{DomainEvent, EventEnvelope};
use eventstore::RecordedEvent;
use uuid::Uuid;

/// Namespace for ids derived from message ids that are not UUIDs.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7266_6c6f_776d_7367_6964_0001);

pub const HEADER_CAUSATION_ID: &str = "x-causation-id";
pub const HEADER_STREAM_NAME: &str = "x-stream-name";
pub const HEADER_STREAM_VERSION: &str = "x-stream-version";
pub const HEADER_GLOBAL_POSITION: &str = "x-global-position";
pub const HEADER_SCHEMA_VERSION: &str = "x-schema-version";
pub const HEADER_RECORDED_AT: &str = "x-recorded-at";

/// The message's identity as a UUID. The contract asks senders for a UUID; anything
/// else (or nothing) is mapped deterministically, so duplicates still dedupe.
pub fn message_uuid(msg: &Incoming) -> Uuid {
    match msg.message_id.as_deref() {
        Some(id) => Uuid::parse_str(id)
            .unwrap_or_else(|_| Uuid::new_v5(&MESSAGE_ID_NAMESPACE, id.as_bytes())),
        None => Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &msg.body),
    }
}

/// The conversation the message belongs to (its own id when it starts one).
pub fn correlation_uuid(msg: &Incoming) -> Uuid {
    msg.correlation_id
        .as_deref()
        .and_then(|c| Uuid::parse_str(c).ok())
        .unwrap_or_else(|| message_uuid(msg))
}

/// The routing key an event is published with: `<category>.<EventType>`.
pub fn event_routing_key(rec: &RecordedEvent) -> String {
    format!(
        "{}.{}",
        domain::streams::category(&rec.stream_name),
        rec.event_type
    )
}

/// A committed event as the relay publishes it: the payload as body, the rest as
/// properties and headers.
pub fn event_message(rec: &RecordedEvent) -> OutgoingMessage {
    let properties = OutgoingProperties::new(rec.event_id.to_string())
        .with_correlation_id(rec.metadata.correlation_id.to_string())
        .with_type(rec.event_type.clone())
        .with_header(HEADER_CAUSATION_ID, rec.metadata.causation_id.to_string())
        .with_header(HEADER_STREAM_NAME, rec.stream_name.clone())
        .with_header(HEADER_STREAM_VERSION, rec.stream_version.to_string())
        .with_header(HEADER_GLOBAL_POSITION, rec.global_position.to_string())
        .with_header(HEADER_SCHEMA_VERSION, rec.schema_version.to_string())
        .with_header(HEADER_RECORDED_AT, rec.recorded_at.to_rfc3339());
    OutgoingMessage {
        exchange: bus::EVENTS_EXCHANGE.to_owned(),
        routing_key: event_routing_key(rec),
        body: serde_json::to_vec(&rec.payload).unwrap_or_default(),
        properties,
    }
}

/// Decodes an event published by the relay.
pub fn decode_event(msg: &Incoming) -> Result<EventEnvelope, String> {
    let event_type = msg
        .message_type
        .clone()
        .or_else(|| msg.routing_key.split_once('.').map(|(_, t)| t.to_owned()))
        .ok_or_else(|| "event message without a type".to_owned())?;
    let schema_version = msg
        .headers
        .get(HEADER_SCHEMA_VERSION)
        .map_or(Ok(1), |v| v.parse::<i32>())
        .map_err(|e| format!("bad {HEADER_SCHEMA_VERSION}: {e}"))?;
    let payload: serde_json::Value =
        serde_json::from_slice(&msg.body).map_err(|e| format!("event body is not JSON: {e}"))?;
    let event =
        DomainEvent::decode(&event_type, schema_version, &payload).map_err(|e| e.to_string())?;
    let header_i64 = |name: &str| {
        msg.headers
            .get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    Ok(EventEnvelope {
        event_id: message_uuid(msg),
        stream_name: msg
            .headers
            .get(HEADER_STREAM_NAME)
            .cloned()
            .unwrap_or_default(),
        stream_version: header_i64(HEADER_STREAM_VERSION),
        global_position: header_i64(HEADER_GLOBAL_POSITION),
        recorded_at: msg
            .headers
            .get(HEADER_RECORDED_AT)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or_else(chrono::Utc::now, |t| t.with_timezone(&chrono::Utc)),
        correlation_id: correlation_uuid(msg),
        causation_id: msg
            .headers
            .get(HEADER_CAUSATION_ID)
            .and_then(|c| Uuid::parse_str(c).ok())
            .unwrap_or_else(|| message_uuid(msg)),
        event,
    })
}
