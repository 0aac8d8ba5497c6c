use chrono::{Duration, Utc};
use domain::commands::{Shipping, ShippingMethod};
use domain::events::{PaymentCaptured, PaymentRequested, ShipmentShipped};
use domain::{streams, DomainEvent};
use projector::timers::{TimersProjection, PAYMENT_TIMEOUT};
use services::exec::SharedCaches;
use services::timers::{DueTimer, Scheduler};
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

fn requested(order_id: Uuid, expires_in: Duration) -> DomainEvent {
    DomainEvent::PaymentRequested(PaymentRequested {
        order_id,
        amount_cents: 100,
        currency: "EUR".to_owned(),
        payment_token: "tok_timeout".to_owned(),
        expires_at: Utc::now() + expires_in,
    })
}

async fn count_of(db: &TestDb, stream_name: &str, event_type: &str) -> anyhow::Result<usize> {
    Ok(types(&db.store, stream_name)
        .await?
        .iter()
        .filter(|t| *t == event_type)
        .count())
}

/// A new order's payment stream, requested with a timeout that was due a second ago.
async fn overdue_payment(db: &TestDb) -> anyhow::Result<String> {
    Ok(payment_due_in(db, -Duration::seconds(1)).await?.0)
}

/// A new order's payment stream and order, requested with a timeout due `in_` from now.
async fn payment_due_in(db: &TestDb, in_: Duration) -> anyhow::Result<(String, Uuid)> {
    let order_id = Uuid::new_v4();
    let stream = streams::payment(order_id);
    append(&db.store, &stream, &[requested(order_id, in_)]).await?;
    Ok((stream, order_id))
}

/// The payment timeout of `order_id`'s request, due at `due_at`, as a hand-over.
async fn payment_timer(
    db: &TestDb,
    order_id: Uuid,
    due_at: chrono::DateTime<Utc>,
) -> anyhow::Result<DueTimer> {
    let stream = streams::payment(order_id);
    let records = db.store.read_stream(&stream, 0).await?;
    let [requested] = records.as_slice() else {
        anyhow::bail!("expected one PaymentRequested on {stream}");
    };
    Ok(DueTimer {
        timer_id: requested.event_id,
        kind: PAYMENT_TIMEOUT.to_owned(),
        order_id,
        due_at,
    })
}

/// A database with one payment whose timeout was due a second ago, its timer
/// projected; and the payment's stream.
async fn due_payment_timer() -> anyhow::Result<(TestDb, String)> {
    let db = TestDb::new().await?;
    let stream = overdue_payment(&db).await?;
    catch_up(&db.store, &TimersProjection).await?;
    Ok((db, stream))
}

#[tokio::test]
async fn a_due_payment_timer_fires_once_and_firing_it_again_appends_nothing() -> anyhow::Result<()>
{
    let (db, stream) = due_payment_timer().await?;
    let scheduled = timers(&db.store).await?;
    assert_eq!(scheduled.len(), 1);

    let scheduler = Scheduler::new(db.store.clone());
    assert_eq!(scheduler.fire_due().await?, 1);
    assert_eq!(
        types(&db.store, &stream).await?,
        ["PaymentRequested", "PaymentTimedOut"]
    );
    assert!(timers(&db.store).await?.is_empty(), "a fired timer is gone");
    assert_eq!(scheduler.fire_due().await?, 0);

    // a crash before the row was deleted: the same timer comes back and fires again
    let (timer_id, kind, order, due_at) = &scheduled[0];
    sqlx::query("INSERT INTO timers (timer_id, kind, order_id, due_at, scheduled_at) VALUES ($1, $2, $3, $4, now())")
        .bind(timer_id)
        .bind(kind)
        .bind(order)
        .bind(due_at)
        .execute(db.pool())
        .await?;
    assert_eq!(scheduler.fire_due().await?, 1);
    assert_eq!(
        types(&db.store, &stream).await?,
        ["PaymentRequested", "PaymentTimedOut"]
    );

    // and the projector, seeing PaymentTimedOut, leaves no timer behind
    catch_up(&db.store, &TimersProjection).await?;
    assert!(timers(&db.store).await?.is_empty());
    Ok(())
}

