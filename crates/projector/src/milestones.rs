//! `order_milestones`: when each milestone of an order was reached, one row per
//! (order, milestone), `reached_at` being the `recorded_at` of the event that reached
//! it. A milestone is reached once: the first event that reaches it wins.
//!
//! | milestone | reached by |
//! | --- | --- |
//! | `placed` | `OrderPlaced` |
//! | `reviewed` | `OrderApproved`, or `OrderCancelled` with `review_rejected` |
//! | `accepted` | `OrderAccepted` (fulfilment starts) |
//! | `reserved` | the `OrderLineReserved` that leaves every line reserved while the order is still being fulfilled |
//! | `paid` | `OrderPaymentCaptured` while the order is still being fulfilled (a capture after a cancellation is refunded, not a milestone) |
//! | `confirmed` | `OrderConfirmed` |
//! | `shipped` | `ShipmentShipped` |
//! | `delivered` | `ShipmentDelivered` |
//! | `completed` | `OrderCompleted` (digital orders) |
//! | `cancelled` | `OrderCancelled` |
//! | `rejected` | `OrderRejected` |
//!
//! `reserved` and `paid` depend on the order's state before the event; the projection
//! folds the order's stream (the domain's own `OrderState`) up to that event, so live
//! projection and replay give the same rows.
use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::events::CancelReason;
use domain::order::LineStatus;
use domain::{DomainEvent, EventEnvelope, Evolve, OrderState, OrderStatus};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::{Projection, ProjectorError};

pub const PLACED: &str = "placed";
pub const REVIEWED: &str = "reviewed";
pub const ACCEPTED: &str = "accepted";
pub const RESERVED: &str = "reserved";
pub const PAID: &str = "paid";
pub const CONFIRMED: &str = "confirmed";
pub const SHIPPED: &str = "shipped";
pub const DELIVERED: &str = "delivered";
pub const COMPLETED: &str = "completed";
pub const CANCELLED: &str = "cancelled";
pub const REJECTED: &str = "rejected";

/// Every milestone, in the order of the course of an order.
pub const MILESTONES: [&str; 11] = [
    PLACED, REVIEWED, ACCEPTED, RESERVED, PAID, CONFIRMED, SHIPPED, DELIVERED, COMPLETED,
    CANCELLED, REJECTED,
];

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MilestoneRow {
    pub order_id: Uuid,
    pub milestone: String,
    pub reached_at: DateTime<Utc>,
    pub global_position: i64,
}

/// Whether the milestones `event` reaches depend on the order's state before it.
fn needs_order_state(event: &DomainEvent) -> bool {
    matches!(
        event,
        DomainEvent::OrderLineReserved(_) | DomainEvent::OrderPaymentCaptured(_)
    )
}

/// The milestones `event` reaches. `before` is the order's state just before the
/// event (folded from its stream); only events for which [`needs_order_state`] holds
/// look at it.
pub fn reached(before: &OrderState, event: &DomainEvent) -> Vec<&'static str> {
    use DomainEvent as E;
    let fulfilling = before.status == OrderStatus::Accepted;
    match event {
        E::OrderPlaced(_) => vec![PLACED],
        E::OrderApproved(_) => vec![REVIEWED],
        E::OrderAccepted(_) => vec![ACCEPTED],
        E::OrderLineReserved(_) if fulfilling => {
            let mut after = before.clone();
            after.apply(event);
            if after.lines.iter().all(|l| *l == LineStatus::Reserved) {
                vec![RESERVED]
            } else {
                vec![]
            }
        }
        E::OrderPaymentCaptured(_) if fulfilling => vec![PAID],
        E::OrderConfirmed(_) => vec![CONFIRMED],
        E::ShipmentShipped(_) => vec![SHIPPED],
        E::ShipmentDelivered(_) => vec![DELIVERED],
        E::OrderCompleted(_) => vec![COMPLETED],
        E::OrderCancelled(e) if e.reason == CancelReason::ReviewRejected => {
            vec![REVIEWED, CANCELLED]
        }
        E::OrderCancelled(_) => vec![CANCELLED],
        E::OrderRejected(_) => vec![REJECTED],
        _ => vec![],
    }
}

