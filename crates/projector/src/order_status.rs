//! `order_status`: one row per order, the status users query.
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::{DomainEvent, EventEnvelope};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::{Projection, ProjectorError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OrderStatusRow {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub cancel_reason: Option<String>,
    pub total_cents: i64,
    pub currency: String,
    pub item_count: i32,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_global_position: i64,
}

/// The status an event moves the order to, and the cancel reason it sets, if it is
/// one of the events the read model shows.
fn transition(event: &DomainEvent) -> Option<(&'static str, Option<&'static str>)> {
    use DomainEvent::*;
    Some(match event {
        OrderRejected(e) => ("rejected", Some(e.reason.as_str())),
        OrderSentForReview(_) => ("under_review", None),
        OrderApproved(_) => ("pending", None),
        OrderConfirmed(_) => ("confirmed", None),
        OrderCompleted(_) => ("completed", None),
        ShipmentShipped(_) => ("shipped", None),
        ShipmentDelivered(_) => ("delivered", None),
        OrderCancelled(e) => ("cancelled", Some(e.reason.as_str())),
        _ => return None,
    })
}

/// Folds one event into the order's row. `None` when the event does not change it.
pub fn apply(current: Option<&OrderStatusRow>, env: &EventEnvelope) -> Option<OrderStatusRow> {
    if let DomainEvent::OrderPlaced(placed) = &env.event {
        if current.is_some() {
            return None;
        }
        return Some(OrderStatusRow {
            order_id: placed.order_id,
            customer_id: placed.customer_id.clone(),
            status: "pending".to_owned(),
            cancel_reason: None,
            total_cents: placed.total_cents,
            currency: placed.currency.clone(),
            item_count: i32::try_from(placed.item_count).unwrap_or(i32::MAX),
            placed_at: env.recorded_at,
            updated_at: env.recorded_at,
            last_global_position: env.global_position,
        });
    }
    let (status, cancel_reason) = transition(&env.event)?;
    let mut row = current?.clone();
    row.status = status.to_owned();
    row.cancel_reason = cancel_reason.map(str::to_owned);
    row.updated_at = env.recorded_at;
    row.last_global_position = env.global_position;
    Some(row)
}

fn concerns_order_status(event: &DomainEvent) -> bool {
    matches!(event, DomainEvent::OrderPlaced(_)) || transition(event).is_some()
}

pub struct OrderStatusProjection;

impl Projection for OrderStatusProjection {
    fn name(&self) -> &'static str {
        "order_status"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["order_status"]
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>> {
        Box::pin(async move {
            let relevant: Vec<&EventEnvelope> = events
                .iter()
                .filter(|e| concerns_order_status(&e.event))
                .collect();
            if relevant.is_empty() {
                return Ok(());
            }
            let ids: Vec<Uuid> = relevant
                .iter()
                .filter_map(|e| e.event.order_id())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let mut rows = load(conn, &ids).await?;
            let mut dirty = HashSet::new();
            for env in relevant {
                let Some(order_id) = env.event.order_id() else {
                    continue;
                };
                if let Some(row) = apply(rows.get(&order_id), env) {
                    rows.insert(order_id, row);
                    dirty.insert(order_id);
                }
            }
            let changed: Vec<&OrderStatusRow> =
                dirty.iter().filter_map(|id| rows.get(id)).collect();
            upsert(conn, &changed).await
        })
    }
}

async fn load(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, OrderStatusRow>, ProjectorError> {
    let rows: Vec<OrderStatusRow> = sqlx::query_as(
        "SELECT order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                placed_at, updated_at, last_global_position
           FROM order_status WHERE order_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.order_id, r)).collect())
}

