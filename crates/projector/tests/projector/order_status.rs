use domain::commands::CancelOrder;
use domain::events::{CancelReason, OrderCommandRefused};
use domain::{streams, DomainEvent, OrderInput};
use projector::order_status::OrderStatusProjection;
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

#[tokio::test]
async fn a_shipped_order_moves_pending_confirmed_shipped_delivered_with_the_contracts_columns(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let p = OrderStatusProjection;
    set_stock(store, "A", 10).await?;
    set_stock(store, "B", 10).await?;
    let mut order = OrderScript::new(store);
    order
        .place(vec![line("A", 2, 1_250), line("B", 3, 100)], true)
        .await?;
    catch_up(store, &p).await?;

    let placed = last_of(store, &streams::order(order.order_id), "OrderPlaced").await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row after OrderPlaced"))?;
    assert_eq!(row.status, "pending");
    assert_eq!(row.customer_id, "customer-1");
    assert_eq!(row.currency, "EUR");
    assert_eq!(row.item_count, 5, "item_count is the sum of the quantities");
    assert_eq!(row.total_cents, 2 * 1_250 + 3 * 100);
    assert_eq!(row.cancel_reason, None);
    assert_eq!(row.placed_at, placed.recorded_at);
    assert_eq!(row.updated_at, placed.recorded_at);
    assert_eq!(row.last_global_position, placed.global_position);

    order.reserve_all().await?;
    order.capture(2_800).await?;
    catch_up(store, &p).await?;
    let confirmed = last_of(store, &streams::order(order.order_id), "OrderConfirmed").await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("row gone"))?;
    assert_eq!(row.status, "confirmed");
    assert_eq!(row.placed_at, placed.recorded_at, "placed_at never moves");
    assert_eq!(row.updated_at, confirmed.recorded_at);
    assert_eq!(row.last_global_position, confirmed.global_position);

    order.ship(chrono::Utc::now()).await?;
    catch_up(store, &p).await?;
    let shipped = last_of(store, &streams::shipment(order.order_id), "ShipmentShipped").await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("row gone"))?;
    assert_eq!(row.status, "shipped");
    assert_eq!(row.updated_at, shipped.recorded_at);

    order.deliver().await?;
    catch_up(store, &p).await?;
    let delivered = last_of(
        store,
        &streams::shipment(order.order_id),
        "ShipmentDelivered",
    )
    .await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("row gone"))?;
    assert_eq!(row.status, "delivered");
    assert_eq!(row.cancel_reason, None);
    assert_eq!(row.placed_at, placed.recorded_at);
    assert_eq!(row.updated_at, delivered.recorded_at);
    assert_eq!(row.last_global_position, delivered.global_position);
    assert_eq!((row.item_count, row.total_cents), (5, 2_800));
    Ok(())
}

#[tokio::test]
async fn the_whole_course_in_one_page_gives_the_same_row_as_step_by_step() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 10).await?;
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", 1, 500)], true).await?;
    order.reserve_all().await?;
    order.capture(500).await?;
    order.ship(chrono::Utc::now()).await?;
    order.deliver().await?;
    catch_up(store, &OrderStatusProjection).await?;

    let delivered = last_of(
        store,
        &streams::shipment(order.order_id),
        "ShipmentDelivered",
    )
    .await?;
    let placed = last_of(store, &streams::order(order.order_id), "OrderPlaced").await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    assert_eq!(row.status, "delivered");
    assert_eq!(row.placed_at, placed.recorded_at);
    assert_eq!(row.updated_at, delivered.recorded_at);
    assert_eq!(row.last_global_position, delivered.global_position);
    Ok(())
}

#[tokio::test]
async fn a_cancelled_order_shows_cancelled_with_the_reason_code() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 10).await?;
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", 1, 500)], true).await?;
    catch_up(store, &OrderStatusProjection).await?;
    order
        .order(OrderInput::Cancel(CancelOrder {
            order_id: order.order_id,
            reason: "changed my mind".to_owned(),
        }))
        .await?;
    catch_up(store, &OrderStatusProjection).await?;

    let cancelled = last_of(store, &streams::order(order.order_id), "OrderCancelled").await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    assert_eq!(row.status, "cancelled");
    assert_eq!(row.cancel_reason.as_deref(), Some("customer_cancelled"));
    assert_eq!(row.updated_at, cancelled.recorded_at);
    assert_eq!(row.last_global_position, cancelled.global_position);
    Ok(())
}

#[tokio::test]
async fn every_cancel_reason_is_shown_as_its_code() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 10).await?;
    let reasons = [
        CancelReason::PaymentDeclined,
        CancelReason::PaymentTimeout,
        CancelReason::OutOfStock,
        CancelReason::CustomerCancelled,
        CancelReason::ReviewRejected,
        CancelReason::ReviewExpired,
    ];
    let mut ids = Vec::new();
    for reason in reasons {
        let mut order = OrderScript::new(store);
        order.place(vec![line("A", 1, 500)], true).await?;
        append(
            store,
            &streams::order(order.order_id),
            &[DomainEvent::OrderCancelled(
                domain::events::OrderCancelled {
                    order_id: order.order_id,
                    reason,
                    detail: "test".to_owned(),
                    by: None,
                },
            )],
        )
        .await?;
        ids.push((order.order_id, reason));
    }
    catch_up(store, &OrderStatusProjection).await?;
    for (order_id, reason) in ids {
        let row = order_row(store, order_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no row"))?;
        assert_eq!(row.status, "cancelled");
        assert_eq!(row.cancel_reason.as_deref(), Some(reason.as_str()));
    }
    Ok(())
}

#[tokio::test]
async fn an_invalid_order_is_rejected_with_invalid_order() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let mut order = OrderScript::new(store);
    // quantity 0 is invalid
    let events = order.place(vec![line("A", 0, 500)], true).await?;
    assert_eq!(events[1].event_type(), "OrderRejected");
    catch_up(store, &OrderStatusProjection).await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    assert_eq!(row.status, "rejected");
    assert_eq!(row.cancel_reason.as_deref(), Some("invalid_order"));
    Ok(())
}

#[tokio::test]
async fn a_large_order_waits_under_review() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", 1, 100_000)], true).await?;
    catch_up(store, &OrderStatusProjection).await?;
    let row = order_row(store, order.order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    assert_eq!(row.status, "under_review");
    Ok(())
}

#[tokio::test]
async fn a_refused_command_for_an_order_never_placed_creates_no_row() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let order_id = Uuid::new_v4();
    append(
        store,
        &streams::order(order_id),
        &[DomainEvent::OrderCommandRefused(OrderCommandRefused {
            order_id,
            command: "order.cancel".to_owned(),
            reason: "no such order".to_owned(),
        })],
    )
    .await?;
    // and a cancellation of an unknown order, which the projection must not invent a row for
    append(
        store,
        &streams::order(order_id),
        &[DomainEvent::OrderCancelled(
            domain::events::OrderCancelled {
                order_id,
                reason: CancelReason::CustomerCancelled,
                detail: String::new(),
                by: None,
            },
        )],
    )
    .await?;
    catch_up(store, &OrderStatusProjection).await?;
    assert!(order_rows(store).await?.is_empty());
    Ok(())
}
