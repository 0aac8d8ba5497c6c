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

/// A router: forwards `<key>:<seq>` bodies to the partition of `<key>`, one key after
/// another in delivery order (the lanes).
struct KeyRouter;

impl bus::Handler for KeyRouter {
    fn ordering_key(&self, msg: &bus::Incoming) -> Option<String> {
        Some(key_of(msg))
    }

    fn handle(&self, msg: bus::Incoming) -> futures::future::BoxFuture<'static, bus::Outcome> {
        let partition = bus::partition_of(&key_of(&msg), bus::COMMAND_PARTITIONS);
        let queue = bus::COMMAND_PARTITION_QUEUES[partition].to_owned();
        Box::pin(async move { bus::Outcome::Forward { queue } })
    }
}

fn key_of(msg: &bus::Incoming) -> String {
    String::from_utf8_lossy(&msg.body)
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn router_options() -> bus::ConsumeOptions {
    bus::ConsumeOptions {
        concurrency: 16,
        prefetch: 64,
        ..crate::support::options(0)
    }
}

async fn intake_consumers(bus: &bus::Bus) -> anyhow::Result<u32> {
    let channel = bus.open_channel().await?;
    let declared = channel
        .queue_declare(
            ShortString::from(bus::COMMAND_INTAKE_QUEUE),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.consumer_count())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_router_forwards_each_key_in_order_with_its_origin_and_a_stand_by_takes_over(
) -> anyhow::Result<()> {
    use crate::support::{FnHandler, Running, Seen};
    use std::sync::Arc;

    let (_vhost, bus) = connected().await?;
    let first = Running::start(
        &bus,
        bus::COMMAND_INTAKE_QUEUE,
        router_options(),
        Arc::new(KeyRouter),
    );
    testkit::wait_until("the router to consume", DEADLINE, || async {
        Ok((intake_consumers(&bus).await? == 1).then_some(()))
    })
    .await?;
    // a second router waits: the intake has a single active consumer
    let second = Running::start(
        &bus,
        bus::COMMAND_INTAKE_QUEUE,
        router_options(),
        Arc::new(KeyRouter),
    );
    let seen = Seen::default();
    let mut partitions = Vec::new();
    for queue in bus::COMMAND_PARTITION_QUEUES {
        let recorder = seen.clone();
        // one at a time: the order seen is the order in the partition queue
        let sequential = bus::ConsumeOptions {
            concurrency: 1,
            ..crate::support::options(0)
        };
        partitions.push(Running::start(
            &bus,
            queue,
            sequential,
            Arc::new(FnHandler(move |msg: bus::Incoming| {
                recorder.push(msg);
                async { bus::Outcome::Ack }
            })),
        ));
    }

    let publish = |keys: std::ops::Range<usize>, rounds: std::ops::Range<usize>| {
        let bus = bus.clone();
        async move {
            let mut messages = Vec::new();
            for round in rounds {
                for key in keys.clone() {
                    let props = bus::OutgoingProperties::new(format!("k{key}-{round}"))
                        .with_correlation_id("corr-route");
                    messages.push(bus::OutgoingMessage {
                        exchange: bus::COMMANDS_EXCHANGE.to_owned(),
                        routing_key: "order.test".to_owned(),
                        body: format!("k{key}:{round}").into_bytes(),
                        properties: props,
                    });
                }
            }
            bus.publish_many(messages).await
        }
    };
    let started = std::time::Instant::now();
    publish(0..40, 0..10).await?;
    testkit::wait_until("400 messages through the router", DEADLINE, || async {
        Ok((seen.all().len() >= 400).then_some(()))
    })
    .await?;
    eprintln!(
        "400 commands routed and consumed in {:?}",
        started.elapsed()
    );

    // the first router goes; the stand-by takes the intake over
    first.stop().await?;
    publish(0..40, 10..12).await?;
    testkit::wait_until("480 messages through the routers", DEADLINE, || async {
        Ok((seen.all().len() >= 480).then_some(()))
    })
    .await?;
    assert_eq!(
        intake_consumers(&bus).await?,
        1,
        "one router consumes at a time"
    );

    let all = seen.all();
    for msg in &all {
        assert_eq!(
            msg.exchange,
            bus::COMMANDS_EXCHANGE,
            "the handler sees the origin"
        );
        assert_eq!(msg.routing_key, "order.test");
        assert_eq!(msg.correlation_id.as_deref(), Some("corr-route"));
    }
    for key in 0..40 {
        let rounds: Vec<String> = all
            .iter()
            .filter(|m| key_of(m) == format!("k{key}"))
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        let expected: Vec<String> = (0..12).map(|r| format!("k{key}:{r}")).collect();
        assert_eq!(rounds, expected, "key k{key} in publish order");
    }
    second.stop().await?;
    for partition in partitions {
        partition.stop().await?;
    }
    Ok(())
}
