//! The RabbitMQ topology of docs/ARCHITECTURE.md ("RabbitMQ topology"), declared by every
//! program at start-up and after every reconnect. Declaring is idempotent.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::BusError;

/// Commands, published by anyone (CONTRACT section 2). Topic, durable, no arguments.
pub const COMMANDS_EXCHANGE: &str = "orderflow.commands";
/// Events relayed from the log. Topic, durable; routing keys `<category>.<EventType>`.
pub const EVENTS_EXCHANGE: &str = "orderflow.events";
/// Messages that cannot be decoded, or whose retries are exhausted.
pub const DEAD_LETTER_QUEUE: &str = "orderflow.dead-letter";
/// Every command (`#` on [`COMMANDS_EXCHANGE`]), consumed by the router of the one
/// process that owns it. A quorum queue with `x-single-active-consumer`, so that the
/// broker delivers to one consumer at a time even if two ever subscribe. (An exclusive consumer on the
/// old intake would have kept its name, but RabbitMQ 3.10's quorum queues accept a
/// second "exclusive" consumer: tried, ADR 0005.)
pub const COMMAND_INTAKE_QUEUE: &str = "orderflow.commands.router";
/// The intake before commands were partitioned. A queue's arguments cannot change, so
/// the router's queue has a new name; this one is still declared (as it was), no
/// longer bound, and consumed by the router until it is empty and deleted by hand.
pub const LEGACY_COMMAND_INTAKE_QUEUE: &str = "orderflow.commands.intake";

/// How many partitions the commands are split into (fixed per deployment: changing it
/// moves orders to other partitions, so drain the partition queues first).
pub const COMMAND_PARTITIONS: usize = 8;
/// The command partitions (ADR 0005, "Per-order ordering"): the router, the one active
/// consumer of [`COMMAND_INTAKE_QUEUE`], forwards each command to
/// `COMMAND_PARTITION_QUEUES[partition_of(order or SKU)]` through the default exchange.
/// Quorum queues with `x-single-active-consumer`: whatever a process believes it owns,
/// the broker hands a partition to one consumer at a time, in queue order.
pub const COMMAND_PARTITION_QUEUES: [&str; COMMAND_PARTITIONS] = [
    "orderflow.commands.p0",
    "orderflow.commands.p1",
    "orderflow.commands.p2",
    "orderflow.commands.p3",
    "orderflow.commands.p4",
    "orderflow.commands.p5",
    "orderflow.commands.p6",
    "orderflow.commands.p7",
];

pub const ORDER_QUEUE: &str = "orderflow.order";
pub const INVENTORY_QUEUE: &str = "orderflow.inventory";
pub const PAYMENT_QUEUE: &str = "orderflow.payment";
pub const SHIPPING_QUEUE: &str = "orderflow.shipping";
pub const NOTIFICATION_QUEUE: &str = "orderflow.notification";

/// Delay tiers for retrying later: a message whose in-process retries ran out is
/// published to a tier's fanout exchange with its queue's name as routing key; the
/// tier's quorum queue holds it for the tier's TTL, then dead-letters it through the
/// default exchange, which delivers it to that queue again. At-least-once
/// dead-lettering (with `reject-publish` overflow) keeps it across broker restarts.
pub const RETRY_TIERS: [(&str, u32); 3] = [
    ("orderflow.retry.1s", 1_000),
    ("orderflow.retry.5s", 5_000),
    ("orderflow.retry.30s", 30_000),
];

/// The delay tier for the `round`-th delayed retry (1-based): 1 s, 5 s, then 30 s.
pub fn retry_tier(round: u32) -> &'static str {
    let index = usize::try_from(round.saturating_sub(1)).unwrap_or(usize::MAX);
    RETRY_TIERS[index.min(RETRY_TIERS.len() - 1)].0
}

/// Service queues and the event routing keys each takes. The relay routes events to
/// them itself (in process, or through [`EVENTS_EXCHANGE`] addressed by the queue's
/// name): each queue is bound to the exchange by its own name only.
pub const SERVICE_QUEUES: &[(&str, &[&str])] = &[
    (
        ORDER_QUEUE,
        &[
            "stock.StockReserved",
            "stock.StockReservationFailed",
            "payment.PaymentCaptured",
            "payment.PaymentDeclined",
            "payment.PaymentTimedOut",
        ],
    ),
    (
        INVENTORY_QUEUE,
        &[
            "order.OrderAccepted",
            "order.StockReleaseRequested",
            "order.OrderCompleted",
            "shipment.ShipmentShipped",
        ],
    ),
    (
        PAYMENT_QUEUE,
        &["order.OrderAccepted", "order.OrderCancelled"],
    ),
    (SHIPPING_QUEUE, &["order.OrderConfirmed"]),
    (
        NOTIFICATION_QUEUE,
        &[
            "order.OrderPlaced",
            "order.OrderRejected",
            "order.OrderSentForReview",
            "order.OrderConfirmed",
            "order.OrderCompleted",
            "order.OrderCancelled",
            "shipment.ShipmentShipped",
            "shipment.ShipmentDelivered",
        ],
    ),
];

/// The service queues that take events with `routing_key`.
pub fn queues_taking(routing_key: &str) -> impl Iterator<Item = &'static str> + '_ {
    SERVICE_QUEUES
        .iter()
        .filter(move |(_, keys)| keys.contains(&routing_key))
        .map(|(queue, _)| *queue)
}

/// Messages ready in `queue` (not those delivered and unacknowledged): a passive
/// declare, on `channel`.
pub(crate) async fn ready_count(channel: &Channel, queue: &str) -> Result<u32, BusError> {
    let declare = channel.queue_declare(
        ShortString::from(queue),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    );
    let declared = crate::consume::answered("counting a queue's messages", declare)
        .await?
        .map_err(|e| BusError::amqp(format!("counting the messages of {queue}"), e))?;
    Ok(declared.message_count())
}

