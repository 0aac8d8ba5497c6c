//! Orders at or above the review threshold wait for a human decision.

use serde_json::json;
use uuid::Uuid;

use crate::harness::{order, order_stream, payment_stream, System, DEADLINE};

const THRESHOLD: (&str, &str) = ("ORDERFLOW_REVIEW_THRESHOLD_CENTS", "50000");

#[tokio::test(flavor = "multi_thread")]
async fn an_approved_order_at_the_threshold_proceeds_to_delivery() -> anyhow::Result<()> {
    let system = System::start(&[THRESHOLD]).await?;
    system.set_stock("RING", 2).await?;
    system.set_stock("NECKLACE", 2).await?;
    let id = Uuid::new_v4();
    // Exactly the threshold: reviewed.
    system
        .place(order(
            id,
            &[("RING", 1, 50_000)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;
    system.wait_status(id, "under_review", DEADLINE).await?;
    // Nothing is reserved or charged before the decision.
    assert_eq!(system.stock("RING").await?, Some((2, 0)));
    assert!(system.events(&payment_stream(id)).await?.is_empty());

    system
        .send(
            "order.approve",
            json!({"order_id": id, "reviewer": "alice"}),
        )
        .await?;
    assert_eq!(system.wait_status(id, "delivered", DEADLINE).await?, None);
    system.wait_stock("RING", (1, 0)).await?;
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        1
    );

    // A digital order above the threshold ends completed once approved.
    let digital = Uuid::new_v4();
    system
        .place(order(digital, &[("NECKLACE", 1, 70_000)], "tok_ok", None))
        .await?;
    system
        .wait_status(digital, "under_review", DEADLINE)
        .await?;
    system
        .send(
            "order.approve",
            json!({"order_id": digital, "reviewer": "bob"}),
        )
        .await?;
    assert_eq!(
        system.wait_status(digital, "completed", DEADLINE).await?,
        None
    );
    system.wait_stock("NECKLACE", (1, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_review_cancels_the_order() -> anyhow::Result<()> {
    let system = System::start(&[THRESHOLD]).await?;
    system.set_stock("WATCH", 2).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("WATCH", 1, 99_000)],
            "tok_ok",
            Some("express"),
        ))
        .await?;
    system.wait_status(id, "under_review", DEADLINE).await?;

    system
        .send(
            "order.reject",
            json!({"order_id": id, "reviewer": "carol", "reason": "suspicious"}),
        )
        .await?;
    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("review_rejected"));
    assert_eq!(system.stock("WATCH").await?, Some((2, 0)));
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        0
    );
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecided_review_expires_and_cancels_the_order() -> anyhow::Result<()> {
    let system = System::start(&[THRESHOLD, ("ORDERFLOW_REVIEW_TIMEOUT", "1s")]).await?;
    system.set_stock("SOFA", 1).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("SOFA", 1, 120_000)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;
    system.wait_status(id, "under_review", DEADLINE).await?;

    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("review_expired"));
    assert_eq!(system.stock("SOFA").await?, Some((1, 0)));
    assert_eq!(system.count(&order_stream(id), "OrderAccepted").await?, 0);
    system.audit().await
}