/// A claimed timer is leased, not locked in a transaction left open while it fires: a
/// scheduler that died while firing leaves a lease, and the timer fires again only
/// once the lease has run out.
#[tokio::test]
async fn a_timer_claimed_by_a_scheduler_that_died_fires_once_its_lease_runs_out(
) -> anyhow::Result<()> {
    let (db, stream) = due_payment_timer().await?;
    // Another scheduler claimed it a moment ago, then died.
    sqlx::query("UPDATE timers SET leased_until = now() + interval '1 hour'")
        .execute(db.pool())
        .await?;
    let scheduler = Scheduler::new(db.store.clone());
    assert_eq!(scheduler.fire_due().await?, 0, "leased elsewhere");
    assert_eq!(count_of(&db, &stream, "PaymentTimedOut").await?, 0);

    sqlx::query("UPDATE timers SET leased_until = now() - interval '1 second'")
        .execute(db.pool())
        .await?;
    assert_eq!(scheduler.fire_due().await?, 1, "the lease ran out");
    assert_eq!(count_of(&db, &stream, "PaymentTimedOut").await?, 1);
    assert!(timers(&db.store).await?.is_empty(), "a fired timer is gone");
    Ok(())
}

#[tokio::test]
async fn a_timer_that_is_not_due_does_not_fire() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let order_id = Uuid::new_v4();
    append(
        &db.store,
        &streams::payment(order_id),
        &[requested(order_id, Duration::hours(1))],
    )
    .await?;
    catch_up(&db.store, &TimersProjection).await?;
    assert_eq!(Scheduler::new(db.store.clone()).fire_due().await?, 0);
    assert_eq!(timers(&db.store).await?.len(), 1);
    assert_eq!(
        count_of(&db, &streams::payment(order_id), "PaymentTimedOut").await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn a_payment_timer_that_fires_after_the_capture_has_no_effect() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let order_id = Uuid::new_v4();
    let stream = streams::payment(order_id);
    append(
        &db.store,
        &stream,
        &[requested(order_id, -Duration::seconds(1))],
    )
    .await?;
    catch_up(&db.store, &TimersProjection).await?;
    // captured, but the projector has not removed the timer yet
    append(
        &db.store,
        &stream,
        &[DomainEvent::PaymentCaptured(PaymentCaptured {
            order_id,
            amount_cents: 100,
            gateway_reference: "sim".to_owned(),
            unwanted: false,
        })],
    )
    .await?;
    assert_eq!(Scheduler::new(db.store.clone()).fire_due().await?, 1);
    assert_eq!(
        types(&db.store, &stream).await?,
        ["PaymentRequested", "PaymentCaptured"]
    );
    Ok(())
}

#[tokio::test]
async fn an_expired_review_cancels_the_order_with_review_expired() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, _) =
        place_expiring(&db.store, "tok_ok", vec![line("A", 1, 200_000)], Utc::now()).await?;
    catch_up(&db.store, &TimersProjection).await?;
    assert_eq!(Scheduler::new(db.store.clone()).fire_due().await?, 1);
    let cancelled = envelope(&db.store, &streams::order(order_id), "OrderCancelled").await?;
    let DomainEvent::OrderCancelled(c) = cancelled.event else {
        anyhow::bail!("not a cancellation");
    };
    assert_eq!(c.reason.as_str(), "review_expired");
    Ok(())
}