/// All queues this topology declares (all durable quorum queues).
pub fn all_queues() -> impl Iterator<Item = &'static str> {
    [COMMAND_INTAKE_QUEUE, LEGACY_COMMAND_INTAKE_QUEUE]
        .into_iter()
        .chain(COMMAND_PARTITION_QUEUES)
        .chain([DEAD_LETTER_QUEUE])
        .chain(SERVICE_QUEUES.iter().map(|(queue, _)| *queue))
}

/// Declares the exchanges, the quorum queues and their bindings. Idempotent; the
/// exchanges are declared plainly (durable topic, no arguments), as any client would.
pub async fn declare_topology(channel: &Channel) -> Result<(), BusError> {
    for exchange in [COMMANDS_EXCHANGE, EVENTS_EXCHANGE] {
        channel
            .exchange_declare(
                ShortString::from(exchange),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BusError::amqp(format!("declaring exchange {exchange}"), e))?;
    }
    for queue in all_queues() {
        let single_active =
            queue == COMMAND_INTAKE_QUEUE || COMMAND_PARTITION_QUEUES.contains(&queue);
        declare_quorum_queue(channel, queue, single_active).await?;
    }
    for (tier, ttl_ms) in RETRY_TIERS {
        declare_retry_tier(channel, tier, ttl_ms).await?;
    }
    bind(channel, COMMAND_INTAKE_QUEUE, COMMANDS_EXCHANGE, "#").await?;
    // Every command once: the old intake gets no more (an old build still running
    // binds it again when it reconnects; duplicates have no effect, see "Upgrading").
    unbind(channel, LEGACY_COMMAND_INTAKE_QUEUE, COMMANDS_EXCHANGE, "#").await?;
    for (queue, keys) in SERVICE_QUEUES {
        // The relay addresses a service queue by its name (a `BCC` routing key) when it
        // does not hand the event over in process; the events' own routing keys are
        // for outside programs. A queue still bound to them (by a build before 5 Dec,
        // which also relays with another lock and checkpoint) gets duplicates, which
        // its consumer ignores.
        bind(channel, queue, EVENTS_EXCHANGE, queue).await?;
        for key in *keys {
            unbind(channel, queue, EVENTS_EXCHANGE, key).await?;
        }
    }
    Ok(())
}

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments
}

async fn declare_quorum_queue(
    channel: &Channel,
    queue: &str,
    single_active: bool,
) -> Result<(), BusError> {
    let mut arguments = quorum_arguments();
    if single_active {
        arguments.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
    }
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| BusError::amqp(format!("declaring queue {queue}"), e))?;
    Ok(())
}

async fn declare_retry_tier(channel: &Channel, tier: &str, ttl_ms: u32) -> Result<(), BusError> {
    channel
        .exchange_declare(
            ShortString::from(tier),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BusError::amqp(format!("declaring exchange {tier}"), e))?;
    let mut arguments = quorum_arguments();
    let mut put = |name: &str, value: AMQPValue| {
        arguments.insert(ShortString::from(name), value);
    };
    put("x-message-ttl", AMQPValue::LongUInt(ttl_ms));
    put(
        "x-dead-letter-exchange",
        AMQPValue::LongString(LongString::from("")),
    );
    put(
        "x-dead-letter-strategy",
        AMQPValue::LongString(LongString::from("at-least-once")),
    );
    put(
        "x-overflow",
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare(
            ShortString::from(tier),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| BusError::amqp(format!("declaring queue {tier}"), e))?;
    bind(channel, tier, tier, "").await
}

async fn unbind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), BusError> {
    channel
        .queue_unbind(
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(key),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BusError::amqp(format!("unbinding {queue} from {exchange} ({key})"), e))
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), BusError> {
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BusError::amqp(format!("binding {queue} to {exchange} with {key}"), e))
}

/// The partition (`0..partitions`) of `key` (e.g. `order:<id>`): FNV-1a, so that every
/// process, whatever its Rust version, maps a key to the same partition.
pub fn partition_of(key: &str, partitions: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    let partitions = u64::try_from(partitions.max(1)).unwrap_or(u64::MAX);
    usize::try_from(hash % partitions).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_maps_to_the_same_partition() {
        // Fixed values: a change here moves orders between partitions of a running
        // deployment, which breaks their ordering during the change.
        assert_eq!(partition_of("", 8), 0xcbf2_9ce4_8422_2325_u64 as usize % 8);
        assert_eq!(
            partition_of("order:7f0c1f2e-9a43-4a53-9a0e-0d6f3f6f4a11", 8),
            partition_of("order:7f0c1f2e-9a43-4a53-9a0e-0d6f3f6f4a11", 8)
        );
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0);
    }

    #[test]
    fn orders_spread_over_every_partition() {
        let mut counts = [0_usize; COMMAND_PARTITIONS];
        for n in 0..8_000 {
            let key = format!("order:{}", uuid::Uuid::from_u128(n * 7_919 + 13));
            counts[partition_of(&key, COMMAND_PARTITIONS)] += 1;
        }
        // 1 000 expected each; FNV-1a keeps every partition within 20 % of that
        assert!(
            counts.iter().all(|c| (800..1_200).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn partition_queues_are_distinct_and_listed() {
        let queues: std::collections::BTreeSet<&str> =
            COMMAND_PARTITION_QUEUES.into_iter().collect();
        assert_eq!(queues.len(), COMMAND_PARTITIONS);
        assert!(COMMAND_PARTITION_QUEUES
            .iter()
            .all(|q| all_queues().any(|a| a == *q)));
    }
}
