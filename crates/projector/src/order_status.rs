//! `order_status`: one row per order, the status users query.
use std::collections::HashMap;

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

/// The columns the page's last transition of an order sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub status: &'static str,
    pub cancel_reason: Option<&'static str>,
    pub updated_at: DateTime<Utc>,
    pub last_global_position: i64,
}

/// What a page does to one order's row, whichever way the row stands before it; the
/// statement picks the case the table is in. Equal to applying the page's events one
/// by one with [`apply`]: without a row, events before the first `OrderPlaced` change
/// nothing and the row is that event's with the transitions after it (`created`);
/// with a row, `OrderPlaced` changes nothing and each transition overwrites the same
/// four columns, so the last one (`moved`) is what stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderChange {
    pub order_id: Uuid,
    pub created: Option<OrderStatusRow>,
    pub moved: Option<Moved>,
}

/// The page's changes, one per order it concerns, in order of first appearance.
pub fn page_changes(events: &[EventEnvelope]) -> Vec<OrderChange> {
    let mut changes: Vec<OrderChange> = Vec::new();
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    for env in events.iter().filter(|e| concerns_order_status(&e.event)) {
        let Some(order_id) = env.event.order_id() else {
            continue;
        };
        let at = *index.entry(order_id).or_insert_with(|| {
            changes.push(OrderChange {
                order_id,
                created: None,
                moved: None,
            });
            changes.len() - 1
        });
        let change = &mut changes[at];
        if let Some(row) = apply(change.created.as_ref(), env) {
            change.created = Some(row);
        }
        if let Some((status, cancel_reason)) = transition(&env.event) {
            change.moved = Some(Moved {
                status,
                cancel_reason,
                updated_at: env.recorded_at,
                last_global_position: env.global_position,
            });
        }
    }
    changes.retain(|c| c.created.is_some() || c.moved.is_some());
    changes
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
        Box::pin(async move { write(conn, &page_changes(events)).await })
    }
}

/// Writes a page's changes in one statement (no read of the rows first): the UPDATE
/// moves the orders that have a row, the INSERT creates the ones that have none. Both
/// see the table as it was before the statement, so each order takes exactly one of
/// the two cases.
async fn write(conn: &mut PgConnection, changes: &[OrderChange]) -> Result<(), ProjectorError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for change in changes {
        c.push(change);
    }
    sqlx::query(
        "WITH page AS (
             SELECT * FROM UNNEST($1::uuid[], $2::bool[], $3::text[], $4::text[], $5::text[],
                                  $6::bigint[], $7::text[], $8::int[], $9::timestamptz[],
                                  $10::timestamptz[], $11::bigint[], $12::bool[], $13::text[],
                                  $14::text[], $15::timestamptz[], $16::bigint[])
                 AS p(order_id, creates, customer_id, status, cancel_reason, total_cents,
                      currency, item_count, placed_at, updated_at, last_global_position,
                      moves, moved_status, moved_reason, moved_at, moved_position)
         ),
         moved AS (
             UPDATE order_status o
                SET status = p.moved_status, cancel_reason = p.moved_reason,
                    updated_at = p.moved_at, last_global_position = p.moved_position
               FROM page p
              WHERE o.order_id = p.order_id AND p.moves
         )
         INSERT INTO order_status (order_id, customer_id, status, cancel_reason, total_cents,
                                   currency, item_count, placed_at, updated_at, last_global_position)
         SELECT order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                placed_at, updated_at, last_global_position
           FROM page p
          WHERE p.creates AND NOT EXISTS (SELECT 1 FROM order_status o WHERE o.order_id = p.order_id)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(c.order_id)
    .bind(c.creates)
    .bind(c.customer_id)
    .bind(c.status)
    .bind(c.cancel_reason)
    .bind(c.total_cents)
    .bind(c.currency)
    .bind(c.item_count)
    .bind(c.placed_at)
    .bind(c.updated_at)
    .bind(c.last_global_position)
    .bind(c.moves)
    .bind(c.moved_status)
    .bind(c.moved_reason)
    .bind(c.moved_at)
    .bind(c.moved_position)
    .execute(conn)
    .await?;
    Ok(())
}