#[tokio::test]
async fn a_due_delivery_timer_delivers_the_shipment() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let order_id = Uuid::new_v4();
    append(
        &db.store,
        &streams::shipment(order_id),
        &[DomainEvent::ShipmentShipped(ShipmentShipped {
            order_id,
            shipping: Shipping {
                method: ShippingMethod::Express,
                address: "x".to_owned(),
            },
            items: vec![line("A", 1, 1)],
            deliver_at: Utc::now() - Duration::seconds(1),
        })],
    )
    .await?;
    catch_up(&db.store, &TimersProjection).await?;
    assert_eq!(Scheduler::new(db.store.clone()).fire_due().await?, 1);
    assert_eq!(
        types(&db.store, &streams::shipment(order_id)).await?,
        ["ShipmentShipped", "ShipmentDelivered"]
    );
    Ok(())
}

#[tokio::test]
async fn two_schedulers_never_fire_the_same_timer_twice() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    const ORDERS: usize = 40;
    let orders: Vec<Uuid> = (0..ORDERS).map(|_| Uuid::new_v4()).collect();
    for order_id in &orders {
        append(
            &db.store,
            &streams::payment(*order_id),
            &[requested(*order_id, -Duration::seconds(1))],
        )
        .await?;
    }
    catch_up(&db.store, &TimersProjection).await?;
    assert_eq!(timers(&db.store).await?.len(), ORDERS);

    let mut schedulers = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let scheduler = Scheduler::new(db.second_store().await?);
        schedulers.spawn(async move {
            let mut fired = 0;
            loop {
                match scheduler.fire_due().await? {
                    0 => return anyhow::Ok(fired),
                    n => fired += n,
                }
            }
        });
    }
    let mut fired = 0;
    while let Some(result) = schedulers.join_next().await {
        fired += result??;
    }
    assert_eq!(fired, ORDERS, "each timer fired by exactly one scheduler");
    assert!(timers(&db.store).await?.is_empty());
    for order_id in &orders {
        assert_eq!(
            count_of(&db, &streams::payment(*order_id), "PaymentTimedOut").await?,
            1
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_timer_that_cannot_fire_does_not_hold_back_the_others() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (bad, good) = (Uuid::new_v4(), Uuid::new_v4());
    append(
        &db.store,
        &streams::payment(bad),
        &[requested(bad, -Duration::seconds(2))],
    )
    .await?;
    // An event this version cannot read makes the bad stream undecidable.
    db.store
        .append(
            &streams::payment(bad),
            eventstore::ExpectedVersion::Exact(0),
            vec![eventstore::NewEvent {
                event_id: Uuid::new_v4(),
                event_type: "PaymentTeleported".to_owned(),
                schema_version: 1,
                payload: serde_json::json!({}),
                metadata: eventstore::Metadata {
                    correlation_id: bad,
                    causation_id: bad,
                },
            }],
        )
        .await?;
    append(
        &db.store,
        &streams::payment(good),
        &[requested(good, -Duration::seconds(1))],
    )
    .await?;
    catch_up(&db.store, &TimersProjection).await?;

    let scheduler = Scheduler::new(db.store.clone());
    assert_eq!(scheduler.fire_due().await?, 1, "the good timer fires");
    assert_eq!(
        types(&db.store, &streams::payment(good)).await?,
        ["PaymentRequested", "PaymentTimedOut"]
    );
    let left = timers(&db.store).await?;
    assert_eq!(left.len(), 1, "the bad timer waits to be tried again");
    assert!(left[0].3 > Utc::now(), "and is not due at once");
    Ok(())
}

#[tokio::test]
async fn timers_due_together_fire_together_and_share_commits() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    const TIMERS: usize = 20;
    let mut streams_due = Vec::with_capacity(TIMERS);
    for _ in 0..TIMERS {
        streams_due.push(overdue_payment(&db).await?);
    }
    catch_up(&db.store, &TimersProjection).await?;
    // One grouped append in flight at a time: appends made meanwhile wait and go
    // together, which only firings in flight at the same moment can do.
    let scheduler = Scheduler::new(db.store.clone().with_group_commit(1));
    assert_eq!(scheduler.fire_due().await?, TIMERS);
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT transaction_id) FROM events WHERE event_type = 'PaymentTimedOut'",
    )
    .fetch_one(db.pool())
    .await?;
    for stream in &streams_due {
        assert_eq!(
            count_of(&db, stream, "PaymentTimedOut").await?,
            1,
            "{stream}"
        );
    }
    assert!(
        transactions < (TIMERS / 2) as i64,
        "{TIMERS} timers fired in {transactions} transactions"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn timers_handed_over_together_all_fire_once_though_more_than_fire_at_once(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    const TIMERS: usize = 40;
    let caches = SharedCaches::default();
    let scheduler = Scheduler::sharing(db.store.clone(), &caches);
    let (stop, running) = running(scheduler, &caches).await?;
    let mut streams_due = Vec::with_capacity(TIMERS);
    for _ in 0..TIMERS {
        let (stream, order_id) = payment_due_in(&db, -Duration::seconds(1)).await?;
        let timer = payment_timer(&db, order_id, Utc::now() - Duration::seconds(1)).await?;
        assert!(caches.timers.offer(timer, Utc::now()), "handed over");
        streams_due.push(stream);
    }
    // No projector runs, so the table never has them: only the hand-over fires them.
    testkit::wait_until("every handed-over timer to fire", DEADLINE, || async {
        let fired: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'PaymentTimedOut'")
                .fetch_one(db.pool())
                .await?;
        Ok((fired >= TIMERS as i64).then_some(()))
    })
    .await?;
    let _ = stop.send(());
    running.await??;
    for stream in &streams_due {
        assert_eq!(
            types(&db.store, stream).await?,
            ["PaymentRequested", "PaymentTimedOut"]
        );
    }
    Ok(())
}

/// A timer whose row is in the table before it is due (a delivery 2 s out, say) is
/// fired by the memory copy; a claim of its row when it is due leaves the row leased
/// instead of firing the timer a second time at the same moment.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_of_a_timer_held_in_memory_is_left_to_the_memory_copy() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (stream, order_id) = payment_due_in(&db, Duration::seconds(1)).await?;
    catch_up(&db.store, &TimersProjection).await?;
    let caches = SharedCaches::default();
    let scheduler = Scheduler::sharing(db.store.clone(), &caches);
    let (stop, running) = running(std::sync::Arc::clone(&scheduler), &caches).await?;
    // Held in memory, due two seconds after its row.
    let timer = payment_timer(&db, order_id, Utc::now() + Duration::seconds(3)).await?;
    let timer_id = timer.timer_id;
    assert!(caches.timers.offer(timer, Utc::now()));
    testkit::wait_until("the scheduler to hold the timer", DEADLINE, || async {
        Ok(scheduler.holds(timer_id).then_some(()))
    })
    .await?;
    testkit::wait_until("the row to fall due", DEADLINE, || async {
        let due: bool = sqlx::query_scalar("SELECT bool_and(due_at <= now()) FROM timers")
            .fetch_one(db.pool())
            .await?;
        Ok(due.then_some(()))
    })
    .await?;
    assert_eq!(scheduler.fire_due().await?, 0, "held in memory");
    assert_eq!(count_of(&db, &stream, "PaymentTimedOut").await?, 0);

    testkit::wait_until("the memory copy to fire", DEADLINE, || async {
        Ok((count_of(&db, &stream, "PaymentTimedOut").await? == 1).then_some(()))
    })
    .await?;
    let _ = stop.send(());
    running.await??;
    assert_eq!(timers(&db.store).await?.len(), 1, "left to the projector");
    catch_up(&db.store, &TimersProjection).await?;
    assert_eq!(
        timers(&db.store).await?,
        vec![],
        "the projector ended the wait"
    );
    assert_eq!(
        types(&db.store, &stream).await?,
        ["PaymentRequested", "PaymentTimedOut"]
    );
    Ok(())
}
