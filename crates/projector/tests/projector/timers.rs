use chrono::{DateTime, Utc};
use domain::commands::ApproveOrder;
use domain::events::{PaymentCaptured, PaymentRequested};
use domain::{streams, DomainEvent, OrderInput};
use projector::timers::{TimersProjection, DELIVERY, PAYMENT_TIMEOUT, REVIEW_EXPIRY};
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

/// The database keeps microseconds.
fn same_instant(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    (a - b).num_microseconds().is_some_and(|d| d.abs() <= 1)
}

fn requested(order_id: Uuid, expires_at: DateTime<Utc>) -> DomainEvent {
    DomainEvent::PaymentRequested(PaymentRequested {
        order_id,
        amount_cents: 100,
        currency: "EUR".to_owned(),
        payment_token: "tok_ok".to_owned(),
        expires_at,
    })
}

fn captured(order_id: Uuid) -> DomainEvent {
    DomainEvent::PaymentCaptured(PaymentCaptured {
        order_id,
        amount_cents: 100,
        gateway_reference: "sim".to_owned(),
        unwanted: false,
    })
}

#[tokio::test]
async fn review_schedules_an_expiry_timer_and_approval_removes_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", 1, 500_000)], true).await?;
    catch_up(store, &TimersProjection).await?;

    let sent = last_of(store, &streams::order(order.order_id), "OrderSentForReview").await?;
    let expires_at = order
        .state
        .review_expires_at
        .ok_or_else(|| anyhow::anyhow!("not under review"))?;
    let timers = timer_rows(store).await?;
    assert_eq!(timers.len(), 1, "{timers:?}");
    let (timer_id, kind, order_id, due_at) = &timers[0];
    assert_eq!((kind.as_str(), *order_id), (REVIEW_EXPIRY, order.order_id));
    assert_eq!(*timer_id, sent.event_id, "the timer's id is its event's");
    assert!(
        same_instant(*due_at, expires_at),
        "{due_at} vs {expires_at}"
    );

    order
        .order(OrderInput::Approve(ApproveOrder {
            order_id: order.order_id,
            reviewer: "rita".to_owned(),
        }))
        .await?;
    catch_up(store, &TimersProjection).await?;
    assert!(timer_rows(store).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_payment_request_schedules_a_timeout_and_its_capture_removes_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let (o1, o2) = (Uuid::new_v4(), Uuid::new_v4());
    let expires_at = Utc::now() + chrono::Duration::seconds(30);
    append(store, &streams::payment(o1), &[requested(o1, expires_at)]).await?;
    append(store, &streams::payment(o2), &[requested(o2, expires_at)]).await?;
    catch_up(store, &TimersProjection).await?;
    let timers = timer_rows(store).await?;
    assert_eq!(timers.len(), 2);
    for (_, kind, _, due_at) in &timers {
        assert_eq!(kind, PAYMENT_TIMEOUT);
        assert!(same_instant(*due_at, expires_at));
    }

    append(store, &streams::payment(o1), &[captured(o1)]).await?;
    catch_up(store, &TimersProjection).await?;
    let left: Vec<Uuid> = timer_rows(store).await?.into_iter().map(|t| t.2).collect();
    assert_eq!(left, vec![o2], "only the captured payment's timer is gone");
    Ok(())
}

#[tokio::test]
async fn a_request_captured_in_the_same_page_leaves_no_timer() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let o = Uuid::new_v4();
    append(
        store,
        &streams::payment(o),
        &[
            requested(o, Utc::now() + chrono::Duration::seconds(30)),
            captured(o),
        ],
    )
    .await?;
    catch_up(store, &TimersProjection).await?;
    assert!(timer_rows(store).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn shipping_schedules_a_delivery_timer_and_delivery_removes_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 5).await?;
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", 1, 100)], true).await?;
    order.reserve_all().await?;
    order.capture(100).await?;
    catch_up(store, &TimersProjection).await?;
    assert!(
        timer_rows(store).await?.is_empty(),
        "captured: no payment timer"
    );

    let deliver_at = Utc::now() + chrono::Duration::seconds(2);
    order.ship(deliver_at).await?;
    catch_up(store, &TimersProjection).await?;
    let shipped = last_of(store, &streams::shipment(order.order_id), "ShipmentShipped").await?;
    let timers = timer_rows(store).await?;
    assert_eq!(timers.len(), 1);
    assert_eq!(timers[0].0, shipped.event_id);
    assert_eq!(timers[0].1, DELIVERY);
    assert_eq!(timers[0].2, order.order_id);
    assert!(same_instant(timers[0].3, deliver_at));

    order.deliver().await?;
    catch_up(store, &TimersProjection).await?;
    assert!(timer_rows(store).await?.is_empty());
    Ok(())
}

/// The timer scheduler waits on the store's wake-ups, and a timer row is written by
/// the projector after the append that asked for it woke everyone: the live projector
/// wakes the followers again when it commits a page of the timers projection, so the
/// scheduler sees a timer due now at once instead of at the next append or its idle
/// cap.
#[tokio::test]
async fn committing_a_page_of_timers_wakes_the_followers_of_the_log() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    // As the timer scheduler follows: woken by pages of timers, not by appends.
    let mut wakeups = store.follow_projections().await?;
    let order_id = Uuid::new_v4();
    append(
        store,
        &streams::payment(order_id),
        &[requested(order_id, Utc::now())],
    )
    .await?;
    wait_readable(store).await?;
    assert_eq!(
        wakeups.wait(std::time::Duration::from_millis(300)).await,
        eventstore::Wake::TimedOut,
        "an append in this process does not wake a follower of projections"
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let projector = tokio::spawn(projector::run(
        store.clone(),
        vec![std::sync::Arc::new(TimersProjection)],
        async move {
            let _ = stopped.await;
        },
    ));
    assert_eq!(
        wakeups.wait(DEADLINE).await,
        eventstore::Wake::Signalled,
        "the page of timers woke the followers"
    );
    let rows = timer_rows(store).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let _ = stop.send(());
    projector.await??;
    Ok(())
}
