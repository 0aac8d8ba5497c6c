use std::sync::Arc;
use std::time::Duration;

use domain::commands::CancelOrder;
use domain::{payment::capture_key, streams, OrderInput};
use services::gateway::{CaptureOutcome, CaptureRequest, PaymentGateway, Simulator};
use services::payment::Payments;
use testkit::TestDb;

use crate::support::*;

fn payments(db: &TestDb) -> Payments {
    let gateway: Arc<dyn PaymentGateway> =
        Arc::new(Simulator::new(db.pool().clone(), Duration::ZERO, 0.0));
    Payments::new(db.store.clone(), gateway)
}

/// A capture under the order's capture key, straight at the gateway: one made by a
/// worker that died before recording it, or one still in flight.
async fn capture_at_gateway(
    db: &TestDb,
    order_id: uuid::Uuid,
    amount_cents: i64,
) -> anyhow::Result<CaptureOutcome> {
    Ok(Simulator::new(db.pool().clone(), Duration::ZERO, 0.0)
        .capture(CaptureRequest {
            idempotency_key: capture_key(order_id),
            token: "tok_ok".to_owned(),
            amount_cents,
            currency: "EUR".to_owned(),
        })
        .await?)
}

/// A capture still in flight reaches the gateway only after the payment was voided: it
/// is refused, and no money moved.
async fn assert_a_late_capture_is_refused(db: &TestDb, order_id: uuid::Uuid) -> anyhow::Result<()> {
    let late = capture_at_gateway(db, order_id, 2_500).await?;
    assert!(matches!(late, CaptureOutcome::Declined { .. }), "{late:?}");
    assert_eq!(net_ledger(db, order_id).await?, 0);
    Ok(())
}

async fn net_ledger(db: &TestDb, order_id: uuid::Uuid) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM gateway_ledger WHERE idempotency_key LIKE '%' || $1",
    )
    .bind(order_id.to_string())
    .fetch_one(db.pool())
    .await?)
}

#[tokio::test]
async fn a_capture_made_before_a_crash_is_recorded_once_and_not_charged_again() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let (order_id, _) = place(&db.store, "tok_ok", vec![line("A", 2, 1_500)]).await?;
    let accepted = envelope(&db.store, &streams::order(order_id), "OrderAccepted").await?;

    // the crash window: the gateway captured, the worker died before PaymentCaptured
    let before = capture_at_gateway(&db, order_id, 3_000).await?;
    let CaptureOutcome::Captured { reference } = before else {
        anyhow::bail!("not captured: {before:?}");
    };

    // the restarted payment service handles the OrderAccepted (redelivered) again, twice
    let service = payments(&db);
    service.react(&accepted).await?;
    service.react(&accepted).await?;

    let payment = stream(&db.store, &streams::payment(order_id)).await?;
    let kinds: Vec<&str> = payment.iter().map(|r| r.event_type.as_str()).collect();
    assert_eq!(kinds, ["PaymentRequested", "PaymentCaptured"]);
    assert_eq!(payment[1].payload["gateway_reference"], reference.as_str());
    assert_eq!(payment[1].payload["amount_cents"], 3_000);
    assert_eq!(
        ledger(&db.store, &capture_key(order_id)).await?,
        vec![("capture".to_owned(), "captured".to_owned(), 3_000)]
    );
    assert_eq!(net_ledger(&db, order_id).await?, 3_000);
    Ok(())
}

#[tokio::test]
async fn an_order_cancelled_after_capture_is_voided_then_refunded_to_zero() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, order) = place(&db.store, "tok_ok", vec![line("A", 1, 999)]).await?;
    let service = payments(&db);
    service
        .react(&envelope(&db.store, &streams::order(order_id), "OrderAccepted").await?)
        .await?;
    assert_eq!(net_ledger(&db, order_id).await?, 999);

    decide_order(
        &db.store,
        order_id,
        order,
        OrderInput::Cancel(CancelOrder {
            order_id,
            reason: "changed my mind".to_owned(),
        }),
    )
    .await?;
    let cancelled = envelope(&db.store, &streams::order(order_id), "OrderCancelled").await?;
    service.react(&cancelled).await?;
    service.react(&cancelled).await?;

    assert_eq!(
        types(&db.store, &streams::payment(order_id)).await?,
        [
            "PaymentRequested",
            "PaymentCaptured",
            "PaymentVoided",
            "PaymentRefunded"
        ]
    );
    let refunded = envelope(&db.store, &streams::payment(order_id), "PaymentRefunded").await?;
    let domain::DomainEvent::PaymentRefunded(r) = refunded.event else {
        anyhow::bail!("not a refund");
    };
    assert_eq!(r.amount_cents, 999);
    assert_eq!(
        net_ledger(&db, order_id).await?,
        0,
        "money captured net of refunds"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM gateway_ledger")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(rows, 2, "one capture, one refund");
    Ok(())
}

