//! The timer scheduler: fires due timers from the `timers` table (kept from the log by
//! the projector). Several processes may run it: each claims due rows with one short
//! statement (`FOR UPDATE SKIP LOCKED`) that leases them, fires them outside any
//! transaction, and deletes what fired. Firing asks the owning aggregate to decide
//! again, so a timer that fires after the order moved on has no effect, and firing
//! twice (after a crash before the row was deleted, once its lease ran out) appends
//! nothing new: the event ids derive from the timer's id.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{
    order, payment, shipment, streams, OrderInput, OrderState, PaymentInput, PaymentState,
    ShipmentInput, ShipmentState,
};
use eventstore::EventStore;
use futures::stream::{self, StreamExt};
use projector::timers::{DELIVERY, PAYMENT_TIMEOUT, REVIEW_EXPIRY};
use tracing::{info, warn};
use uuid::Uuid;

use crate::exec::{decide_on, decide_on_cached, Cause, SharedCaches};
use crate::ServiceError;

const BATCH: i64 = 100;
/// Claimed timers fired at once.
const FIRING_AT_ONCE: usize = 16;
/// A timer that failed to fire is tried again this much later.
const RETRY_FAILED_TIMER_AFTER: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest sleep between looks when no timer is due sooner.
const MAX_IDLE: Duration = Duration::from_millis(100);
/// How long a claimed timer is its claimer's: one still in the table after this (its
/// scheduler died while firing it) is claimed again.
const LEASE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueTimer {
    pub timer_id: Uuid,
    pub kind: String,
    pub order_id: Uuid,
    pub due_at: DateTime<Utc>,
}

pub struct Scheduler {
    store: EventStore,
    /// The process's folded order and shipment streams: a delivery is decided on the
    /// shipment that shipping left, a review expiry on the order the saga left.
    caches: SharedCaches,
}

impl Scheduler {
    /// A scheduler with caches of its own.
    pub fn new(store: EventStore) -> Arc<Scheduler> {
        Scheduler::sharing(store, &SharedCaches::default())
    }

    /// A scheduler that decides on the streams the process's other workers left.
    pub fn sharing(store: EventStore, caches: &SharedCaches) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            store,
            caches: caches.clone(),
        })
    }

    /// Fires every due timer once; returns how many fired.
    pub async fn fire_due(&self) -> Result<usize, ServiceError> {
        let pool = self.store.pool();
        let due: Vec<DueTimer> = sqlx::query_as(
            "WITH due AS (
                 SELECT timer_id FROM timers
                  WHERE due_at <= now() AND (leased_until IS NULL OR leased_until <= now())
                  ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED
             )
             UPDATE timers t SET leased_until = now() + $2
               FROM due WHERE t.timer_id = due.timer_id
             RETURNING t.timer_id, t.kind, t.order_id, t.due_at",
        )
        .bind(BATCH)
        .bind(LEASE)
        .fetch_all(pool)
        .await?;
        // Concurrently: each firing is a decision and an append on its own stream, and
        // one after another the last of a full batch waited for all the others' commits
        // (with group commit, firings in flight together also share commits).
        let outcomes: Vec<(DueTimer, Result<(), ServiceError>)> = stream::iter(due)
            .map(|timer| async move {
                let outcome = self.fire(&timer).await;
                (timer, outcome)
            })
            .buffer_unordered(FIRING_AT_ONCE)
            .collect()
            .await;
        let mut fired = Vec::with_capacity(outcomes.len());
        for (timer, outcome) in outcomes {
            match outcome {
                Ok(()) => fired.push(timer.timer_id),
                // One timer that cannot fire (its stream cannot be read, say) must not
                // hold back the others: it waits a while and is tried again.
                Err(error) => {
                    warn!(kind = %timer.kind, order_id = %timer.order_id, %error, "timer could not fire; trying again later");
                    sqlx::query(
                        "UPDATE timers SET due_at = now() + $2, leased_until = NULL
                          WHERE timer_id = $1",
                    )
                    .bind(timer.timer_id)
                    .bind(RETRY_FAILED_TIMER_AFTER)
                    .execute(pool)
                    .await?;
                }
            }
        }
        sqlx::query("DELETE FROM timers WHERE timer_id = ANY($1)")
            .bind(&fired)
            .execute(pool)
            .await?;
        Ok(fired.len())
    }

    async fn fire(&self, timer: &DueTimer) -> Result<(), ServiceError> {
        let cause = Cause::new(
            timer.timer_id,
            timer.timer_id,
            format!("timer.{}", timer.kind),
        );
        let order_id = timer.order_id;
        let appended = match timer.kind.as_str() {
            REVIEW_EXPIRY => {
                // The row's time is the event's rounded to microseconds; step past it
                // so the domain sees the expiry reached.
                let now = Utc::now().max(timer.due_at + chrono::Duration::milliseconds(1));
                decide_on_cached(
                    &self.store,
                    &self.caches.orders,
                    &streams::order(order_id),
                    &cause,
                    |s: &OrderState| order::decide(s, OrderInput::ReviewExpired { now }),
                )
                .await?
                .events()
                .len()
            }
            PAYMENT_TIMEOUT => decide_on::<PaymentState, _>(
                &self.store,
                &streams::payment(order_id),
                &cause,
                |s| payment::decide(s, PaymentInput::TimedOut),
            )
            .await?
            .events()
            .len(),
            DELIVERY => decide_on_cached(
                &self.store,
                &self.caches.shipments,
                &streams::shipment(order_id),
                &cause,
                |s: &ShipmentState| shipment::decide(s, ShipmentInput::Deliver),
            )
            .await?
            .events()
            .len(),
            other => {
                warn!(kind = other, %order_id, "unknown timer kind; dropping it");
                0
            }
        };
        info!(kind = %timer.kind, %order_id, effective = appended > 0, "timer fired");
        Ok(())
    }

    /// How long until the next timer not leased elsewhere is due (capped), by the
    /// database's clock, the one `fire_due` claims by. An index scan that stops at the
    /// first such row (an expression over every row would scan the whole table on every
    /// wake-up); a lease running out is seen within the cap.
    async fn next_wait(&self) -> Result<Duration, ServiceError> {
        let seconds: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM min(due_at) - now())::float8 FROM timers
              WHERE leased_until IS NULL OR leased_until <= now()",
        )
        .fetch_one(self.store.pool())
        .await?;
        Ok(seconds.map_or(MAX_IDLE, |s| {
            Duration::try_from_secs_f64(s.max(0.0))
                .unwrap_or(MAX_IDLE)
                .min(MAX_IDLE)
        }))
    }

    /// Fires timers until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServiceError> {
        tokio::pin!(shutdown);
        // Timers are rows of the timers projection: in this process only a committed
        // page of it wakes the scheduler, not every append (a look per append was
        // four or five statements per order that found nothing new).
        let mut wakeups = self.store.follow_projections().await?;
        loop {
            // One cheap look per wake-up; a claim only when something is due.
            let pause = match self.next_wait().await {
                Ok(wait) if wait.is_zero() => match self.fire_due().await {
                    Ok(_) => continue,
                    Err(error) => {
                        warn!(%error, "firing timers failed; retrying");
                        Duration::from_millis(500)
                    }
                },
                Ok(wait) => wait,
                Err(error) => {
                    warn!(%error, "looking for due timers failed; retrying");
                    Duration::from_millis(500)
                }
            };
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = wakeups.wait(pause) => {}
            }
        }
    }
}
