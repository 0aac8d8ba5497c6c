use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus::{
    header_names, Outcome, OutgoingProperties, COMMANDS_EXCHANGE, COMMAND_INTAKE_QUEUE,
    DEAD_LETTER_QUEUE,
};
use lapin::types::AMQPValue;

use crate::support::{
    connected, new_id, options, publish_command, take_one, FnHandler, Running, Seen,
};

fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(name))
        .map(bus_render)
}

fn bus_render(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn a_dead_letter_outcome_moves_the_message_to_the_dead_letter_queue_and_later_messages_flow(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let seen = Seen::default();
    let recorder = seen.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(3),
        Arc::new(FnHandler(move |msg: bus::Incoming| {
            let poison = msg.body == b"not json";
            recorder.push(msg);
            async move {
                if poison {
                    Outcome::DeadLetter {
                        reason: "body is not JSON".to_owned(),
                    }
                } else {
                    Outcome::Ack
                }
            }
        })),
    );

    let poison_id = new_id();
    let props = OutgoingProperties::new(poison_id.clone())
        .with_correlation_id("corr-dl")
        .with_header("x-tenant", "acme");
    bus.publish(
        COMMANDS_EXCHANGE,
        "order.place",
        b"not json".to_vec(),
        props,
    )
    .await?;
    let later_id = new_id();
    publish_command(&bus, "order.cancel", later_id.clone()).await?;

    seen.wait_for_id(&later_id).await?;
    let dead = take_one(&bus, DEAD_LETTER_QUEUE).await?;
    consumer.stop().await?;

    assert_eq!(dead.data, b"not json");
    let props = &dead.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(poison_id.as_str())
    );
    assert_eq!(
        props.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-dl")
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(
        header(&dead, header_names::ERROR).as_deref(),
        Some("body is not JSON")
    );
    assert_eq!(
        header(&dead, header_names::ORIGINAL_EXCHANGE).as_deref(),
        Some(COMMANDS_EXCHANGE)
    );
    assert_eq!(
        header(&dead, header_names::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("order.place")
    );
    assert_eq!(header(&dead, header_names::ATTEMPTS).as_deref(), Some("1"));
    assert_eq!(header(&dead, "x-tenant").as_deref(), Some("acme"));
    // the dead-lettered message was handled once, not retried
    assert_eq!(seen.ids().iter().filter(|id| **id == poison_id).count(), 1);
    Ok(())
}

#[tokio::test]
async fn retries_that_never_succeed_end_in_the_dead_letter_queue_with_the_attempt_count(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(3),
        Arc::new(FnHandler(move |_msg| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                Outcome::Retry {
                    reason: "gateway unavailable".to_owned(),
                }
            }
        })),
    );
    let id = new_id();
    let started = std::time::Instant::now();
    publish_command(&bus, "order.place", id.clone()).await?;
    let dead = take_one(&bus, DEAD_LETTER_QUEUE).await?;
    consumer.stop().await?;

    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "one attempt and three retries"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "retries are quick"
    );
    assert_eq!(
        dead.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_eq!(header(&dead, header_names::ATTEMPTS).as_deref(), Some("4"));
    let error = header(&dead, header_names::ERROR).unwrap_or_default();
    assert!(error.contains("gateway unavailable"), "{error}");
    Ok(())
}