#[tokio::test]
async fn a_flaky_gateway_is_retried_until_it_captures_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, _) = place(&db.store, "tok_flaky", vec![line("A", 1, 500)]).await?;
    let accepted = envelope(&db.store, &streams::order(order_id), "OrderAccepted").await?;
    tokio::time::timeout(crate::support::DEADLINE, payments(&db).react(&accepted)).await??;
    assert_eq!(
        types(&db.store, &streams::payment(order_id)).await?,
        ["PaymentRequested", "PaymentCaptured"]
    );
    assert_eq!(ledger(&db.store, &capture_key(order_id)).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_declined_token_records_a_declined_payment() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, _) = place(&db.store, "tok_decline", vec![line("A", 1, 500)]).await?;
    let accepted = envelope(&db.store, &streams::order(order_id), "OrderAccepted").await?;
    payments(&db).react(&accepted).await?;
    assert_eq!(
        types(&db.store, &streams::payment(order_id)).await?,
        ["PaymentRequested", "PaymentDeclined"]
    );
    assert_eq!(net_ledger(&db, order_id).await?, 0);
    Ok(())
}

/// Records the payment request as the payment service would, without capturing.
async fn request_only(db: &TestDb, order_id: uuid::Uuid, amount_cents: i64) -> anyhow::Result<()> {
    append(
        &db.store,
        &streams::payment(order_id),
        &[domain::DomainEvent::PaymentRequested(
            domain::events::PaymentRequested {
                order_id,
                amount_cents,
                currency: "EUR".to_owned(),
                payment_token: "tok_ok".to_owned(),
                expires_at: chrono::Utc::now() + chrono::Duration::seconds(30),
            },
        )],
    )
    .await
}

async fn cancel(
    db: &TestDb,
    order_id: uuid::Uuid,
    order: domain::OrderState,
) -> anyhow::Result<domain::EventEnvelope> {
    decide_order(
        &db.store,
        order_id,
        order,
        OrderInput::Cancel(CancelOrder {
            order_id,
            reason: "changed my mind".to_owned(),
        }),
    )
    .await?;
    envelope(&db.store, &streams::order(order_id), "OrderCancelled").await
}

#[tokio::test]
async fn a_capture_no_event_recorded_is_found_by_the_void_of_a_cancelled_order_and_refunded(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, order) = place(&db.store, "tok_ok", vec![line("A", 1, 2_500)]).await?;
    request_only(&db, order_id, 2_500).await?;
    // A worker captured at the gateway and died before recording it …
    capture_at_gateway(&db, order_id, 2_500).await?;
    // … and the customer cancelled meanwhile.
    let cancelled = cancel(&db, order_id, order).await?;
    payments(&db).react(&cancelled).await?;

    let kinds = types(&db.store, &streams::payment(order_id)).await?;
    assert_eq!(
        kinds,
        [
            "PaymentRequested",
            "PaymentVoided",
            "PaymentCaptured",
            "PaymentRefunded"
        ]
    );
    let captured = stream(&db.store, &streams::payment(order_id)).await?;
    assert_eq!(
        captured[2].payload["unwanted"], true,
        "a capture after the void is not the order's"
    );
    assert_eq!(net_ledger(&db, order_id).await?, 0, "the money went back");
    Ok(())
}

#[tokio::test]
async fn after_the_void_a_late_capture_at_the_gateway_is_refused() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, order) = place(&db.store, "tok_ok", vec![line("A", 1, 2_500)]).await?;
    request_only(&db, order_id, 2_500).await?;
    let cancelled = cancel(&db, order_id, order).await?;
    payments(&db).react(&cancelled).await?;
    assert_eq!(
        types(&db.store, &streams::payment(order_id)).await?,
        ["PaymentRequested", "PaymentVoided", "PaymentCaptureVoided"]
    );
    assert_a_late_capture_is_refused(&db, order_id).await?;
    Ok(())
}

