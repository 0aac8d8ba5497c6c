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
    use DomainEvent::*;
    let schedule = |order_id, kind, due_at| TimerChange::Schedule {
        order_id,
        kind,
        timer_id: env.event_id,
        due_at,
    };
    let cancel = |order_id, kind| TimerChange::Cancel { order_id, kind };
    Some(match &env.event {
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

pub struct TimersProjection;

impl Projection for TimersProjection {
    fn name(&self) -> &'static str {
        "timers"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["timers"]
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>> {
        Box::pin(async move {
            // Net effect of the page per (order, kind): the last change wins.
            let mut net: BTreeMap<(Uuid, &'static str), (TimerChange, DateTime<Utc>)> =
                BTreeMap::new();
            for env in events {
                if let Some(c) = change(env) {
                    let key = match &c {
                        TimerChange::Schedule { order_id, kind, .. }
                        | TimerChange::Cancel { order_id, kind } => (*order_id, *kind),
                    };
                    net.insert(key, (c, env.recorded_at));
                }
            }
            write(conn, net.into_values().collect()).await
        })
    }
}

/// Writes the page's net changes: one DELETE for the cancelled waits, one INSERT for
/// the scheduled ones (replay writes hundreds of thousands).
async fn write(
    conn: &mut PgConnection,
    changes: Vec<(TimerChange, DateTime<Utc>)>,
) -> Result<(), ProjectorError> {
    let mut cancelled: (Vec<Uuid>, Vec<&str>) = (Vec::new(), Vec::new());
    let mut scheduled = Vec::new();
    for (change, recorded_at) in &changes {
        match change {
            TimerChange::Schedule {
                order_id,
                kind,
                timer_id,
                due_at,
            } => scheduled.push((*timer_id, *kind, *order_id, *due_at, *recorded_at)),
            TimerChange::Cancel { order_id, kind } => {
                cancelled.0.push(*order_id);
                cancelled.1.push(kind);
            }
        }
    }
    if !cancelled.0.is_empty() {
        sqlx::query(
            "DELETE FROM timers t USING unnest($1::uuid[], $2::text[]) AS c(order_id, kind)
              WHERE t.order_id = c.order_id AND t.kind = c.kind",
        )
        .bind(&cancelled.0)
        .bind(&cancelled.1)
        .execute(&mut *conn)
        .await?;
    }
    if !scheduled.is_empty() {
        sqlx::query(
            "INSERT INTO timers (timer_id, kind, order_id, due_at, scheduled_at)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::timestamptz[], $5::timestamptz[])
             ON CONFLICT (timer_id) DO NOTHING",
        )
        .bind(scheduled.iter().map(|t| t.0).collect::<Vec<_>>())
        .bind(scheduled.iter().map(|t| t.1).collect::<Vec<_>>())
        .bind(scheduled.iter().map(|t| t.2).collect::<Vec<_>>())
        .bind(scheduled.iter().map(|t| t.3).collect::<Vec<_>>())
        .bind(scheduled.iter().map(|t| t.4).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