#[tokio::test]
async fn a_retry_that_later_succeeds_is_acked_and_not_dead_lettered() -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let seen = Seen::default();
    let recorder = seen.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(3),
        Arc::new(FnHandler(move |msg| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            let recorder = recorder.clone();
            async move {
                if call < 2 {
                    Outcome::Retry {
                        reason: "flaky".to_owned(),
                    }
                } else {
                    recorder.push(msg);
                    Outcome::Ack
                }
            }
        })),
    );
    let id = new_id();
    publish_command(&bus, "order.place", id.clone()).await?;
    seen.wait_for_id(&id).await?;
    consumer.stop().await?;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        crate::support::ready_count(&bus, DEAD_LETTER_QUEUE).await?,
        0
    );
    assert_eq!(
        crate::support::ready_count(&bus, COMMAND_INTAKE_QUEUE).await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn an_attempt_that_never_finishes_is_abandoned_and_the_message_retried() -> anyhow::Result<()>
{
    let (_vhost, bus) = connected().await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let seen = Seen::default();
    let recorder = seen.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        bus::ConsumeOptions {
            handler_timeout: std::time::Duration::from_millis(300),
            ..options(3)
        },
        Arc::new(FnHandler(move |msg| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            let recorder = recorder.clone();
            async move {
                if call == 0 {
                    // Stuck on something that never answers.
                    std::future::pending::<()>().await;
                }
                recorder.push(msg);
                Outcome::Ack
            }
        })),
    );
    let id = new_id();
    publish_command(&bus, "order.place", id.clone()).await?;
    seen.wait_for_id(&id).await?;
    consumer.stop().await?;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one abandoned attempt, one that finished"
    );
    assert_eq!(seen.ids(), vec![id.clone()]);
    for queue in [DEAD_LETTER_QUEUE, COMMAND_INTAKE_QUEUE] {
        assert_eq!(
            crate::support::ready_count(&bus, queue).await?,
            0,
            "{queue}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_panicking_handler_does_not_stop_the_consumer() -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let seen = Seen::default();
    let recorder = seen.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(3),
        Arc::new(FnHandler(move |msg: bus::Incoming| {
            let recorder = recorder.clone();
            async move {
                if msg.routing_key == "order.explode" {
                    panic!("boom");
                }
                recorder.push(msg);
                Outcome::Ack
            }
        })),
    );
    let bad = new_id();
    publish_command(&bus, "order.explode", bad.clone()).await?;
    let good = new_id();
    publish_command(&bus, "order.place", good.clone()).await?;

    seen.wait_for_id(&good).await?;
    let dead = take_one(&bus, DEAD_LETTER_QUEUE).await?;
    consumer.stop().await?;
    assert_eq!(
        dead.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(bad.as_str())
    );
    let error = header(&dead, header_names::ERROR).unwrap_or_default();
    assert!(error.contains("handler panicked"), "{error}");
    Ok(())
}

#[tokio::test]
async fn shutdown_lets_the_in_flight_handler_finish_and_ack() -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let entered_tx = std::sync::Mutex::new(Some(entered_tx));
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let finished = Arc::new(AtomicUsize::new(0));
    let done = finished.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(0),
        Arc::new(FnHandler(move |_msg| {
            if let Some(tx) = entered_tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(());
            }
            let release_rx = release_rx.clone();
            let done = done.clone();
            async move {
                if let Some(rx) = release_rx.lock().await.take() {
                    let _ = rx.await;
                }
                done.fetch_add(1, Ordering::SeqCst);
                Outcome::Ack
            }
        })),
    );
    publish_command(&bus, "order.place", new_id()).await?;
    tokio::time::timeout(crate::support::DEADLINE, entered_rx).await??;

    let stopping = tokio::spawn(consumer.stop());
    // the handler is still running while the consumer stops; let it finish
    let _ = release_tx.send(());
    stopping.await??;
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    assert_eq!(
        crate::support::ready_count(&bus, COMMAND_INTAKE_QUEUE).await?,
        0,
        "acked"
    );
    Ok(())
}

/// Orders messages by routing key, records their start order per key, and notices any
/// overlap of two messages of one key.
struct KeyedHandler {
    seen: Seen,
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    overlaps: Arc<AtomicUsize>,
    starts: testkit::Starts,
}

