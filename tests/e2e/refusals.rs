//! Commands that decode but break a business rule: recorded as refused, nothing else
//! changes (contract section 2).

use serde_json::json;
use uuid::Uuid;

use crate::harness::{order, order_stream, stock_stream, System, DEADLINE};

#[tokio::test(flavor = "multi_thread")]
async fn approving_an_order_that_is_not_under_review_is_refused() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("CARD", 5).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("CARD", 1, 300)], "tok_ok", None))
        .await?;
    system.wait_status(id, "completed", DEADLINE).await?;

    system
        .send(
            "order.approve",
            json!({"order_id": id, "reviewer": "alice"}),
        )
        .await?;
    system
        .wait_event(&order_stream(id), "OrderCommandRefused", 1)
        .await?;
    assert_eq!(system.count(&order_stream(id), "OrderApproved").await?, 0);
    assert_eq!(
        system.status(id).await?,
        Some(("completed".to_owned(), None))
    );
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_place_with_other_content_is_refused() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("CUP", 10).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("CUP", 1, 400)], "tok_ok", Some("standard")))
        .await?;
    system.wait_status(id, "delivered", DEADLINE).await?;
    let before: (String, i64, i32) = sqlx::query_as(
        "SELECT status, total_cents, item_count FROM order_status WHERE order_id = $1",
    )
    .bind(id)
    .fetch_one(system.pool())
    .await?;

    // Same order id, other content, a new message id.
    system
        .place(order(id, &[("CUP", 5, 400)], "tok_ok", Some("express")))
        .await?;
    system
        .wait_event(&order_stream(id), "OrderCommandRefused", 1)
        .await?;
    assert_eq!(system.count(&order_stream(id), "OrderPlaced").await?, 1);
    let after: (String, i64, i32) = sqlx::query_as(
        "SELECT status, total_cents, item_count FROM order_status WHERE order_id = $1",
    )
    .bind(id)
    .fetch_one(system.pool())
    .await?;
    assert_eq!(after, before);
    system.wait_stock("CUP", (9, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_negative_stock_set_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("NAIL", 7).await?;
    system
        .send("stock.set", json!({"sku": "NAIL", "quantity": -3}))
        .await?;
    let events = testkit::wait_until("the refusal on the stock stream", DEADLINE, || async {
        let events = system.events(&stock_stream("NAIL")).await?;
        Ok((events.len() >= 2).then_some(events))
    })
    .await?;
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[1].0.contains("Refused"), "{events:?}");
    assert_eq!(system.stock("NAIL").await?, Some((7, 0)));
    system.wait_stock("NAIL", (7, 0)).await?;
    system.audit().await
}
