//! The parking lot (`services::parking`) against a real PostgreSQL: a message whose
//! retries ran out parks its order (idempotently), the order's later messages wait
//! behind it, other orders pass, the drainer replays them in order once the cause is
//! fixed and unparks the order; a replay that fails again leaves it parked.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bus::{Handler, Incoming, Outcome};
use futures::future::BoxFuture;
use services::parking::{drain, list, resume, still_parked, Parking, ParkingLot};
use testkit::TestDb;
use tokio::sync::oneshot;
use uuid::Uuid;

const QUEUE: &str = "test.queue";
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// Handles messages whose body is an order id; fails those of `poisoned` while broken.
struct Recorder {
    handled: Arc<Mutex<Vec<String>>>,
    broken: Arc<AtomicBool>,
    poisoned: Uuid,
}

impl Handler for Recorder {
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let failing = self.broken.load(Ordering::SeqCst) && order_of(&msg) == Some(self.poisoned);
        let handled = self.handled.clone();
        Box::pin(async move {
            if failing {
                return Outcome::Retry {
                    reason: "still broken".to_owned(),
                };
            }
            let id = msg.message_id.unwrap_or_default();
            handled.lock().unwrap_or_else(|e| e.into_inner()).push(id);
            Outcome::Ack
        })
    }
}

fn order_of(msg: &Incoming) -> Option<Uuid> {
    Uuid::parse_str(std::str::from_utf8(&msg.body).ok()?).ok()
}

fn message(id: &str, order_id: Uuid) -> Incoming {
    Incoming {
        exchange: "orderflow.commands".into(),
        routing_key: "order.cancel".into(),
        body: order_id.to_string().into_bytes(),
        message_id: Some(id.to_owned()),
        ..Incoming::default()
    }
}

async fn waiting(db: &TestDb, order_id: Uuid) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT message_id FROM parked_messages
          WHERE order_id = $1 AND replayed_at IS NULL ORDER BY seq",
    )
    .bind(order_id)
    .fetch_all(db.pool())
    .await?)
}

#[tokio::test]
async fn a_parked_order_waits_in_order_and_is_replayed_after_the_cause_is_fixed(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (poisoned, other) = (Uuid::new_v4(), Uuid::new_v4());
    let handled = Arc::new(Mutex::new(Vec::new()));
    let broken = Arc::new(AtomicBool::new(true));
    let inner: Arc<dyn Handler> = Arc::new(Recorder {
        handled: handled.clone(),
        broken: broken.clone(),
        poisoned,
    });
    let lot = ParkingLot::new(db.pool().clone(), QUEUE, "commands");
    let parking = Parking::new(lot.clone(), inner.clone(), order_of);
    let seen = || handled.lock().unwrap_or_else(|e| e.into_inner()).clone();

    // The first message's retries ran out: it parks its order; twice is harmless.
    for _ in 0..2 {
        let park = parking
            .park(&message("m1", poisoned), "boom", 4)
            .ok_or_else(|| anyhow::anyhow!("a message with an order can be parked"))?;
        park.await.map_err(anyhow::Error::msg)?;
    }
    assert_eq!(waiting(&db, poisoned).await?, ["m1"]);
    // Its later messages wait behind it; another order's pass.
    assert_eq!(parking.handle(message("m2", poisoned)).await, Outcome::Ack);
    assert_eq!(parking.handle(message("o1", other)).await, Outcome::Ack);
    assert_eq!(waiting(&db, poisoned).await?, ["m1", "m2"]);
    assert_eq!(seen(), ["o1"]);
    let listed = list(db.pool()).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].order_id, listed[0].waiting), (poisoned, 2));
    assert_eq!(listed[0].error, "boom");

    let (stop, stopped) = oneshot::channel::<()>();
    let drainer = tokio::spawn(drain(lot, inner, async {
        let _ = stopped.await;
    }));
    // The automatic replay (after a second) fails again: still parked, new error.
    testkit::wait_until("an automatic replay to fail", DEADLINE, || async {
        let rounds: i32 =
            sqlx::query_scalar("SELECT rounds FROM parked_orders WHERE order_id = $1")
                .bind(poisoned)
                .fetch_one(db.pool())
                .await?;
        Ok((rounds >= 1).then_some(()))
    })
    .await?;
    assert_eq!(
        still_parked(db.pool(), poisoned).await?.as_deref(),
        Some("still broken")
    );
    assert_eq!(waiting(&db, poisoned).await?, ["m1", "m2"]);

    broken.store(false, Ordering::SeqCst);
    assert_eq!(resume(db.pool(), poisoned).await?, 1);
    testkit::wait_until("the order to be unparked", DEADLINE, || async {
        Ok(still_parked(db.pool(), poisoned)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    assert_eq!(seen(), ["o1", "m1", "m2"], "replayed in arrival order");
    assert_eq!(resume(db.pool(), poisoned).await?, 0, "no longer parked");
    assert_eq!(parking.handle(message("m3", poisoned)).await, Outcome::Ack);
    assert_eq!(seen(), ["o1", "m1", "m2", "m3"], "handled at once again");
    assert!(waiting(&db, poisoned).await?.is_empty());

    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, drainer).await??;
    Ok(())
}

#[tokio::test]
async fn a_message_without_an_order_is_not_parked() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let inner: Arc<dyn Handler> = Arc::new(Recorder {
        handled: Arc::default(),
        broken: Arc::new(AtomicBool::new(false)),
        poisoned: Uuid::new_v4(),
    });
    let parking = Parking::new(
        ParkingLot::new(db.pool().clone(), QUEUE, "commands"),
        inner,
        order_of,
    );
    let stock = Incoming {
        routing_key: "stock.set".into(),
        body: br#"{"sku":"A","quantity":1}"#.to_vec(),
        ..Incoming::default()
    };
    assert!(parking.park(&stock, "boom", 4).is_none());
    Ok(())
}

