//! The dead-letter queue, for `orderflow dlq list|retry`.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use tracing::{info, warn};

use crate::message::{headers, render_headers, Incoming, PERSISTENT};
use crate::publish::Prepared;
use crate::topology::{queues_taking, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, SERVICE_QUEUES};
use crate::{Bus, BusError};

/// Header the broker adds to messages redelivered from a quorum queue; stripped on retry.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// How long [`dlq_list`] waits for the broker to take the listed messages back.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A message in `orderflow.dead-letter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    /// The exchange it was first published to (`x-orderflow-original-exchange`).
    pub exchange: String,
    /// The routing key it was first published with (`x-orderflow-original-routing-key`).
    pub routing_key: String,
    /// Why it was dead-lettered (`x-orderflow-error`).
    pub error: String,
    /// Handler attempts before it was dead-lettered (0 when unknown).
    pub attempts: u32,
    pub body: Vec<u8>,
    /// All headers, rendered as strings.
    pub headers: BTreeMap<String, String>,
}

impl DeadLetter {
    fn from_delivery(delivery: &Delivery) -> Self {
        let headers = render_headers(delivery.properties.headers().as_ref());
        let get = |name: &str| headers.get(name).cloned().unwrap_or_default();
        DeadLetter {
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string),
            exchange: get(headers::ORIGINAL_EXCHANGE),
            routing_key: get(headers::ORIGINAL_ROUTING_KEY),
            error: get(headers::ERROR),
            attempts: get(headers::ATTEMPTS).parse().unwrap_or(0),
            body: delivery.data.clone(),
            headers,
        }
    }

    /// Whether it carries the headers needed to send it back where it came from.
    fn has_origin(&self) -> bool {
        self.headers.contains_key(headers::ORIGINAL_EXCHANGE)
            && self.headers.contains_key(headers::ORIGINAL_ROUTING_KEY)
    }
}

/// Which dead letters [`dlq_retry`] sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlqSelector {
    All,
    MessageId(String),
}

impl DlqSelector {
    fn matches(&self, letter: &DeadLetter) -> bool {
        match self {
            DlqSelector::All => true,
            DlqSelector::MessageId(id) => letter.message_id.as_deref() == Some(id.as_str()),
        }
    }
}

/// Up to `limit` dead letters, oldest first, left in the queue (fetched unacked, then
/// returned to the queue by closing the channel).
pub async fn dlq_list(bus: &Bus, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
    let channel = bus.open_channel().await?;
    let mut letters = Vec::new();
    let mut ready_at_start = 0;
    let result = async {
        while letters.len() < limit {
            match get(&channel).await? {
                Some(message) => {
                    if letters.is_empty() {
                        ready_at_start = message.message_count.saturating_add(1);
                    }
                    letters.push(DeadLetter::from_delivery(&message.delivery));
                }
                None => break,
            }
        }
        Ok::<(), BusError>(())
    }
    .await;
    close(&channel).await;
    if !letters.is_empty() {
        // A quorum queue takes the returned messages back asynchronously after the
        // channel closed; wait (briefly) until they are ready again, so that a list or
        // retry right after this one sees them.
        settle(bus, ready_at_start).await;
    }
    result.map(|()| letters)
}

/// Waits up to [`SETTLE_TIMEOUT`] until the dead-letter queue has `ready` messages.
async fn settle(bus: &Bus, ready: u32) {
    let started = Instant::now();
    let Ok(channel) = bus.open_channel().await else {
        return;
    };
    while started.elapsed() < SETTLE_TIMEOUT {
        match ready_count(&channel).await {
            Ok(count) if count >= ready => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break,
        }
    }
    close(&channel).await;
}

async fn ready_count(channel: &Channel) -> Result<u32, BusError> {
    crate::topology::ready_count(channel, DEAD_LETTER_QUEUE).await
}

/// Republishes the selected dead letters to their original exchange and routing key
/// (without the `x-orderflow-*` headers, with a confirm; unroutable is an error), then
/// removes them from the dead-letter queue. Looks at the messages present when it
/// starts (not at those dead-lettered again meanwhile). Returns how many it sent.
pub async fn dlq_retry(bus: &Bus, selector: DlqSelector) -> Result<usize, BusError> {
    let channel = bus.open_channel().await?;
    let result = retry_on(bus, &channel, &selector).await;
    // unselected messages were fetched unacked: closing the channel returns them
    close(&channel).await;
    result
}

