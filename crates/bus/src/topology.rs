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
/// Every command (`#` on [`COMMANDS_EXCHANGE`]).
pub const COMMAND_INTAKE_QUEUE: &str = "orderflow.commands.intake";

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

/// Service queues and the event routing keys bound to them on [`EVENTS_EXCHANGE`].
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

/// All queues this topology declares (all durable quorum queues).
pub fn all_queues() -> impl Iterator<Item = &'static str> {
    [COMMAND_INTAKE_QUEUE, DEAD_LETTER_QUEUE]
        .into_iter()
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
        declare_quorum_queue(channel, queue).await?;
    }
    for (tier, ttl_ms) in RETRY_TIERS {
        declare_retry_tier(channel, tier, ttl_ms).await?;
    }
    bind(channel, COMMAND_INTAKE_QUEUE, COMMANDS_EXCHANGE, "#").await?;
    for (queue, keys) in SERVICE_QUEUES {
        for key in *keys {
            bind(channel, queue, EVENTS_EXCHANGE, key).await?;
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

async fn declare_quorum_queue(channel: &Channel, queue: &str) -> Result<(), BusError> {
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            quorum_arguments(),
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
