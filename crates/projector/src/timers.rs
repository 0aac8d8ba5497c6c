//! `timers`: the durable timers of the workflow, derived from the log. An event that
//! starts a wait schedules a timer; the event that ends the wait removes it. The
//! scheduler (services::timers) claims due rows and fires them; a timer that fires
//! after the order moved on has no effect, because the domain decides again.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use domain::{DomainEvent, EventEnvelope};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::{Projection, ProjectorError};

pub const REVIEW_EXPIRY: &str = "review_expiry";
pub const PAYMENT_TIMEOUT: &str = "payment_timeout";
pub const DELIVERY: &str = "delivery";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    Schedule {
        order_id: Uuid,
        kind: &'static str,
        timer_id: Uuid,
        due_at: DateTime<Utc>,
    },
    Cancel {
        order_id: Uuid,
        kind: &'static str,
    },
}

/// What an event does to the timers, if anything.
pub fn change(env: &EventEnvelope) -> Option<TimerChange> {
    change_of(env.event_id, &env.event)
}

/// What the event `event_id` does to the timers, if anything: a timer it schedules
/// has the event's id.
pub fn change_of(event_id: Uuid, event: &DomainEvent) -> Option<TimerChange> {
    use DomainEvent::*;
    let schedule = |order_id, kind, due_at| TimerChange::Schedule {
        order_id,
        kind,
        timer_id: event_id,
        due_at,
    };
    let cancel = |order_id, kind| TimerChange::Cancel { order_id, kind };
    Some(match event {
        OrderSentForReview(e) => schedule(e.order_id, REVIEW_EXPIRY, e.expires_at),
        OrderApproved(e) => cancel(e.order_id, REVIEW_EXPIRY),
        OrderCancelled(e) => cancel(e.order_id, REVIEW_EXPIRY),
        PaymentRequested(e) => schedule(e.order_id, PAYMENT_TIMEOUT, e.expires_at),
        PaymentCaptured(e) => cancel(e.order_id, PAYMENT_TIMEOUT),
        PaymentDeclined(e) => cancel(e.order_id, PAYMENT_TIMEOUT),
        PaymentTimedOut(e) => cancel(e.order_id, PAYMENT_TIMEOUT),
        PaymentVoided(e) => cancel(e.order_id, PAYMENT_TIMEOUT),
        ShipmentShipped(e) => schedule(e.order_id, DELIVERY, e.deliver_at),
        ShipmentDelivered(e) => cancel(e.order_id, DELIVERY),
        _ => return None,
    })
}

/// A timer a page schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub timer_id: Uuid,
    pub kind: &'static str,
    pub order_id: Uuid,
    pub due_at: DateTime<Utc>,
    pub scheduled_at: DateTime<Utc>,
}

/// What a page does to the table, equal to applying its events one by one: a cancel
/// removes every row of its (order, kind), a schedule adds a row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageChanges {
    /// (order, kind) pairs whose rows from earlier pages go (a cancel in this page).
    pub cancelled: Vec<(Uuid, &'static str)>,
    /// The timers left scheduled by this page: per (order, kind), the schedules after
    /// its last cancel in the page, in log order.
    pub scheduled: Vec<Scheduled>,
}

impl PageChanges {
    pub fn is_empty(&self) -> bool {
        self.cancelled.is_empty() && self.scheduled.is_empty()
    }
}