async fn retry_on(bus: &Bus, channel: &Channel, selector: &DlqSelector) -> Result<usize, BusError> {
    // Retried messages may be dead-lettered again while this runs: stop at the first
    // message already retried here, and never look at more than were there at start.
    let mut remaining = ready_count(channel).await?;
    let mut retried_ids = HashSet::new();
    let mut retried = 0;
    while remaining > 0 {
        let Some(message) = get(channel).await? else {
            break;
        };
        remaining -= 1;
        let delivery = message.delivery;
        let letter = DeadLetter::from_delivery(&delivery);
        if let Some(id) = &letter.message_id {
            if retried_ids.contains(id) {
                break;
            }
        }
        if !selector.matches(&letter) {
            continue;
        }
        if !letter.has_origin() {
            warn!(
                message_id = ?letter.message_id,
                "dead letter has no original exchange/routing key; leaving it"
            );
            continue;
        }
        let mut table = FieldTable::default();
        if let Some(existing) = delivery.properties.headers() {
            for (name, value) in existing.inner() {
                let name_str = name.as_str();
                if !name_str.starts_with(headers::PREFIX) && name_str != DELIVERY_COUNT_HEADER {
                    table.insert(name.clone(), value.clone());
                }
            }
        }
        let addresses = service_addresses(&letter);
        if !addresses.is_empty() {
            let keys = addresses
                .iter()
                .map(|queue| AMQPValue::LongString(LongString::from(queue.as_bytes())))
                .collect::<Vec<_>>();
            table.insert(ShortString::from("BCC"), AMQPValue::FieldArray(keys.into()));
        }
        let properties = delivery.properties.clone().with_headers(table);
        let message = Prepared::new(
            &letter.exchange,
            &letter.routing_key,
            &delivery.data,
            properties,
            true,
        )?;
        bus.publish_prepared(&message).await?;
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| {
                BusError::amqp(
                    format!("removing a retried message from {DEAD_LETTER_QUEUE}"),
                    e,
                )
            })?;
        info!(message_id = ?letter.message_id, exchange = %letter.exchange, routing_key = %letter.routing_key, "dead letter retried");
        if let Some(id) = letter.message_id {
            retried_ids.insert(id);
        }
        retried += 1;
    }
    Ok(retried)
}

/// The service queues a retried event goes back to, by their names (`BCC`): they are
/// bound to the events exchange by those, not by the events' routing keys, which are
/// left to outside programs. The queue it was dead-lettered from; for a dead letter
/// that does not say (a parked message's copy, or one dead-lettered before 5 Dec),
/// every service queue that takes its routing key, as the exchange routed it then.
fn service_addresses(letter: &DeadLetter) -> Vec<String> {
    if letter.exchange != EVENTS_EXCHANGE {
        return Vec::new();
    }
    let takes = |queue: &str| SERVICE_QUEUES.iter().any(|(name, _)| *name == queue);
    if let Some(queue) = letter.headers.get(headers::DEAD_LETTERED_FROM) {
        if takes(queue) {
            return vec![queue.clone()];
        }
    }
    queues_taking(&letter.routing_key)
        .map(ToOwned::to_owned)
        .collect()
}

async fn get(channel: &Channel) -> Result<Option<BasicGetMessage>, BusError> {
    channel
        .basic_get(
            ShortString::from(DEAD_LETTER_QUEUE),
            BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(|e| BusError::amqp(format!("reading {DEAD_LETTER_QUEUE}"), e))
}

async fn close(channel: &Channel) {
    if let Err(err) = channel.close(200, "done".into()).await {
        warn!(error = %err, "closing the dead-letter channel failed");
    }
}

/// Puts a copy of a message that is kept elsewhere into the dead-letter queue, with its
/// body, its properties as the handler saw them, `x-orderflow-error` and its origin, so
/// that `orderflow dlq list` shows it and `orderflow dlq retry` can send it back. Used
/// for a parked order's message once its automatic retries are used up: contract
/// section 2 says such a message ends in `orderflow.dead-letter`, while the order itself
/// stays parked (its later messages keep waiting behind it). `extra` headers say where
/// the original is kept.
pub async fn dead_letter_copy(
    bus: &Bus,
    msg: &Incoming,
    reason: &str,
    attempts: u32,
    extra: &[(&str, String)],
) -> Result<(), BusError> {
    let mut table = FieldTable::default();
    let mut put = |name: &str, value: &str| {
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    };
    for (name, value) in &msg.headers {
        put(name, value);
    }
    put(headers::ERROR, reason);
    put(headers::ORIGINAL_EXCHANGE, &msg.exchange);
    put(headers::ORIGINAL_ROUTING_KEY, &msg.routing_key);
    for (name, value) in extra {
        put(name, value);
    }
    table.insert(
        ShortString::from(headers::ATTEMPTS),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    let message = Prepared::new(
        "",
        DEAD_LETTER_QUEUE,
        &msg.body,
        properties_of(msg).with_headers(table),
        true,
    )?;
    bus.publish_prepared(&message).await
}

/// The AMQP properties a handler saw, rebuilt from what [`Incoming`] kept of them.
fn properties_of(msg: &Incoming) -> BasicProperties {
    let text = |value: &Option<String>| value.as_deref().map(ShortString::from);
    let mut properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
    if let Some(id) = text(&msg.message_id) {
        properties = properties.with_message_id(id);
    }
    if let Some(id) = text(&msg.correlation_id) {
        properties = properties.with_correlation_id(id);
    }
    if let Some(kind) = text(&msg.message_type) {
        properties = properties.with_type(kind);
    }
    if let Some(content_type) = text(&msg.content_type) {
        properties = properties.with_content_type(content_type);
    }
    if let Some(at) = msg
        .timestamp
        .and_then(|t| u64::try_from(t.timestamp()).ok())
    {
        properties = properties.with_timestamp(at);
    }
    properties
}
