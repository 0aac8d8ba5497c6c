//! Messages offered in process (`Bus::offer`, ADR 0005): what the relay does with an
//! event for a queue that a consumer of its own process takes hand-offs for. The
//! message has no delivery behind it; the offerer learns when it is settled.
use std::sync::Arc;

use bus::topology::{INVENTORY_QUEUE, PAYMENT_QUEUE};
use bus::{header_names, Incoming, Offer, Outcome, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE};
use futures::future::BoxFuture;

use crate::support::{connected, ready_count, take_one, Running, Seen, DEADLINE};

/// Records every message; dead-letters those whose body is `poison`.
struct Recorder(Seen);

impl bus::Handler for Recorder {
    fn ordering_key(&self, _msg: &Incoming) -> Option<String> {
        Some("one key".to_owned())
    }

    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let poison = msg.body == b"poison";
        self.0.push(msg);
        Box::pin(async move {
            if poison {
                Outcome::DeadLetter {
                    reason: "poison".to_owned(),
                }
            } else {
                Outcome::Ack
            }
        })
    }
}

/// A [`Recorder`] consuming the queue, once it takes hand-offs.
async fn start_recorder(bus: &bus::Bus) -> anyhow::Result<(Seen, Running)> {
    let seen = Seen::default();
    let consumer = Running::start(
        bus,
        INVENTORY_QUEUE,
        consumer_options(),
        Arc::new(Recorder(seen.clone())),
    );
    wait_drained(bus).await?;
    Ok((seen, consumer))
}

async fn wait_drained(bus: &bus::Bus) -> anyhow::Result<()> {
    testkit::wait_until("the queue drained by this process", DEADLINE, || async {
        Ok(bus.hands_over_to(INVENTORY_QUEUE).then_some(()))
    })
    .await
}

fn consumer_options() -> bus::ConsumeOptions {
    bus::ConsumeOptions {
        local_hand_off: true,
        ..crate::support::options(0)
    }
}

fn event(id: &str, body: &str) -> bus::OutgoingMessage {
    bus::OutgoingMessage {
        exchange: EVENTS_EXCHANGE.to_owned(),
        routing_key: "order.OrderAccepted".to_owned(),
        body: body.as_bytes().to_vec(),
        properties: bus::OutgoingProperties::new(id).with_correlation_id("corr-offer"),
    }
}

/// Offers `message` and returns what became of it: `true` handed over (and settled),
/// `false` published to the queue by the offerer, as the relay does.
async fn offer(bus: &bus::Bus, message: bus::OutgoingMessage) -> anyhow::Result<bool> {
    let offered = tokio::time::timeout(DEADLINE, bus.offer(INVENTORY_QUEUE, &message)).await??;
    match offered {
        Offer::Handed(handed) => {
            tokio::time::timeout(DEADLINE, handed.settled()).await??;
            Ok(true)
        }
        Offer::Publish(guard) => {
            publish_to_the_queue(bus, message, guard).await?;
            Ok(false)
        }
    }
}

