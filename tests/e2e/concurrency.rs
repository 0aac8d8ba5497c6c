//! Many orders racing for the last units of one SKU.

use std::collections::HashMap;

use uuid::Uuid;

use crate::compensation::net_captured;
use crate::harness::{order, payment_stream, stock_stream, System, DEADLINE, TERMINAL};

#[tokio::test(flavor = "multi_thread")]
async fn fifty_orders_for_the_last_ten_units_sell_exactly_ten() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("LAST", 10).await?;
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        system
            .place(order(*id, &[("LAST", 1, 700)], "tok_ok", Some("standard")))
            .await?;
    }

    let rows = testkit::wait_until("all 50 orders to end", DEADLINE * 2, || async {
        let rows: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
            "SELECT order_id, status, cancel_reason FROM order_status WHERE order_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(system.pool())
        .await?;
        let done = rows.len() == ids.len()
            && rows
                .iter()
                .all(|(_, status, _)| TERMINAL.contains(&status.as_str()));
        Ok(done.then_some(rows))
    })
    .await
    .map_err(|e| e.context(system.log_hint()))?;

    let mut outcomes: HashMap<(String, Option<String>), usize> = HashMap::new();
    for (_, status, reason) in &rows {
        *outcomes
            .entry((status.clone(), reason.clone()))
            .or_default() += 1;
    }
    assert_eq!(
        outcomes.get(&("delivered".to_owned(), None)),
        Some(&10),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.get(&("cancelled".to_owned(), Some("out_of_stock".to_owned()))),
        Some(&40),
        "{outcomes:?}"
    );
    system.wait_stock("LAST", (0, 0)).await?;

    // Fold the stock stream: on_hand never below zero at any point of the log.
    let mut on_hand = 0_i64;
    let mut reserved_total = 0_i64;
    for (event_type, payload) in system.events(&stock_stream("LAST")).await? {
        let quantity = payload["quantity"].as_i64().unwrap_or_default();
        match event_type.as_str() {
            "StockSet" => on_hand = quantity,
            "StockReserved" => {
                on_hand -= quantity;
                reserved_total += quantity;
            }
            "StockReleased" => {
                on_hand += quantity;
                reserved_total -= quantity;
            }
            _ => {}
        }
        assert!(
            on_hand >= 0,
            "on_hand went to {on_hand} at {event_type} {payload}"
        );
    }
    assert_eq!(reserved_total, 10, "net units reserved");

    // Cancelled orders keep no money.
    for (id, status, _) in &rows {
        if status == "cancelled" {
            let payments = testkit::wait_until("the payment to settle", DEADLINE, || async {
                let payments = system.events(&payment_stream(*id)).await?;
                let captured = payments.iter().any(|(t, _)| t == "PaymentCaptured");
                let settled = !captured || payments.iter().any(|(t, _)| t == "PaymentRefunded");
                Ok(settled.then_some(payments))
            })
            .await?;
            assert_eq!(net_captured(&payments), 0, "{id}: {payments:?}");
        }
    }
    system.audit().await?;

    // The read models rebuild to the same rows.
    let orders_before = order_rows(&system).await?;
    let stock_before = stock_rows(&system).await?;
    let out = system.cli(&["replay"]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(order_rows(&system).await?, orders_before);
    assert_eq!(stock_rows(&system).await?, stock_before);
    Ok(())
}

type OrderRow = (
    Uuid,
    String,
    String,
    Option<String>,
    i64,
    String,
    i32,
    String,
    String,
    i64,
);

async fn order_rows(system: &System) -> anyhow::Result<Vec<OrderRow>> {
    Ok(sqlx::query_as(
        "SELECT order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                placed_at::text, updated_at::text, last_global_position
           FROM order_status ORDER BY order_id",
    )
    .fetch_all(system.pool())
    .await?)
}

async fn stock_rows(system: &System) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(
        sqlx::query_as("SELECT sku, on_hand, reserved FROM stock_levels ORDER BY sku")
            .fetch_all(system.pool())
            .await?,
    )
}
