//! What the broker does for per-order ordering across processes (ADR 0005): which
//! consumer of a single-active-consumer quorum queue is active, whether a consumer
//! priority moves it, and whether an exclusive consumer keeps a second one out.
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Consumer};

use crate::support::{connected, DEADLINE};

async fn declare_sac_queue(channel: &Channel, name: &str) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments.insert(
        ShortString::from("x-single-active-consumer"),
        AMQPValue::Boolean(true),
    );
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    Ok(())
}

async fn subscribe(
    channel: &Channel,
    queue: &str,
    tag: &str,
    priority: i32,
) -> anyhow::Result<Consumer> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-priority"),
        AMQPValue::LongInt(priority),
    );
    Ok(channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(tag),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await?)
}

/// The tag of the consumer that receives the next message published to `queue`.
async fn who_receives(
    publisher: &Channel,
    queue: &str,
    consumers: &mut [(&str, &mut Consumer)],
) -> anyhow::Result<String> {
    publisher
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < deadline {
        for (tag, consumer) in consumers.iter_mut() {
            if let Ok(Some(delivery)) =
                tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
            {
                delivery?.ack(BasicAckOptions::default()).await?;
                return Ok((*tag).to_owned());
            }
        }
    }
    anyhow::bail!("no consumer received the message")
}

#[tokio::test]
async fn single_active_consumer_stays_with_the_first_subscriber_whatever_the_priority(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let channel = bus.open_channel().await?;
    declare_sac_queue(&channel, "sac.experiment").await?;
    let first_channel = bus.open_channel().await?;
    let second_channel = bus.open_channel().await?;
    let mut first = subscribe(&first_channel, "sac.experiment", "first", 0).await?;
    let mut second = subscribe(&second_channel, "sac.experiment", "second", 10).await?;
    let mut consumers = [("first", &mut first), ("second", &mut second)];
    for _ in 0..3 {
        // RabbitMQ 3.10: the higher priority of the later subscriber does not make it
        // active; the first one keeps every message (no load sharing by priority).
        assert_eq!(
            who_receives(&channel, "sac.experiment", &mut consumers).await?,
            "first"
        );
    }
    // The stand-by takes over once the active consumer's channel goes.
    first_channel.close(200, "gone".into()).await?;
    let mut consumers = [("second", &mut second)];
    assert_eq!(
        who_receives(&channel, "sac.experiment", &mut consumers).await?,
        "second"
    );
    Ok(())
}