/// Handles every message, slowly, noting how many run at once.
struct Slow {
    handled: Arc<Mutex<Vec<String>>>,
    running: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
    starts: testkit::Starts,
}

impl Handler for Slow {
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let (handled, running, most, starts) = (
            self.handled.clone(),
            self.running.clone(),
            self.most.clone(),
            self.starts.clone(),
        );
        Box::pin(async move {
            let started = starts.start();
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // Busy until the next message starts: a second replay running at the same
            // time would show in `most`.
            starts
                .next_after(started, std::time::Duration::from_millis(30))
                .await;
            handled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(msg.message_id.unwrap_or_default());
            running.fetch_sub(1, Ordering::SeqCst);
            Outcome::Ack
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_drainers_replay_an_order_once_in_order_and_a_message_arriving_meanwhile_comes_last(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let second = db.second_store().await?;
    let order = Uuid::new_v4();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner: Arc<dyn Handler> = Arc::new(Slow {
        handled: handled.clone(),
        running: Arc::default(),
        most: most.clone(),
        starts: testkit::Starts::default(),
    });
    let lot = ParkingLot::new(db.pool().clone(), QUEUE, "commands");
    let other_lot = ParkingLot::new(second.pool().clone(), QUEUE, "commands");
    let parking = Parking::new(lot.clone(), inner.clone(), order_of);
    let parked: Vec<String> = (1..=6).map(|n| format!("m{n}")).collect();
    let first = parking
        .park(&message(&parked[0], order), "boom", 4)
        .ok_or_else(|| anyhow::anyhow!("parkable"))?;
    first.await.map_err(anyhow::Error::msg)?;
    for id in &parked[1..] {
        assert_eq!(parking.handle(message(id, order)).await, Outcome::Ack);
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let drainers = [
        tokio::spawn(drain(lot, inner.clone(), until_stopped(stopped.clone()))),
        tokio::spawn(drain(other_lot, inner, until_stopped(stopped.clone()))),
    ];
    assert_eq!(resume(db.pool(), order).await?, 1);
    // Wait until the replay is under way, then send one more message of the order.
    testkit::wait_until("the replay to start", DEADLINE, || async {
        Ok((!handled.lock().unwrap_or_else(|e| e.into_inner()).is_empty()).then_some(()))
    })
    .await?;
    assert_eq!(parking.handle(message("late", order)).await, Outcome::Ack);
    testkit::wait_until("the order to be unparked", DEADLINE, || async {
        Ok(still_parked(db.pool(), order)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let _ = stop.send(true);
    for drainer in drainers {
        tokio::time::timeout(DEADLINE, drainer).await??;
    }

    let mut expected = parked.clone();
    expected.push("late".to_owned());
    assert_eq!(*handled.lock().unwrap_or_else(|e| e.into_inner()), expected);
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "one replay of the order at a time"
    );
    Ok(())
}

/// Contract section 2: a message whose retries are exhausted ends in the dead-letter
/// queue. Once a parked order's automatic replays are used up, a copy of its failing
/// message goes there (with the reason, its origin and the order that keeps it), while
/// the order stays parked and its messages keep waiting for `resume`.
#[tokio::test]
async fn a_copy_goes_to_the_dead_letter_queue_when_the_automatic_replays_are_used_up(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let vhost = testkit::TestVhost::new().await?;
    let bus = bus::Bus::connect(&vhost.url).await?;
    let poisoned = Uuid::new_v4();
    let inner: Arc<dyn Handler> = Arc::new(Recorder {
        handled: Arc::new(Mutex::new(Vec::new())),
        broken: Arc::new(AtomicBool::new(true)),
        poisoned,
    });
    let lot = ParkingLot::new(db.pool().clone(), QUEUE, "commands");
    let parking = Parking::new(lot.clone(), inner.clone(), order_of);
    let park = parking
        .park(&message("m1", poisoned), "boom", 4)
        .ok_or_else(|| anyhow::anyhow!("a message with an order can be parked"))?;
    park.await.map_err(anyhow::Error::msg)?;
    // As if the earlier automatic replays had failed already: the next one is the last.
    sqlx::query("UPDATE parked_orders SET rounds = $2 - 1, retry_at = now() WHERE order_id = $1")
        .bind(poisoned)
        .bind(services::parking::AUTO_REPLAYS)
        .execute(db.pool())
        .await?;

    let (stop, stopped) = oneshot::channel::<()>();
    let drainer = tokio::spawn(drain(
        lot.with_dead_letter_copies(bus.clone()),
        inner,
        async {
            let _ = stopped.await;
        },
    ));
    let letters = testkit::wait_until("a copy in the dead-letter queue", DEADLINE, || async {
        let letters = bus::dlq_list(&bus, 10).await?;
        Ok((!letters.is_empty()).then_some(letters))
    })
    .await?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.message_id.as_deref(), Some("m1"));
    assert_eq!(
        (letter.exchange.as_str(), letter.routing_key.as_str()),
        ("orderflow.commands", "order.cancel")
    );
    assert!(letter.error.contains("still broken"), "{}", letter.error);
    assert_eq!(letter.body, poisoned.to_string().into_bytes());
    assert_eq!(
        letter.headers.get(services::parking::PARKED_ORDER_HEADER),
        Some(&poisoned.to_string())
    );
    // The order stays parked, its message still first, no longer due by itself.
    assert_eq!(
        still_parked(db.pool(), poisoned).await?.as_deref(),
        Some("still broken")
    );
    assert_eq!(waiting(&db, poisoned).await?, ["m1"]);
    let due: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT retry_at FROM parked_orders WHERE order_id = $1")
            .bind(poisoned)
            .fetch_one(db.pool())
            .await?;
    assert_eq!(due, None, "it waits for an operator");

    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, drainer).await??;
    Ok(())
}

/// Processes remember whether their queue has any parked order for a short while
/// instead of asking for every message; a parking by another process is still seen
/// within that while, and the order's later messages then wait behind it.
#[tokio::test]
async fn another_process_sees_a_parked_order_soon_after_it_parks() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (poisoned, other) = (Uuid::new_v4(), Uuid::new_v4());
    let handled = Arc::new(Mutex::new(Vec::new()));
    let inner: Arc<dyn Handler> = Arc::new(Recorder {
        handled: handled.clone(),
        broken: Arc::new(AtomicBool::new(true)),
        poisoned,
    });
    let here = Parking::new(
        ParkingLot::new(db.pool().clone(), QUEUE, "commands"),
        inner.clone(),
        order_of,
    );
    let elsewhere = Parking::new(
        ParkingLot::new(db.pool().clone(), QUEUE, "commands"),
        inner,
        order_of,
    );
    // The other process has looked already: nothing parked, remembered.
    assert_eq!(elsewhere.handle(message("o1", other)).await, Outcome::Ack);

    let park = here
        .park(&message("m1", poisoned), "boom", 4)
        .ok_or_else(|| anyhow::anyhow!("a message with an order can be parked"))?;
    park.await.map_err(anyhow::Error::msg)?;

    // Until the other process looks again, it hands the order's messages to the
    // (still failing) handler; from then on they wait behind the parked one.
    let mut tries = 0;
    let elsewhere = &elsewhere;
    testkit::wait_until(
        "the other process to see the parked order",
        DEADLINE,
        || {
            tries += 1;
            let next = message(&format!("m{}", tries + 1), poisoned);
            async move { Ok((elsewhere.handle(next).await == Outcome::Ack).then_some(tries)) }
        },
    )
    .await?;
    let waiting = waiting(&db, poisoned).await?;
    assert_eq!(
        waiting.len(),
        2,
        "the first message and the one that waits behind it"
    );
    assert_eq!(waiting[0], "m1");
    Ok(())
}
