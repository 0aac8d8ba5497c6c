//! `order.cancel`: accepted while pending, under review or confirmed; refused after.

use serde_json::json;
use uuid::Uuid;

use crate::compensation::net_captured;
use crate::harness::{order, order_stream, payment_stream, shipment_stream, System, DEADLINE};

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_order_cancelled_by_the_customer_releases_its_stock() -> anyhow::Result<()> {
    // tok_timeout keeps the payment (and the order) pending; the timeout is the default 30s.
    let system = System::start(&[]).await?;
    system.set_stock("DESK", 3).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("DESK", 2, 15_000)],
            "tok_timeout",
            Some("standard"),
        ))
        .await?;
    system.wait_stock("DESK", (1, 2)).await?;
    assert_eq!(
        system.status(id).await?.map(|(s, _)| s).as_deref(),
        Some("pending")
    );
    // stock.set sets the free units and leaves the reservation as it is.
    system.set_stock("DESK", 5).await?;
    system.wait_stock("DESK", (5, 2)).await?;

    system
        .send(
            "order.cancel",
            json!({"order_id": id, "reason": "changed my mind"}),
        )
        .await?;
    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("customer_cancelled"));
    system.wait_stock("DESK", (7, 0)).await?;
    let payments = system.events(&payment_stream(id)).await?;
    assert_eq!(net_captured(&payments), 0, "{payments:?}");
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_under_review_can_be_cancelled_by_the_customer() -> anyhow::Result<()> {
    let system = System::start(&[("ORDERFLOW_REVIEW_THRESHOLD_CENTS", "50000")]).await?;
    system.set_stock("TV", 2).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("TV", 1, 80_000)], "tok_ok", Some("standard")))
        .await?;
    system.wait_status(id, "under_review", DEADLINE).await?;

    system
        .send(
            "order.cancel",
            json!({"order_id": id, "reason": "too expensive"}),
        )
        .await?;
    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("customer_cancelled"));
    system.wait_stock("TV", (2, 0)).await?;
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        0
    );
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_delivered_order_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("BIKE", 1).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("BIKE", 1, 30_000)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;
    system.wait_status(id, "delivered", DEADLINE).await?;
    let before: (String, Option<String>, i64) = sqlx::query_as(
        "SELECT status, cancel_reason, last_global_position FROM order_status WHERE order_id = $1",
    )
    .bind(id)
    .fetch_one(system.pool())
    .await?;

    system
        .send(
            "order.cancel",
            json!({"order_id": id, "reason": "too late"}),
        )
        .await?;
    system
        .wait_event(&order_stream(id), "OrderCommandRefused", 1)
        .await?;
    let types = system.event_types(&order_stream(id)).await?;
    assert_eq!(
        types.last().map(String::as_str),
        Some("OrderCommandRefused"),
        "{types:?}"
    );
    assert_eq!(system.count(&order_stream(id), "OrderCancelled").await?, 0);
    // The refusal is projected (or skipped) without changing the row's business fields.
    let after: (String, Option<String>) =
        sqlx::query_as("SELECT status, cancel_reason FROM order_status WHERE order_id = $1")
            .bind(id)
            .fetch_one(system.pool())
            .await?;
    assert_eq!(after, (before.0, before.1));
    assert_eq!(
        system.count(&payment_stream(id), "PaymentRefunded").await?,
        0
    );
    system.wait_stock("BIKE", (0, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_order_cancelled_by_the_customer_is_compensated_and_never_ships(
) -> anyhow::Result<()> {
    // Shipping does not run at first, so the order stays `confirmed` for the cancel.
    let everything_but_shipping = [
        "projector",
        "relay",
        "timers",
        "commands",
        "order",
        "inventory",
        "payment",
        "notification",
    ];
    let mut system = System::start_only(&[], &everything_but_shipping).await?;
    system.set_stock("HELD", 5).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("HELD", 2, 1_500)], "tok_ok", Some("standard")))
        .await?;
    system.wait_status(id, "confirmed", DEADLINE).await?;
    system.wait_stock("HELD", (3, 2)).await?;

    system
        .send(
            "order.cancel",
            json!({"order_id": id, "reason": "found it cheaper"}),
        )
        .await?;
    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("customer_cancelled"));
    system.wait_stock("HELD", (5, 0)).await?;
    let payments = testkit::wait_until("the refund", DEADLINE, || async {
        let payments = system.events(&payment_stream(id)).await?;
        Ok(payments
            .iter()
            .any(|(t, _)| t == "PaymentRefunded")
            .then_some(payments))
    })
    .await?;
    assert_eq!(net_captured(&payments), 0, "{payments:?}");

    // Shipping comes up with the order's OrderConfirmed still queued: it must not ship.
    system.kill_worker().await?;
    system.set_workers(&[]);
    system.start_worker().await?;
    testkit::wait_until("the shipping queue to drain", DEADLINE, || async {
        Ok((system.queue_depth("orderflow.shipping").await? == 0).then_some(()))
    })
    .await?;
    assert!(
        system.events(&shipment_stream(id)).await?.is_empty(),
        "a cancelled order was shipped"
    );
    assert_eq!(
        system
            .wait_status(id, "cancelled", DEADLINE)
            .await?
            .as_deref(),
        Some("customer_cancelled")
    );
    system.audit().await
}