/// The rows a page of events adds. `states` holds, for each order stream with an
/// event that [`needs_order_state`], the order's events (stream_version, event) from
/// its start up to at least that event.
pub fn rows_of_page(
    events: &[EventEnvelope],
    states: &HashMap<String, Vec<(i64, DomainEvent)>>,
) -> Vec<MilestoneRow> {
    // (order, milestone) → row; the first reach in log order wins.
    let mut rows: BTreeMap<(Uuid, &'static str), MilestoneRow> = BTreeMap::new();
    let empty = OrderState::default();
    for env in events {
        let Some(order_id) = env.event.order_id() else {
            continue;
        };
        let before = if needs_order_state(&env.event) {
            state_before(states.get(&env.stream_name), env.stream_version)
        } else {
            empty.clone()
        };
        for milestone in reached(&before, &env.event) {
            rows.entry((order_id, milestone))
                .or_insert_with(|| MilestoneRow {
                    order_id,
                    milestone: milestone.to_owned(),
                    reached_at: env.recorded_at,
                    global_position: env.global_position,
                });
        }
    }
    rows.into_values().collect()
}

fn state_before(stream: Option<&Vec<(i64, DomainEvent)>>, version: i64) -> OrderState {
    let mut state = OrderState::default();
    for (_, event) in stream
        .into_iter()
        .flatten()
        .take_while(|(v, _)| *v < version)
    {
        state.apply(event);
    }
    state
}

pub struct MilestonesProjection;

impl Projection for MilestonesProjection {
    fn name(&self) -> &'static str {
        "order_milestones"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["order_milestones"]
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>> {
        Box::pin(async move {
            let streams: Vec<String> = events
                .iter()
                .filter(|e| needs_order_state(&e.event))
                .map(|e| e.stream_name.clone())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let states = load_streams(conn, &streams).await?;
            let rows = rows_of_page(events, &states);
            insert(conn, &rows).await
        })
    }
}

/// The order streams named, decoded (upcast) in stream order. An event this version
/// cannot decode is left out, as the runner leaves it out of the page.
async fn load_streams(
    conn: &mut PgConnection,
    streams: &[String],
) -> Result<HashMap<String, Vec<(i64, DomainEvent)>>, ProjectorError> {
    let mut loaded: HashMap<String, Vec<(i64, DomainEvent)>> = HashMap::new();
    if streams.is_empty() {
        return Ok(loaded);
    }
    let records: Vec<(String, i64, String, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT stream_name, stream_version, event_type, schema_version, payload
           FROM events WHERE stream_name = ANY($1)
          ORDER BY stream_name, stream_version",
    )
    .bind(streams)
    .fetch_all(conn)
    .await?;
    for (stream, version, event_type, schema_version, payload) in records {
        if let Ok(event) = DomainEvent::decode(&event_type, schema_version, &payload) {
            loaded.entry(stream).or_default().push((version, event));
        }
    }
    Ok(loaded)
}

async fn insert(conn: &mut PgConnection, rows: &[MilestoneRow]) -> Result<(), ProjectorError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO order_milestones (order_id, milestone, reached_at, global_position)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::bigint[])
         ON CONFLICT (order_id, milestone) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.order_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.milestone.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.reached_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.global_position).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// An order's milestones, in the order they were reached.
