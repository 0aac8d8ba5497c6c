//! Back-pressure: the prefetch bounds what the broker hands out unacknowledged and the
//! concurrency bounds the handlers running at once, so a handler that blocks holds the
//! rest of the queue at the broker instead of in the consumer's memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bus::{Outcome, COMMAND_INTAKE_QUEUE};
use tokio::sync::Semaphore;

use crate::support::{connected, new_id, publish_command, FnHandler, Running, Seen, DEADLINE};

const MESSAGES: u64 = 30;
const BOUND: u64 = 5;

#[tokio::test]
async fn prefetch_and_concurrency_bound_the_messages_in_flight() -> anyhow::Result<()> {
    let (vhost, bus) = connected().await?;
    for _ in 0..MESSAGES {
        publish_command(&bus, "order.place", new_id()).await?;
    }

    // Handlers wait at the gate (no permits) until the test opens it.
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let most_running = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let consumer = {
        let (gate, entered, running, most_running, handled) = (
            gate.clone(),
            entered.clone(),
            running.clone(),
            most_running.clone(),
            handled.clone(),
        );
        Running::start(
            &bus,
            COMMAND_INTAKE_QUEUE,
            bus::ConsumeOptions {
                prefetch: BOUND as u16,
                concurrency: BOUND as usize,
                max_retries: 0,
                consumer_tag_prefix: "bus-test-backpressure".to_owned(),
                delayed_retry_rounds: 0,
                ..bus::ConsumeOptions::default()
            },
            Arc::new(FnHandler(move |_msg: bus::Incoming| {
                entered.fetch_add(1, Ordering::SeqCst);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most_running.fetch_max(now, Ordering::SeqCst);
                let (gate, running, handled) = (gate.clone(), running.clone(), handled.clone());
                async move {
                    let passed = gate.acquire().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    if passed.is_err() {
                        return Outcome::Retry {
                            reason: "the gate was closed".to_owned(),
                        };
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
                    Outcome::Ack
                }
            })),
        )
    };

    // The broker holds back everything beyond the prefetch.
    testkit::wait_until(
        "the broker to report 5 unacked and 25 ready",
        DEADLINE,
        || async {
            let counts = vhost.queue_counts(COMMAND_INTAKE_QUEUE).await?;
            Ok((counts == (MESSAGES - BOUND, BOUND)).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        entered.load(Ordering::SeqCst),
        BOUND as usize,
        "handlers entered while all of them block"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0, "nothing passed the gate");

    // Open the gate: every handler that passes gives its permit back for the next one.
    gate.add_permits(BOUND as usize);
    testkit::wait_until("all 30 messages to be handled", DEADLINE, || {
        let n = handled.load(Ordering::SeqCst);
        async move { Ok((n == MESSAGES as usize).then_some(())) }
    })
    .await?;
    testkit::wait_until("the queue to be empty", DEADLINE, || async {
        let counts = vhost.queue_counts(COMMAND_INTAKE_QUEUE).await?;
        Ok((counts == (0, 0)).then_some(()))
    })
    .await?;
    consumer.stop().await?;

    assert_eq!(
        entered.load(Ordering::SeqCst),
        MESSAGES as usize,
        "each message handled once"
    );
    assert!(
        most_running.load(Ordering::SeqCst) <= BOUND as usize,
        "at most {BOUND} handlers at once, saw {}",
        most_running.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Acks are sent several at once where they can be, but a delivery that finished
/// behind one still being handled is acknowledged at once: held back, it would keep
/// its prefetch slot and, with a slow first message, stall the queue.
#[tokio::test]
async fn a_slow_message_does_not_hold_back_the_acks_of_those_after_it() -> anyhow::Result<()> {
    let (vhost, bus) = connected().await?;
    let (slow, quick, third) = (new_id(), new_id(), new_id());
    for id in [&slow, &quick, &third] {
        publish_command(&bus, "order.place", id.clone()).await?;
    }
    let seen = Seen::default();
    let consumer = {
        let (seen, slow, third) = (seen.clone(), slow.clone(), third.clone());
        Running::start(
            &bus,
            COMMAND_INTAKE_QUEUE,
            bus::ConsumeOptions {
                // Room for two unacknowledged deliveries: the third arrives only once
                // the quick one's ack has reached the broker.
                prefetch: 2,
                concurrency: 2,
                max_retries: 0,
                consumer_tag_prefix: "bus-test-ack-order".to_owned(),
                delayed_retry_rounds: 0,
                ..bus::ConsumeOptions::default()
            },
            Arc::new(FnHandler(move |msg: bus::Incoming| {
                let (seen, slow, third) = (seen.clone(), slow.clone(), third.clone());
                async move {
                    if msg.message_id.as_deref() == Some(slow.as_str()) {
                        let waited = seen.wait_for_id(&third).await;
                        if waited.is_err() {
                            return Outcome::Retry {
                                reason: "the third message never came".to_owned(),
                            };
                        }
                    }
                    seen.push(msg);
                    Outcome::Ack
                }
            })),
        )
    };
    seen.wait_for_id(&slow).await?;
    assert_eq!(
        seen.ids(),
        vec![quick, third, slow],
        "the quick message's ack let the third in while the slow one was being handled"
    );
    testkit::wait_until("the queue to be empty", DEADLINE, || async {
        let counts = vhost.queue_counts(COMMAND_INTAKE_QUEUE).await?;
        Ok((counts == (0, 0)).then_some(()))
    })
    .await?;
    consumer.stop().await?;
    Ok(())
}
