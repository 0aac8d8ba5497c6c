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
            let relevant: Vec<&EventEnvelope> =
                events.iter().filter(|e| concerns_order_status(&e.event)).collect();
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
                let Some(order_id) = env.event.order_id() else { continue };
                if let Some(row) = apply(rows.get(&order_id), env) {
                    rows.insert(order_id, row);
                    dirty.insert(order_id);
                }
            }
            let changed: Vec<&OrderStatusRow> = dirty.iter().filter_map(|id| rows.get(id)).collect();
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