/// What the offerer does with a message not handed over: publishes it to the queue,
/// keeping the guard until the broker has confirmed it.
async fn publish_to_the_queue(
    bus: &bus::Bus,
    message: bus::OutgoingMessage,
    guard: bus::PublishGuard,
) -> anyhow::Result<()> {
    let direct = bus::OutgoingMessage {
        exchange: String::new(),
        routing_key: INVENTORY_QUEUE.to_owned(),
        ..message
    };
    bus.publish_many(vec![direct]).await?;
    drop(guard);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offered_message_is_handed_over_behind_what_the_queue_held_and_published_while_no_consumer_is_here(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    assert!(
        !offer(&bus, event("queued", "first")).await?,
        "no consumer here: the offerer publishes it"
    );
    assert_eq!(ready_count(&bus, INVENTORY_QUEUE).await?, 1);

    let (seen, consumer) = start_recorder(&bus).await?;
    assert!(
        offer(&bus, event("handed", "second")).await?,
        "once the queue is drained, handed over"
    );
    assert_eq!(
        seen.ids(),
        vec!["queued".to_owned(), "handed".to_owned()],
        "what the queue held first"
    );
    let handed = seen.wait_for_id("handed").await?;
    assert_eq!(
        handed.exchange, EVENTS_EXCHANGE,
        "as published, not forwarded"
    );
    assert_eq!(handed.routing_key, "order.OrderAccepted");
    assert_eq!(handed.correlation_id.as_deref(), Some("corr-offer"));
    assert!(!handed.headers.contains_key(header_names::ROUTED_TO));

    assert!(offer(&bus, event("poisoned", "poison")).await?);
    let dead = take_one(&bus, DEAD_LETTER_QUEUE).await?;
    assert_eq!(
        dead.properties.message_id().as_ref().map(|id| id.as_str()),
        Some("poisoned"),
        "a dead letter is settled, not lost"
    );

    consumer.stop().await?;
    assert!(!offer(&bus, event("after", "third")).await?, "stopped");
    assert_eq!(ready_count(&bus, INVENTORY_QUEUE).await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_process_of_a_queue_with_competing_consumers_gets_its_own_marker_back(
) -> anyhow::Result<()> {
    // Four processes consume the queue; a marker the broker gives to another one's
    // consumer is sent on until it reaches its own (without that, most of them would
    // wait out the drain's patience, a minute, and publish meanwhile).
    let (vhost, first) = connected().await?;
    let mut buses = vec![first];
    for _ in 1..4 {
        buses.push(bus::Bus::connect(&vhost.url).await?);
    }
    let seen = Seen::default();
    let consumers: Vec<Running> = buses
        .iter()
        .map(|bus| {
            Running::start(
                bus,
                INVENTORY_QUEUE,
                consumer_options(),
                Arc::new(Recorder(seen.clone())),
            )
        })
        .collect();
    for bus in &buses {
        wait_drained(bus).await?;
    }
    for (index, bus) in buses.iter().enumerate() {
        assert!(
            offer(bus, event(&format!("process-{index}"), "hello")).await?,
            "process {index} hands over"
        );
    }
    assert_eq!(seen.all().len(), 4);
    for consumer in consumers {
        consumer.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_dead_lettered_in_process_goes_back_to_its_queue_on_retry() -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let (seen, consumer) = start_recorder(&bus).await?;
    let mut poisoned = event("poisoned", "poison");
    // As the relay leaves it when the event was published to the payment's queue
    // before it was offered here: that addressing is not part of what is handed over.
    poisoned.properties.bcc.push(PAYMENT_QUEUE.to_owned());
    assert!(offer(&bus, poisoned).await?);
    testkit::wait_until("the dead letter", DEADLINE, || async {
        Ok((ready_count(&bus, DEAD_LETTER_QUEUE).await? == 1).then_some(()))
    })
    .await?;
    assert_eq!(
        ready_count(&bus, PAYMENT_QUEUE).await?,
        0,
        "the dead letter was also sent to the payment's queue"
    );

    // The queue is bound to the events exchange by its name only: the retry finds it
    // by the queue the dead letter says it came from.
    let retried = bus::dlq_retry(&bus, bus::DlqSelector::MessageId("poisoned".into())).await?;
    assert_eq!(retried, 1);
    testkit::wait_until("the event handled again", DEADLINE, || async {
        Ok((seen.ids().len() == 2).then_some(()))
    })
    .await?;
    let again = &seen.all()[1];
    assert_eq!(again.message_id.as_deref(), Some("poisoned"));
    assert_eq!(again.exchange, EVENTS_EXCHANGE);
    assert_eq!(again.routing_key, "order.OrderAccepted");
    consumer.stop().await?;
    Ok(())
}

/// Records every message, one after another, once `open` is true.
struct Held {
    seen: Seen,
    open: tokio::sync::watch::Receiver<bool>,
}

impl bus::Handler for Held {
    fn ordering_key(&self, _msg: &Incoming) -> Option<String> {
        Some("one key".to_owned())
    }

    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let (seen, mut open) = (self.seen.clone(), self.open.clone());
        Box::pin(async move {
            let _ = open.wait_for(|open| *open).await;
            seen.push(msg);
            Outcome::Ack
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn offers_past_the_consumers_prefetch_go_through_the_queue_in_order_until_it_catches_up(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let seen = Seen::default();
    let (open, opened) = tokio::sync::watch::channel(false);
    let options = bus::ConsumeOptions {
        prefetch: 1,
        ..consumer_options()
    };
    let consumer = Running::start(
        &bus,
        INVENTORY_QUEUE,
        options,
        Arc::new(Held {
            seen: seen.clone(),
            open: opened,
        }),
    );
    wait_drained(&bus).await?;
    // The consumer hangs: eight offers (8 × its prefetch) are handed over (their
    // settling is awaited only at the end), the rest go to the queue.
    let mut handed = Vec::new();
    let mut published = 0;
    for n in 0..12 {
        let message = event(&format!("m{n}"), "x");
        match tokio::time::timeout(DEADLINE, bus.offer(INVENTORY_QUEUE, &message)).await?? {
            Offer::Handed(hand_off) => handed.push(hand_off),
            Offer::Publish(guard) => {
                publish_to_the_queue(&bus, message, guard).await?;
                published += 1;
            }
        }
    }
    assert_eq!((handed.len(), published), (8, 4));
    assert!(
        !bus.hands_over_to(INVENTORY_QUEUE),
        "closed while it is behind"
    );

    let _ = open.send(true);
    for hand_off in handed {
        tokio::time::timeout(DEADLINE, hand_off.settled()).await??;
    }
    testkit::wait_until("every message handled", DEADLINE, || async {
        Ok((seen.ids().len() == 12).then_some(()))
    })
    .await?;
    let expected: Vec<String> = (0..12).map(|n| format!("m{n}")).collect();
    assert_eq!(seen.ids(), expected, "in the order offered");
    // Caught up, with its queue empty: hand-offs again.
    wait_drained(&bus).await?;
    assert!(offer(&bus, event("m12", "x")).await?);
    consumer.stop().await?;
    Ok(())
}