async fn upsert(conn: &mut PgConnection, rows: &[&OrderStatusRow]) -> Result<(), ProjectorError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO order_status (order_id, customer_id, status, cancel_reason, total_cents,
                                   currency, item_count, placed_at, updated_at, last_global_position)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                              $6::text[], $7::int[], $8::timestamptz[], $9::timestamptz[], $10::bigint[])
         ON CONFLICT (order_id) DO UPDATE SET
             status = EXCLUDED.status,
             cancel_reason = EXCLUDED.cancel_reason,
             updated_at = EXCLUDED.updated_at,
             last_global_position = EXCLUDED.last_global_position",
    )
    .bind(rows.iter().map(|r| r.order_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.customer_id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.cancel_reason.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.total_cents).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.currency.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.item_count).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.placed_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_global_position).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use domain::events::{
        CancelReason, OrderCancelled, OrderCommandRefused, OrderConfirmed, OrderShipped,
        ShipmentDelivered,
    };

    const ORDER: Uuid = Uuid::from_u128(0xA11CE);

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, second)
            .single()
            .unwrap_or_default()
    }

    fn env(position: i64, event: DomainEvent) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::from_u128(position as u128),
            stream_name: format!("order-{ORDER}"),
            stream_version: position,
            global_position: position,
            recorded_at: at(u32::try_from(position).unwrap_or(0)),
            correlation_id: Uuid::nil(),
            causation_id: Uuid::nil(),
            event,
        }
    }

    /// Built from the v1 payload, which every later schema version upcasts.
    fn placed(order_id: Uuid, customer: &str) -> DomainEvent {
        let payload = serde_json::json!({
            "order_id": order_id, "customer_id": customer, "currency": "EUR",
            "items": [{"sku": "A", "quantity": 2, "unit_price_cents": 100},
                      {"sku": "B", "quantity": 1, "unit_price_cents": 50}],
            "payment_token": "tok_ok", "shipping": null, "total_cents": 250, "item_count": 3,
            "plan": {"workflow_version": 1, "review": false, "ship": false,
                     "review_timeout_ms": 0, "payment_timeout_ms": 0, "delivery_delay_ms": 0}
        });
        DomainEvent::decode("OrderPlaced", 1, &payload)
            .unwrap_or_else(|e| panic!("a v1 OrderPlaced decodes: {e}"))
    }

    fn confirmed(order_id: Uuid) -> DomainEvent {
        DomainEvent::OrderConfirmed(OrderConfirmed {
            order_id,
            items: vec![],
            shipping: None,
            delivery_delay_ms: 0,
        })
    }

    fn cancelled(order_id: Uuid, reason: CancelReason) -> DomainEvent {
        DomainEvent::OrderCancelled(OrderCancelled {
            order_id,
            reason,
            detail: String::new(),
            by: None,
        })
    }

    fn fold(events: &[EventEnvelope]) -> Option<OrderStatusRow> {
        events
            .iter()
            .fold(None, |row, e| apply(row.as_ref(), e).or(row))
    }

    #[test]
    fn order_placed_creates_a_pending_row_from_the_event() {
        let row = apply(None, &env(1, placed(ORDER, "c-1")));
        assert_eq!(
            row,
            Some(OrderStatusRow {
                order_id: ORDER,
                customer_id: "c-1".into(),
                status: "pending".into(),
                cancel_reason: None,
                total_cents: 250,
                currency: "EUR".into(),
                item_count: 3,
                placed_at: at(1),
                updated_at: at(1),
                last_global_position: 1,
            })
        );
    }

    #[test]
    fn order_placed_twice_does_not_reset_the_row() {
        let first = fold(&[env(1, placed(ORDER, "c-1")), env(2, confirmed(ORDER))]);
        let row = first.clone().unwrap_or_else(|| panic!("no row"));
        assert_eq!(
            apply(Some(&row), &env(3, placed(ORDER, "someone else"))),
            None
        );
        assert_eq!(
            fold(&[
                env(1, placed(ORDER, "c-1")),
                env(2, confirmed(ORDER)),
                env(3, placed(ORDER, "x"))
            ]),
            first
        );
    }

    #[test]
    fn events_for_an_order_without_a_row_change_nothing() {
        assert_eq!(apply(None, &env(1, confirmed(ORDER))), None);
        assert_eq!(
            apply(None, &env(1, cancelled(ORDER, CancelReason::OutOfStock))),
            None
        );
        assert_eq!(
            apply(
                None,
                &env(
                    1,
                    DomainEvent::ShipmentDelivered(ShipmentDelivered { order_id: ORDER })
                )
            ),
            None
        );
    }

    #[test]
    fn events_the_read_model_does_not_show_leave_the_row_untouched() {
        let row = fold(&[env(1, placed(ORDER, "c-1"))]).unwrap_or_else(|| panic!("no row"));
        let refused = DomainEvent::OrderCommandRefused(OrderCommandRefused {
            order_id: ORDER,
            command: "order.approve".into(),
            reason: "not under review".into(),
        });
        assert_eq!(apply(Some(&row), &env(2, refused)), None);
        // the order stream's OrderShipped is shown through the shipment's ShipmentShipped
        assert_eq!(
            apply(
                Some(&row),
                &env(
                    3,
                    DomainEvent::OrderShipped(OrderShipped { order_id: ORDER })
                )
            ),
            None
        );
    }

    #[test]
    fn a_cancellation_sets_status_reason_and_the_update_columns_only() {
        let row = fold(&[
            env(1, placed(ORDER, "c-1")),
            env(4, confirmed(ORDER)),
            env(9, cancelled(ORDER, CancelReason::CustomerCancelled)),
        ])
        .unwrap_or_else(|| panic!("no row"));
        assert_eq!(row.status, "cancelled");
        assert_eq!(row.cancel_reason.as_deref(), Some("customer_cancelled"));
        assert_eq!(
            (row.placed_at, row.updated_at, row.last_global_position),
            (at(1), at(9), 9)
        );
        assert_eq!(
            (row.item_count, row.total_cents, row.customer_id.as_str()),
            (3, 250, "c-1")
        );
    }

    #[test]
    fn delivery_clears_nothing_but_moves_status() {
        let row = fold(&[
            env(1, placed(ORDER, "c-1")),
            env(2, confirmed(ORDER)),
            env(
                3,
                DomainEvent::ShipmentDelivered(ShipmentDelivered { order_id: ORDER }),
            ),
        ])
        .unwrap_or_else(|| panic!("no row"));
        assert_eq!(
            (row.status.as_str(), row.cancel_reason),
            ("delivered", None)
        );
    }
}
