//! What goes out ([`OutgoingProperties`], [`OutgoingMessage`]) and what comes in
//! ([`Incoming`]), and what a handler makes of it ([`Outcome`]).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::BusError;

/// Header names the bus writes on dead letters.
pub mod headers {
    /// Why the message was dead-lettered.
    pub const ERROR: &str = "x-orderflow-error";
    /// The exchange the message was first published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-orderflow-original-exchange";
    /// The routing key the message was first published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-orderflow-original-routing-key";
    /// How many times a handler saw the message before it was dead-lettered.
    pub const ATTEMPTS: &str = "x-orderflow-attempts";
    /// How many delayed-retry rounds the message has been through.
    pub const RETRY_ROUND: &str = "x-orderflow-retry-round";
    /// On a message the router forwarded to a partition queue: that queue. Its
    /// origin headers say where it was first published.
    pub const ROUTED_TO: &str = "x-orderflow-routed-to";
    /// On a dead letter: the queue it was taken from (an event goes back there on
    /// `orderflow dlq retry`).
    pub const DEAD_LETTERED_FROM: &str = "x-orderflow-queue";
    /// Prefix of every header the bus adds (stripped again by `dlq_retry`).
    pub const PREFIX: &str = "x-orderflow-";
}

pub(crate) const CONTENT_TYPE_JSON: &str = "application/json";
pub(crate) const PERSISTENT: u8 = 2;

/// Properties of a published message. Delivery mode is always persistent (2) and the
/// content type `application/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingProperties {
    /// The message's identity (a UUID for commands and events); consumers dedupe on it.
    pub message_id: String,
    pub correlation_id: Option<String>,
    /// The AMQP `type` property (e.g. the event type).
    pub message_type: Option<String>,
    /// Extra headers, sent as AMQP long strings.
    pub headers: BTreeMap<String, String>,
    /// Sent with second precision (AMQP timestamps are seconds); `None` sends none.
    pub timestamp: Option<DateTime<Utc>>,
    /// More routing keys the exchange routes the message by (RabbitMQ's sender-selected
    /// distribution: the `BCC` header, which the broker removes before delivery).
    pub bcc: Vec<String>,
}

impl OutgoingProperties {
    /// Properties with `message_id`, stamped now, nothing else.
    pub fn new(message_id: impl Into<String>) -> Self {
        OutgoingProperties {
            message_id: message_id.into(),
            correlation_id: None,
            message_type: None,
            headers: BTreeMap::new(),
            timestamp: Some(Utc::now()),
            bcc: Vec::new(),
        }
    }

    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    pub fn with_type(mut self, message_type: impl Into<String>) -> Self {
        self.message_type = Some(message_type.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The AMQP properties to publish with: [`Self::as_delivered`] and the `BCC`
    /// routing keys.
    pub(crate) fn to_amqp(&self) -> Result<BasicProperties, BusError> {
        let properties = self.as_delivered()?;
        if self.bcc.is_empty() {
            return Ok(properties);
        }
        let mut table = properties.headers().clone().unwrap_or_default();
        let keys = self
            .bcc
            .iter()
            .map(|key| AMQPValue::LongString(LongString::from(key.as_bytes())))
            .collect::<Vec<_>>();
        table.insert(ShortString::from("BCC"), AMQPValue::FieldArray(keys.into()));
        Ok(properties.with_headers(table))
    }

    /// The AMQP properties as a consumer receives the message: without `BCC`, which
    /// the broker removes before delivery. A message handed over in process carries
    /// these, so that publishing it again (a retry's delay tier, a dead letter, its
    /// queue after the consumer lost its channel) addresses no other queue.
    pub(crate) fn as_delivered(&self) -> Result<BasicProperties, BusError> {
        let mut properties = BasicProperties::default()
            .with_content_type(ShortString::from(CONTENT_TYPE_JSON))
            .with_delivery_mode(PERSISTENT)
            .with_message_id(short("message_id", &self.message_id)?);
        if let Some(correlation_id) = &self.correlation_id {
            properties = properties.with_correlation_id(short("correlation_id", correlation_id)?);
        }
        if let Some(message_type) = &self.message_type {
            properties = properties.with_type(short("type", message_type)?);
        }
        if let Some(timestamp) = self.timestamp {
            properties =
                properties.with_timestamp(u64::try_from(timestamp.timestamp()).unwrap_or(0));
        }
        if !self.headers.is_empty() {
            let mut table = FieldTable::default();
            for (name, value) in &self.headers {
                table.insert(
                    short("header name", name)?,
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
            }
            properties = properties.with_headers(table);
        }
        Ok(properties)
    }
}

/// One message for [`crate::Bus::publish_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: OutgoingProperties,
}

/// A delivered message, as a handler sees it. (`Default` helps handler tests build one.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The AMQP `type` property.
    pub message_type: Option<String>,
    pub content_type: Option<String>,
    pub timestamp: Option<DateTime<Utc>>,
    /// AMQP header values rendered as strings (see [`render_value`]).
    pub headers: BTreeMap<String, String>,
    /// The broker delivered it before (to this or another consumer) without an ack.
    pub redelivered: bool,
}

impl Incoming {
    pub(crate) fn from_delivery(delivery: &Delivery) -> Self {
        Incoming::from_parts(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &delivery.data,
            &delivery.properties,
            delivery.redelivered,
        )
    }