#[tokio::test]
async fn a_payment_is_requested_and_captured_in_one_append() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, _) = place(&db.store, "tok_ok", vec![line("A", 1, 700)]).await?;
    let accepted = envelope(&db.store, &streams::order(order_id), "OrderAccepted").await?;
    payments(&db).react(&accepted).await?;
    let payment = stream(&db.store, &streams::payment(order_id)).await?;
    let kinds: Vec<&str> = payment.iter().map(|r| r.event_type.as_str()).collect();
    assert_eq!(kinds, ["PaymentRequested", "PaymentCaptured"]);
    assert_eq!(
        payment[0].transaction_id, payment[1].transaction_id,
        "the request and its capture were appended apart"
    );
    Ok(())
}

/// The gateway captured for the order and the worker died before recording anything.
async fn captured_before_a_crash(db: &TestDb, order_id: uuid::Uuid) -> anyhow::Result<()> {
    let outcome = capture_at_gateway(db, order_id, 2_500).await?;
    anyhow::ensure!(
        matches!(outcome, CaptureOutcome::Captured { .. }),
        "not captured: {outcome:?}"
    );
    Ok(())
}

/// An accepted order the customer cancelled before anything of its payment was
/// recorded (its payment voided up front), after a capture at the gateway when
/// `captured` (a handler that died before recording it); and its `OrderAccepted`.
async fn voided_up_front(
    db: &TestDb,
    captured: bool,
) -> anyhow::Result<(uuid::Uuid, domain::EventEnvelope)> {
    let (order_id, order) = place(&db.store, "tok_ok", vec![line("A", 1, 2_500)]).await?;
    let accepted = envelope(&db.store, &streams::order(order_id), "OrderAccepted").await?;
    if captured {
        captured_before_a_crash(db, order_id).await?;
    }
    let cancelled = cancel(db, order_id, order).await?;
    payments(db).react(&cancelled).await?;
    Ok((order_id, accepted))
}

#[tokio::test]
async fn a_capture_made_before_a_crash_is_refunded_when_the_order_was_cancelled_before_its_request(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Then the OrderAccepted is redelivered to a restarted worker.
    let (order_id, accepted) = voided_up_front(&db, true).await?;
    let service = payments(&db);
    service.react(&accepted).await?;
    service.react(&accepted).await?;

    let kinds = types(&db.store, &streams::payment(order_id)).await?;
    assert_eq!(
        kinds,
        [
            "PaymentVoided",
            "PaymentRequested",
            "PaymentCaptured",
            "PaymentRefunded"
        ]
    );
    let payment = stream(&db.store, &streams::payment(order_id)).await?;
    assert_eq!(payment[2].payload["unwanted"], true);
    assert_eq!(net_ledger(&db, order_id).await?, 0, "the money went back");
    Ok(())
}

#[tokio::test]
async fn an_order_cancelled_before_its_payment_requests_nothing_and_refuses_a_late_capture(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, accepted) = voided_up_front(&db, false).await?;
    payments(&db).react(&accepted).await?;
    assert_eq!(
        types(&db.store, &streams::payment(order_id)).await?,
        ["PaymentVoided"]
    );
    assert_a_late_capture_is_refused(&db, order_id).await?;
    Ok(())
}

#[tokio::test]
async fn an_order_cancelled_before_its_payment_is_retried_until_the_gateway_voids_the_key(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (order_id, accepted) = voided_up_front(&db, true).await?;
    // The gateway is down when the OrderAccepted comes again: the capture it holds
    // cannot be known yet, so the message must fail (and be retried), not be done.
    let down: Arc<dyn PaymentGateway> =
        Arc::new(Simulator::new(db.pool().clone(), Duration::ZERO, 1.0));
    let outcome = Payments::new(db.store.clone(), down).react(&accepted).await;
    assert!(
        matches!(outcome, Err(services::ServiceError::Gateway(_))),
        "{outcome:?}"
    );
    assert_eq!(
        types(&db.store, &streams::payment(order_id)).await?,
        ["PaymentVoided"]
    );
    // Its retry, with the gateway back, finds the capture and refunds it.
    payments(&db).react(&accepted).await?;
    assert_eq!(net_ledger(&db, order_id).await?, 0, "the money went back");
    Ok(())
}
