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
pub fn event_routing_key<P>(rec: &RecordedEvent<P>) -> String {
    format!(
        "{}.{}",
        domain::streams::category(&rec.stream_name),
        rec.event_type
    )
}

/// A committed event as the relay publishes it: the payload as body (the JSON text
/// PostgreSQL gives, sent as it is), the rest as properties and headers.
pub fn event_message(rec: RecordedEvent<String>) -> OutgoingMessage {
    let routing_key = event_routing_key(&rec);
    keyed_event_message(rec, routing_key)
}

/// [`event_message`] with the routing key already made ([`event_routing_key`]).
pub fn keyed_event_message(rec: RecordedEvent<String>, routing_key: String) -> OutgoingMessage {
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
        routing_key,
        body: rec.payload.into_bytes(),
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
    // Straight from the text into the event: no `serde_json::Value` per delivery.
    let payload = std::str::from_utf8(&msg.body)
        .map_err(|e| format!("event body is not JSON (not UTF-8: {e})"))?;
    let event = DomainEvent::decode_text(&event_type, schema_version, payload)
        .map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use domain::events::PaymentRequested;
    use eventstore::Metadata;

    use super::*;

    /// What a consumer receives for a message the relay published.
    fn received(msg: OutgoingMessage) -> Incoming {
        Incoming {
            exchange: msg.exchange,
            routing_key: msg.routing_key,
            body: msg.body,
            message_id: Some(msg.properties.message_id),
            correlation_id: msg.properties.correlation_id,
            message_type: msg.properties.message_type,
            content_type: None,
            timestamp: None,
            headers: msg.properties.headers,
            redelivered: false,
        }
    }

    fn recorded(payload: String) -> RecordedEvent<String> {
        RecordedEvent {
            global_position: 42,
            transaction_id: 7,
            stream_name: "payment-1".to_owned(),
            stream_version: 3,
            event_id: Uuid::from_u128(1),
            event_type: "PaymentRequested".to_owned(),
            schema_version: 1,
            payload,
            metadata: Metadata {
                correlation_id: Uuid::from_u128(2),
                causation_id: Uuid::from_u128(3),
            },
            recorded_at: Utc
                .with_ymd_and_hms(2026, 12, 4, 11, 0, 0)
                .single()
                .unwrap_or_default(),
        }
    }

    /// An event of an order (order 9).
    fn payment_requested() -> DomainEvent {
        DomainEvent::PaymentRequested(PaymentRequested {
            order_id: Uuid::from_u128(9),
            amount_cents: 1_250,
            currency: "EUR".to_owned(),
            payment_token: "tok_visa".to_owned(),
            expires_at: Utc
                .with_ymd_and_hms(2026, 12, 4, 11, 5, 0)
                .single()
                .unwrap_or_default(),
        })
    }

    #[test]
    fn an_event_relayed_as_postgresql_writes_it_decodes_as_it_was_recorded() -> Result<(), String> {
        let event = payment_requested();
        // jsonb's text: a space after every colon and comma, keys ordered its own way.
        let compact = serde_json::to_string(&event.to_payload()).map_err(|e| e.to_string())?;
        let spaced = compact.replace("\":", "\": ").replace(",\"", ", \"");
        let msg = event_message(recorded(spaced.clone()));
        assert_eq!(msg.routing_key, "payment.PaymentRequested");
        assert_eq!(msg.body, spaced.as_bytes(), "the body is sent as read");

        let env = decode_event(&received(msg))?;
        assert_eq!(env.event, event);
        assert_eq!(
            (env.event_id, env.correlation_id, env.causation_id),
            (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3))
        );
        assert_eq!(
            (env.stream_name.as_str(), env.stream_version),
            ("payment-1", 3)
        );
        assert_eq!(env.global_position, 42);
        Ok(())
    }

    #[test]
    fn the_order_an_event_is_about_is_the_one_its_full_decode_names() -> Result<(), String> {
        let placed = payment_requested();
        let stock = DomainEvent::StockSet(domain::events::StockSet {
            sku: "A".to_owned(),
            quantity: 1,
        });
        for event in [placed, stock] {
            let mut rec = recorded(event.to_payload().to_string());
            rec.event_type = event.event_type().to_owned();
            let msg = received(event_message(rec));
            assert_eq!(
                crate::worker::event_order(&msg),
                decode_event(&msg)?.event.order_id()
            );
        }
        let mut not_json = received(event_message(recorded(String::new())));
        not_json.body = b"oops".to_vec();
        assert_eq!(crate::worker::event_order(&not_json), None);
        Ok(())
    }

    #[test]
    fn an_event_body_that_is_not_json_is_refused_with_a_reason() {
        for body in [b"{\"order_id\": oops".to_vec(), vec![0xff, 0xfe]] {
            let mut msg = received(event_message(recorded(String::new())));
            msg.body = body;
            let outcome = decode_event(&msg);
            assert!(
                outcome.as_ref().is_err_and(|reason| !reason.is_empty()),
                "{outcome:?}"
            );
        }
    }
}