pub async fn of_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<MilestoneRow>, ProjectorError> {
    Ok(sqlx::query_as(
        "SELECT order_id, milestone, reached_at, global_position FROM order_milestones
          WHERE order_id = $1 ORDER BY global_position, milestone",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use domain::commands::{OrderLine, PlaceOrder};
    use domain::events::{
        OrderCancelled, OrderLineReserved, OrderPaymentCaptured, ShipmentDelivered,
    };
    use domain::{order, OrderInput, PlacementFacts, Rules};
    use std::collections::BTreeSet;

    const ORDER: Uuid = Uuid::from_u128(0xA11CE);

    fn env(version: i64, stream: &str, event: DomainEvent) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::from_u128(version as u128),
            stream_name: stream.to_owned(),
            stream_version: version,
            global_position: 100 + version,
            recorded_at: Utc
                .with_ymd_and_hms(2025, 1, 1, 12, 0, u32::try_from(version).unwrap_or(0))
                .single()
                .unwrap_or_default(),
            correlation_id: Uuid::nil(),
            causation_id: Uuid::nil(),
            event,
        }
    }

    /// A two-line digital order, placed and accepted.
    fn placed_and_accepted() -> Vec<DomainEvent> {
        let skus: BTreeSet<String> = ["A", "B"].into_iter().map(String::from).collect();
        let line = |sku: &str| OrderLine {
            sku: sku.into(),
            quantity: 1,
            unit_price_cents: 100,
        };
        order::decide(
            &OrderState::default(),
            OrderInput::Place {
                cmd: PlaceOrder {
                    order_id: ORDER,
                    customer_id: "c".into(),
                    currency: "EUR".into(),
                    items: vec![line("A"), line("B")],
                    payment_token: "tok_ok".into(),
                    shipping: None,
                },
                rules: &Rules::default(),
                known_skus: &skus,
                facts: PlacementFacts::default(),
                now: Utc::now(),
            },
        )
    }

    fn reserved(line: u32) -> DomainEvent {
        DomainEvent::OrderLineReserved(OrderLineReserved {
            order_id: ORDER,
            line,
            sku: if line == 0 { "A" } else { "B" }.into(),
            quantity: 1,
        })
    }

    fn captured() -> DomainEvent {
        DomainEvent::OrderPaymentCaptured(OrderPaymentCaptured {
            order_id: ORDER,
            amount_cents: 200,
        })
    }

    fn cancelled(reason: CancelReason) -> DomainEvent {
        DomainEvent::OrderCancelled(OrderCancelled {
            order_id: ORDER,
            reason,
            detail: String::new(),
            by: None,
        })
    }

    /// The milestones of an order stream, with the stream itself as the state source.
    fn milestones_of(events: Vec<DomainEvent>) -> Vec<(String, i64)> {
        let stream = format!("order-{ORDER}");
        let envs: Vec<EventEnvelope> = (0..).zip(events).map(|(v, e)| env(v, &stream, e)).collect();
        let states = HashMap::from([(
            stream,
            envs.iter()
                .map(|e| (e.stream_version, e.event.clone()))
                .collect(),
        )]);
        let mut rows = rows_of_page(&envs, &states);
        rows.sort_by_key(|r| r.global_position);
        rows.into_iter()
            .map(|r| (r.milestone, r.global_position - 100))
            .collect()
    }

    fn names(rows: &[(String, i64)]) -> Vec<&str> {
        rows.iter().map(|(m, _)| m.as_str()).collect()
    }

    #[test]
    fn reserved_is_reached_by_the_last_line_and_paid_by_the_capture() {
        let mut events = placed_and_accepted();
        events.extend([reserved(1), captured(), reserved(0)]);
        let rows = milestones_of(events);
        assert_eq!(
            rows,
            [
                ("placed".into(), 0),
                ("accepted".into(), 1),
                ("paid".into(), 3),
                ("reserved".into(), 4)
            ]
        );
    }

    #[test]
    fn reservations_and_captures_after_a_cancellation_are_no_milestones() {
        let mut events = placed_and_accepted();
        events.extend([
            reserved(0),
            cancelled(CancelReason::CustomerCancelled),
            reserved(1),
            captured(),
        ]);
        assert_eq!(
            names(&milestones_of(events)),
            ["placed", "accepted", "cancelled"]
        );
    }

    #[test]
    fn a_review_rejection_is_both_reviewed_and_cancelled() {
        let placed = placed_and_accepted().remove(0);
        let rows = milestones_of(vec![placed, cancelled(CancelReason::ReviewRejected)]);
        assert_eq!(names(&rows), ["placed", "cancelled", "reviewed"]);
    }

    #[test]
    fn shipment_events_reach_shipped_and_delivered_without_order_state() {
        let delivered = env(
            3,
            &format!("shipment-{ORDER}"),
            DomainEvent::ShipmentDelivered(ShipmentDelivered { order_id: ORDER }),
        );
        let rows = rows_of_page(&[delivered], &HashMap::new());
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].milestone.as_str(), rows[0].order_id),
            ("delivered", ORDER)
        );
    }

    #[test]
    fn the_first_reach_of_a_milestone_wins() {
        let mut events = placed_and_accepted();
        events.push(events[0].clone());
        assert_eq!(
            milestones_of(events),
            [("placed".into(), 0), ("accepted".into(), 1)]
        );
    }
}