    /// A message as it arrived through `exchange` with `routing_key`.
    pub(crate) fn from_parts(
        exchange: &str,
        routing_key: &str,
        data: &[u8],
        properties: &BasicProperties,
        redelivered: bool,
    ) -> Self {
        let headers = render_headers(properties.headers().as_ref());
        // A message back from a delay queue, or forwarded to a partition by the router,
        // arrives through the default exchange with the queue's name as routing key; the
        // handler sees where it was first sent.
        let (exchange, routing_key) = match (
            headers.contains_key(headers::RETRY_ROUND) || headers.contains_key(headers::ROUTED_TO),
            headers.get(headers::ORIGINAL_EXCHANGE),
            headers.get(headers::ORIGINAL_ROUTING_KEY),
        ) {
            (true, Some(original), Some(key)) if exchange.is_empty() => {
                (original.clone(), key.clone())
            }
            _ => (exchange.to_owned(), routing_key.to_owned()),
        };
        Incoming {
            exchange,
            routing_key,
            body: data.to_vec(),
            message_id: text(properties.message_id()),
            correlation_id: text(properties.correlation_id()),
            message_type: text(properties.kind()),
            content_type: text(properties.content_type()),
            timestamp: properties.timestamp().and_then(timestamp),
            headers,
            redelivered,
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (the handler committed its effects): acknowledge.
    Ack,
    /// It can never succeed (cannot be decoded…): move it to `orderflow.dead-letter`.
    DeadLetter { reason: String },
    /// Move it, body and properties as received, to `queue` (through the default
    /// exchange, with its origin in headers), wait for the confirm, then acknowledge:
    /// what a router does.
    Forward { queue: String },
    /// A transient failure: try again shortly, a bounded number of times, then dead-letter.
    Retry { reason: String },
}

pub(crate) fn short(field: &str, value: &str) -> Result<ShortString, BusError> {
    ShortString::try_new(value).map_err(|_| BusError::FieldTooLong {
        field: field.to_owned(),
        value_len: value.len(),
    })
}

fn text(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(ToString::to_string)
}

fn timestamp(seconds: u64) -> Option<DateTime<Utc>> {
    let seconds = i64::try_from(seconds).ok()?;
    Utc.timestamp_opt(seconds, 0).single()
}

pub(crate) fn render_headers(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    table
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(name, value)| (name.to_string(), render_value(value)))
                .collect()
        })
        .unwrap_or_default()
}

/// An AMQP field value as a string: strings as they are (lossy UTF-8), numbers and
/// booleans in decimal, timestamps in seconds, tables and arrays as JSON-ish debug text.
pub fn render_value(value: &AMQPValue) -> String {
    match value {
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        AMQPValue::ShortString(v) => v.to_string(),
        AMQPValue::LongString(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        AMQPValue::ByteArray(v) => String::from_utf8_lossy(v.as_slice()).into_owned(),
        AMQPValue::Void => String::new(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_names(properties: &BasicProperties) -> Vec<String> {
        properties
            .headers()
            .as_ref()
            .map(|table| table.inner().keys().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_message_is_delivered_without_the_queues_it_was_also_addressed_to() {
        let mut properties = OutgoingProperties::new("m-1").with_header("x-one", "1");
        properties.bcc.push("orderflow.inventory".to_owned());
        let published = properties.to_amqp().map(|p| header_names(&p));
        let delivered = properties.as_delivered().map(|p| header_names(&p));
        assert_eq!(
            published.ok(),
            Some(vec!["BCC".to_owned(), "x-one".to_owned()])
        );
        assert_eq!(delivered.ok(), Some(vec!["x-one".to_owned()]));
    }
}
