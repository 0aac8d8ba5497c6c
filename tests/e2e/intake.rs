//! What the commands intake does with what it receives: invalid orders are rejected,
//! undecodable messages are dead-lettered, repeated message ids have one effect.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{order, order_stream, payment_stream, stock_stream, System, DEADLINE};

#[tokio::test(flavor = "multi_thread")]
async fn invalid_orders_are_rejected_as_invalid_order() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("BOOK", 10).await?;

    let mut wrong_currency = order(Uuid::new_v4(), &[("BOOK", 1, 1000)], "tok_ok", None);
    wrong_currency["currency"] = json!("USD");
    let cases: Vec<(&str, Value)> = vec![
        (
            "no items",
            order(Uuid::new_v4(), &[], "tok_ok", Some("standard")),
        ),
        (
            "quantity 0",
            order(Uuid::new_v4(), &[("BOOK", 0, 1000)], "tok_ok", None),
        ),
        (
            "negative price",
            order(Uuid::new_v4(), &[("BOOK", 1, -5)], "tok_ok", None),
        ),
        (
            "unknown SKU",
            order(Uuid::new_v4(), &[("NEVER-SET", 1, 1000)], "tok_ok", None),
        ),
        ("wrong currency", wrong_currency),
    ];
    for (_, body) in &cases {
        system.place(body.clone()).await?;
    }
    for (what, body) in &cases {
        let id: Uuid = serde_json::from_value(body["order_id"].clone())?;
        let reason = system.wait_status(id, "rejected", DEADLINE).await?;
        assert_eq!(reason.as_deref(), Some("invalid_order"), "{what}");
        assert_eq!(
            system.count(&order_stream(id), "OrderRejected").await?,
            1,
            "{what}"
        );
        assert!(
            system.events(&payment_stream(id)).await?.is_empty(),
            "{what}"
        );
    }
    system.wait_stock("BOOK", (10, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_commands_are_dead_lettered_and_later_orders_flow() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("BOOK", 10).await?;

    let good = |id: Uuid| order(id, &[("BOOK", 1, 1000)], "tok_ok", None);
    let mut missing_field = good(Uuid::new_v4());
    missing_field
        .as_object_mut()
        .map(|o| o.remove("payment_token"));
    let mut wrong_type = good(Uuid::new_v4());
    wrong_type["items"][0]["quantity"] = json!("1");
    let mut not_a_uuid = good(Uuid::new_v4());
    not_a_uuid["order_id"] = json!("order-42");
    let mut too_large = good(Uuid::new_v4());
    too_large["customer_id"] = json!("x".repeat(70 * 1024));

    let bad: Vec<(&str, &str, Vec<u8>)> = vec![
        ("not JSON", "order.place", b"{\"order_id\": oops".to_vec()),
        (
            "unknown routing key",
            "order.explode",
            serde_json::to_vec(&good(Uuid::new_v4()))?,
        ),
        (
            "missing field",
            "order.place",
            serde_json::to_vec(&missing_field)?,
        ),
        (
            "wrong JSON type",
            "order.place",
            serde_json::to_vec(&wrong_type)?,
        ),
        (
            "order_id not a UUID",
            "order.cancel",
            serde_json::to_vec(&json!({"order_id": "42", "reason": "x"}))?,
        ),
        (
            "order_id not a UUID (place)",
            "order.place",
            serde_json::to_vec(&not_a_uuid)?,
        ),
        (
            "body over 64 KiB",
            "order.place",
            serde_json::to_vec(&too_large)?,
        ),
    ];
    assert!(bad
        .last()
        .is_some_and(|(_, _, body)| body.len() > 64 * 1024));
    let mut ids = Vec::new();
    for (_, key, body) in &bad {
        let id = Uuid::new_v4();
        system.publish_raw(key, body, id).await?;
        ids.push(id);
    }
    // Later messages keep flowing.
    let after = Uuid::new_v4();
    system.place(good(after)).await?;
    system.wait_status(after, "completed", DEADLINE).await?;

    let letters = system.take_dead_letters(bad.len()).await?;
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    for ((what, _, body), id) in bad.iter().zip(&ids) {
        let id = id.to_string();
        let letter = letters
            .iter()
            .find(|l| l.message_id.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no dead letter for {what} ({id})"));
        assert_eq!(&letter.body, body, "{what}: the body is kept as sent");
        assert_eq!(
            letter.content_type.as_deref(),
            Some("application/json"),
            "{what}"
        );
        let error = letter.error();
        assert!(
            error.as_deref().is_some_and(|e| !e.trim().is_empty()),
            "{what}: no x-orderflow-error header in {:?}",
            letter.headers
        );
    }
    // Nothing of the bad messages reached the log as orders.
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM order_status")
        .fetch_one(system.pool())
        .await?;
    assert_eq!(orders, 1);
    system.wait_stock("BOOK", (9, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_id_published_three_times_has_one_effect() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("BOOK", 10).await?;
    system.set_stock("PEN", 10).await?;
    let id = Uuid::new_v4();
    let message_id = Uuid::new_v4();
    let body = order(id, &[("BOOK", 1, 1000)], "tok_ok", Some("standard"));

    // Twice back to back (handled concurrently), then again after another command.
    system
        .publish("order.place", body.clone(), message_id)
        .await?;
    system
        .publish("order.place", body.clone(), message_id)
        .await?;
    system.wait_status(id, "delivered", DEADLINE).await?;
    system.set_stock("PEN", 11).await?;
    system.publish("order.place", body, message_id).await?;
    system.wait_commands_handled().await?;

    assert_eq!(system.count(&order_stream(id), "OrderPlaced").await?, 1);
    assert_eq!(
        system
            .count(&order_stream(id), "OrderCommandRefused")
            .await?,
        0
    );
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        1
    );
    assert_eq!(
        system.status(id).await?,
        Some(("delivered".to_owned(), None))
    );
    system.wait_stock("BOOK", (9, 0)).await?;
    // The same for a stock.set: a repeat does not undo a later change.
    let set_id = Uuid::new_v4();
    system
        .publish("stock.set", json!({"sku": "PEN", "quantity": 3}), set_id)
        .await?;
    system.wait_stock("PEN", (3, 0)).await?;
    system.set_stock("PEN", 4).await?;
    system
        .publish("stock.set", json!({"sku": "PEN", "quantity": 3}), set_id)
        .await?;
    system.wait_commands_handled().await?;
    let sets: Vec<i64> = system
        .events(&stock_stream("PEN"))
        .await?
        .iter()
        .filter(|(t, _)| t == "StockSet")
        .filter_map(|(_, p)| p["quantity"].as_i64())
        .collect();
    assert_eq!(sets, [10, 11, 3, 4]);
    assert_eq!(system.stock("PEN").await?, Some((4, 0)));
    system.audit().await
}