/// Folds a page's timer changes per (order, kind), keeping the order of effects: a
/// cancel drops the schedules before it (of this page and, through `cancelled`, of
/// earlier ones); a schedule after it stays. Two schedules with no cancel between
/// both stay, as they would applied one at a time.
pub fn page_changes(events: &[EventEnvelope]) -> PageChanges {
    #[derive(Default)]
    struct Effect {
        cancels_earlier: bool,
        scheduled: Vec<Scheduled>,
    }
    let mut effects: BTreeMap<(Uuid, &'static str), Effect> = BTreeMap::new();
    for env in events {
        match change(env) {
            Some(TimerChange::Schedule {
                order_id,
                kind,
                timer_id,
                due_at,
            }) => effects
                .entry((order_id, kind))
                .or_default()
                .scheduled
                .push(Scheduled {
                    timer_id,
                    kind,
                    order_id,
                    due_at,
                    scheduled_at: env.recorded_at,
                }),
            Some(TimerChange::Cancel { order_id, kind }) => {
                let effect = effects.entry((order_id, kind)).or_default();
                effect.cancels_earlier = true;
                effect.scheduled.clear();
            }
            None => {}
        }
    }
    let mut changes = PageChanges::default();
    for (key, effect) in effects {
        if effect.cancels_earlier {
            changes.cancelled.push(key);
        }
        changes.scheduled.extend(effect.scheduled);
    }
    changes
}

pub struct TimersProjection;

impl Projection for TimersProjection {
    fn name(&self) -> &'static str {
        "timers"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["timers"]
    }

    fn wakes_followers(&self) -> bool {
        true
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>> {
        Box::pin(async move { write(conn, &page_changes(events)).await })
    }
}

/// Writes a page's changes in one statement (one round trip however many timers):
/// the DELETE of the cancelled waits runs in a data-modifying CTE, which sees only the
/// rows of earlier pages, so it never removes what the INSERT adds.
async fn write(conn: &mut PgConnection, changes: &PageChanges) -> Result<(), ProjectorError> {
    if changes.is_empty() {
        return Ok(());
    }
    let (cancelled_orders, cancelled_kinds): (Vec<Uuid>, Vec<&str>) =
        changes.cancelled.iter().copied().unzip();
    let scheduled = &changes.scheduled;
    sqlx::query(
        "WITH cancelled AS (
             DELETE FROM timers t USING unnest($1::uuid[], $2::text[]) AS c(order_id, kind)
              WHERE t.order_id = c.order_id AND t.kind = c.kind
         )
         INSERT INTO timers (timer_id, kind, order_id, due_at, scheduled_at)
         SELECT * FROM unnest($3::uuid[], $4::text[], $5::uuid[], $6::timestamptz[], $7::timestamptz[])
         ON CONFLICT (timer_id) DO NOTHING",
    )
    .bind(&cancelled_orders)
    .bind(&cancelled_kinds)
    .bind(scheduled.iter().map(|t| t.timer_id).collect::<Vec<_>>())
    .bind(scheduled.iter().map(|t| t.kind).collect::<Vec<_>>())
    .bind(scheduled.iter().map(|t| t.order_id).collect::<Vec<_>>())
    .bind(scheduled.iter().map(|t| t.due_at).collect::<Vec<_>>())
    .bind(scheduled.iter().map(|t| t.scheduled_at).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::events::{OrderApproved, OrderSentForReview, PaymentCaptured, PaymentRequested};

    const ORDER: Uuid = Uuid::from_u128(0xA11CE);

    use crate::test_events::at;

    fn env(position: i64, event: DomainEvent) -> EventEnvelope {
        crate::test_events::envelope(&format!("payment-{ORDER}"), position, position, event)
    }

    fn requested(position: i64) -> EventEnvelope {
        env(
            position,
            DomainEvent::PaymentRequested(PaymentRequested {
                order_id: ORDER,
                amount_cents: 1,
                currency: "EUR".into(),
                payment_token: "tok_ok".into(),
                expires_at: at(50),
            }),
        )
    }

    fn captured(position: i64) -> EventEnvelope {
        env(
            position,
            DomainEvent::PaymentCaptured(PaymentCaptured {
                order_id: ORDER,
                amount_cents: 1,
                gateway_reference: "g".into(),
                unwanted: false,
            }),
        )
    }

    fn timer_ids(changes: &PageChanges) -> Vec<u128> {
        changes
            .scheduled
            .iter()
            .map(|t| t.timer_id.as_u128())
            .collect()
    }

    #[test]
    fn a_timer_scheduled_and_cancelled_in_one_page_leaves_only_the_cancel() {
        let changes = page_changes(&[requested(1), captured(2)]);
        assert_eq!(changes.cancelled, [(ORDER, PAYMENT_TIMEOUT)]);
        assert!(changes.scheduled.is_empty());
    }

    #[test]
    fn a_schedule_after_a_cancel_stays_and_the_cancel_still_clears_earlier_pages() {
        let changes = page_changes(&[captured(1), requested(2)]);
        assert_eq!(changes.cancelled, [(ORDER, PAYMENT_TIMEOUT)]);
        assert_eq!(timer_ids(&changes), [2]);
        assert_eq!(changes.scheduled[0].scheduled_at, at(2));
    }

    #[test]
    fn two_schedules_without_a_cancel_between_both_stay() {
        let changes = page_changes(&[requested(1), requested(2)]);
        assert!(changes.cancelled.is_empty());
        assert_eq!(timer_ids(&changes), [1, 2]);
        let changes = page_changes(&[requested(1), captured(2), requested(3), requested(4)]);
        assert_eq!(timer_ids(&changes), [3, 4]);
    }

    #[test]
    fn kinds_are_independent() {
        let review = env(
            1,
            DomainEvent::OrderSentForReview(OrderSentForReview {
                order_id: ORDER,
                total_cents: 1,
                threshold_cents: 1,
                expires_at: at(40),
                rule: "review_threshold".into(),
                detail: String::new(),
            }),
        );
        let approved = env(
            3,
            DomainEvent::OrderApproved(OrderApproved {
                order_id: ORDER,
                reviewer: "rita".into(),
            }),
        );
        let changes = page_changes(&[review, requested(2), approved]);
        assert_eq!(changes.cancelled, [(ORDER, REVIEW_EXPIRY)]);
        assert_eq!(timer_ids(&changes), [2]);
        assert_eq!(changes.scheduled[0].kind, PAYMENT_TIMEOUT);
    }
}