impl bus::Handler for KeyedHandler {
    fn handle(&self, msg: bus::Incoming) -> futures::future::BoxFuture<'static, Outcome> {
        let key = msg.routing_key.clone();
        let in_flight = self.in_flight.clone();
        let overlaps = self.overlaps.clone();
        let starts = self.starts.clone();
        let started = starts.start();
        {
            let mut map = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(key.clone()).or_default();
            *n += 1;
            if *n > 1 {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.seen.push(msg);
        Box::pin(async move {
            // Busy until the next message starts, so that a second message of the key
            // would overlap this one if it were allowed to.
            starts.next_after(started, Duration::from_millis(50)).await;
            let mut map = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
            }
            Outcome::Ack
        })
    }

    fn ordering_key(&self, msg: &bus::Incoming) -> Option<String> {
        Some(msg.routing_key.clone())
    }
}

#[tokio::test]
async fn messages_with_one_ordering_key_are_handled_one_at_a_time_in_delivery_order(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let seen = Seen::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let handler = KeyedHandler {
        seen: seen.clone(),
        in_flight: Arc::default(),
        overlaps: overlaps.clone(),
        starts: testkit::Starts::default(),
    };
    let consumer = Running::start(&bus, COMMAND_INTAKE_QUEUE, options(0), Arc::new(handler));
    let mut published: Vec<(String, String)> = Vec::new();
    for i in 0..40 {
        let key = if i % 2 == 0 {
            "order.cancel"
        } else {
            "stock.set"
        };
        let id = new_id();
        publish_command(&bus, key, id.clone()).await?;
        published.push((key.to_owned(), id));
    }
    for key in ["order.cancel", "stock.set"] {
        let expected: Vec<String> = published
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id.clone())
            .collect();
        wait_len(&seen, key, expected.len()).await?;
        let handled: Vec<String> = seen
            .all()
            .into_iter()
            .filter(|m| m.routing_key == key)
            .filter_map(|m| m.message_id)
            .collect();
        assert_eq!(handled, expected, "order of {key}");
    }
    consumer.stop().await?;
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two messages of one key overlapped"
    );
    Ok(())
}

async fn wait_len(seen: &Seen, key: &str, n: usize) -> anyhow::Result<()> {
    testkit::wait_until(
        "all messages of the key",
        std::time::Duration::from_secs(10),
        || {
            let count = seen.all().iter().filter(|m| m.routing_key == key).count();
            async move { Ok((count >= n).then_some(())) }
        },
    )
    .await
}

#[tokio::test]
async fn a_message_that_keeps_failing_transiently_is_retried_later_through_a_delay_queue(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let seen = Seen::default();
    let recorder = seen.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        bus::ConsumeOptions {
            delayed_retry_rounds: 1,
            ..options(1)
        },
        Arc::new(FnHandler(move |msg: bus::Incoming| {
            // Fails for both in-process attempts of the first delivery, then works.
            let call = counter.fetch_add(1, Ordering::SeqCst);
            recorder.push(msg);
            async move {
                if call < 2 {
                    Outcome::Retry {
                        reason: "database unavailable".to_owned(),
                    }
                } else {
                    Outcome::Ack
                }
            }
        })),
    );
    let id = new_id();
    publish_command(&bus, "order.cancel", id.clone()).await?;
    testkit::wait_until(
        "the message back from the delay queue",
        std::time::Duration::from_secs(15),
        || {
            let n = calls.load(Ordering::SeqCst);
            async move { Ok((n >= 3).then_some(())) }
        },
    )
    .await?;
    consumer.stop().await?;
    let all = seen.all();
    let back = all
        .last()
        .ok_or_else(|| anyhow::anyhow!("no message seen"))?;
    assert_eq!(back.message_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        back.routing_key, "order.cancel",
        "the handler sees the original routing key"
    );
    assert_eq!(back.exchange, COMMANDS_EXCHANGE);
    assert_eq!(
        back.headers
            .get(header_names::RETRY_ROUND)
            .map(String::as_str),
        Some("1")
    );
    let left = bus::dlq_list(&bus, 10).await?;
    assert!(left.is_empty(), "nothing was dead-lettered: {left:?}");
    Ok(())
}