/// The statement's arrays, one entry per order; a case that does not apply gets
/// placeholder values its flag (`creates`, `moves`) keeps from being used.
#[derive(Default)]
struct Columns<'a> {
    order_id: Vec<Uuid>,
    creates: Vec<bool>,
    customer_id: Vec<&'a str>,
    status: Vec<&'a str>,
    cancel_reason: Vec<Option<&'a str>>,
    total_cents: Vec<i64>,
    currency: Vec<&'a str>,
    item_count: Vec<i32>,
    placed_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    last_global_position: Vec<i64>,
    moves: Vec<bool>,
    moved_status: Vec<&'static str>,
    moved_reason: Vec<Option<&'static str>>,
    moved_at: Vec<DateTime<Utc>>,
    moved_position: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, change: &'a OrderChange) {
        self.order_id.push(change.order_id);
        let created = change.created.as_ref();
        self.creates.push(created.is_some());
        self.customer_id
            .push(created.map_or("", |r| r.customer_id.as_str()));
        self.status.push(created.map_or("", |r| r.status.as_str()));
        self.cancel_reason
            .push(created.and_then(|r| r.cancel_reason.as_deref()));
        self.total_cents.push(created.map_or(0, |r| r.total_cents));
        self.currency
            .push(created.map_or("", |r| r.currency.as_str()));
        self.item_count.push(created.map_or(0, |r| r.item_count));
        self.placed_at
            .push(created.map_or_else(DateTime::default, |r| r.placed_at));
        self.updated_at
            .push(created.map_or_else(DateTime::default, |r| r.updated_at));
        self.last_global_position
            .push(created.map_or(0, |r| r.last_global_position));
        let moved = change.moved.as_ref();
        self.moves.push(moved.is_some());
        self.moved_status.push(moved.map_or("", |m| m.status));
        self.moved_reason.push(moved.and_then(|m| m.cancel_reason));
        self.moved_at
            .push(moved.map_or_else(DateTime::default, |m| m.updated_at));
        self.moved_position
            .push(moved.map_or(0, |m| m.last_global_position));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::events::{
        CancelReason, OrderCancelled, OrderCommandRefused, OrderConfirmed, OrderShipped,
        ShipmentDelivered,
    };

    const ORDER: Uuid = Uuid::from_u128(0xA11CE);

    use crate::test_events::at;

    fn env(position: i64, event: DomainEvent) -> EventEnvelope {
        crate::test_events::envelope(&format!("order-{ORDER}"), position, position, event)
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

    /// The row after a page, as the statement of [`write`] leaves it.
    fn written(before: Option<&OrderStatusRow>, change: &OrderChange) -> Option<OrderStatusRow> {
        match before {
            None => change.created.clone(),
            Some(row) => Some(change.moved.as_ref().map_or_else(
                || row.clone(),
                |m| OrderStatusRow {
                    status: m.status.to_owned(),
                    cancel_reason: m.cancel_reason.map(str::to_owned),
                    updated_at: m.updated_at,
                    last_global_position: m.last_global_position,
                    ..row.clone()
                },
            )),
        }
    }

    #[test]
    fn a_pages_changes_equal_applying_its_events_one_by_one() {
        let existing = fold(&[env(1, placed(ORDER, "c-0"))]);
        let pages: Vec<Vec<EventEnvelope>> = vec![
            vec![env(2, placed(ORDER, "c-1")), env(3, confirmed(ORDER))],
            vec![
                env(2, confirmed(ORDER)),
                env(3, placed(ORDER, "c-1")),
                env(4, cancelled(ORDER, CancelReason::OutOfStock)),
                env(5, placed(ORDER, "c-2")),
            ],
            vec![env(2, placed(ORDER, "c-1"))],
            vec![env(2, cancelled(ORDER, CancelReason::PaymentDeclined))],
        ];
        for (n, page) in pages.iter().enumerate() {
            let changes = page_changes(page);
            assert_eq!(changes.len(), 1, "page {n}");
            for before in [None, existing.clone()] {
                let one_by_one = page
                    .iter()
                    .fold(before.clone(), |row, e| apply(row.as_ref(), e).or(row));
                assert_eq!(
                    written(before.as_ref(), &changes[0]),
                    one_by_one,
                    "page {n}, row before: {}",
                    before.is_some()
                );
            }
        }
        assert!(page_changes(&[]).is_empty());
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
