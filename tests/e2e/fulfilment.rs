//! Orders that go all the way: delivered (physical) or completed (digital).

use serde_json::Value;
use uuid::Uuid;

use crate::harness::{order, order_stream, payment_stream, shipment_stream, System, DEADLINE};

#[tokio::test(flavor = "multi_thread")]
async fn a_physical_order_is_delivered_taking_its_stock_and_capturing_once() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("BOOK", 10).await?;
    system.set_stock("PEN", 5).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("BOOK", 2, 1999), ("PEN", 1, 250)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;

    let reason = system.wait_status(id, "delivered", DEADLINE).await?;
    assert_eq!(reason, None);
    system.wait_stock("BOOK", (8, 0)).await?;
    system.wait_stock("PEN", (4, 0)).await?;

    let row: (String, i64, String, i32) = sqlx::query_as(
        "SELECT customer_id, total_cents, currency, item_count FROM order_status WHERE order_id = $1",
    )
    .bind(id)
    .fetch_one(system.pool())
    .await?;
    assert_eq!(
        row,
        (
            "customer-e2e".to_owned(),
            2 * 1999 + 250,
            "EUR".to_owned(),
            3
        )
    );

    assert_eq!(system.count(&order_stream(id), "OrderPlaced").await?, 1);
    assert_eq!(system.count(&order_stream(id), "OrderConfirmed").await?, 1);
    let payments = system.events(&payment_stream(id)).await?;
    let captured: Vec<&Value> = payments
        .iter()
        .filter(|(t, _)| t == "PaymentCaptured")
        .map(|(_, p)| p)
        .collect();
    assert_eq!(captured.len(), 1, "{payments:?}");
    assert_eq!(captured[0]["amount_cents"], 2 * 1999 + 250);
    assert_eq!(
        system.count(&payment_stream(id), "PaymentRefunded").await?,
        0
    );
    assert_eq!(
        system
            .count(&shipment_stream(id), "ShipmentDelivered")
            .await?,
        1
    );
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digital_order_completes_without_shipping() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("EBOOK", 100).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("EBOOK", 3, 500)], "tok_ok", None))
        .await?;

    assert_eq!(system.wait_status(id, "completed", DEADLINE).await?, None);
    system.wait_stock("EBOOK", (97, 0)).await?;
    assert!(system.events(&shipment_stream(id)).await?.is_empty());
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        1
    );
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_express_order_is_delivered_with_the_express_delay() -> anyhow::Result<()> {
    // Standard delivery would take an hour: only the express delay can deliver in time.
    let system = System::start(&[
        ("ORDERFLOW_DELIVERY_DELAY", "1h"),
        ("ORDERFLOW_EXPRESS_DELIVERY_DELAY", "200ms"),
    ])
    .await?;
    system.set_stock("LAMP", 3).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("LAMP", 1, 4500)], "tok_ok", Some("express")))
        .await?;

    assert_eq!(system.wait_status(id, "delivered", DEADLINE).await?, None);
    system.wait_stock("LAMP", (2, 0)).await?;
    assert_eq!(
        system
            .count(&shipment_stream(id), "ShipmentDelivered")
            .await?,
        1
    );
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flaky_gateway_is_retried_until_the_payment_is_captured() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("MUG", 4).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("MUG", 1, 1200)], "tok_flaky", None))
        .await?;

    assert_eq!(system.wait_status(id, "completed", DEADLINE).await?, None);
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        1
    );
    system.wait_stock("MUG", (3, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivered_order_notifies_placed_confirmed_shipped_delivered() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("CHAIR", 2).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("CHAIR", 1, 8900)], "tok_ok", Some("standard")))
        .await?;
    system.wait_status(id, "delivered", DEADLINE).await?;

    let expected = ["confirmed", "delivered", "placed", "shipped"];
    let kinds = testkit::wait_until("four notifications", DEADLINE, || async {
        let mut kinds: Vec<String> =
            sqlx::query_scalar("SELECT kind FROM notifications WHERE order_id = $1")
                .bind(id)
                .fetch_all(system.pool())
                .await?;
        kinds.sort();
        Ok((kinds.len() >= expected.len()).then_some(kinds))
    })
    .await?;
    assert_eq!(kinds, expected);
    system.audit().await
}
