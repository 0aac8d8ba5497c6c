//! The timer scheduler: fires due timers from the `timers` table (kept from the log by
//! the projector). Several processes may run it: each claims due rows with one short
//! statement (`FOR UPDATE SKIP LOCKED`) that leases them, fires them outside any
//! transaction, and deletes what fired. Firing asks the owning aggregate to decide
//! again, so a timer that fires after the order moved on has no effect, and firing
//! twice (after a crash before the row was deleted, once its lease ran out) appends
//! nothing new: the event ids derive from the timer's id.
//!
//! A timer due within [`HAND_OVER_WITHIN`] that a worker of this process set is also
//! handed to this process's scheduler ([`Handover`]), which fires it from memory when it
//! is due, usually before the projector has written its row: the row is then written
//! and cancelled in the same page. A row written before its timer is due is left
//! leased when claimed while the scheduler holds the timer ([`Held`]), and the
//! projector deletes it after the firing. The table stays the guarantee (a crash loses
//! only the in-memory copy, and the row fires it); the hand-over saves the
//! wait for the projector's page and the scheduler's look (a delivery due at once was
//! recorded about 18 ms after its shipment at p50, 50 ms at p99, at half load).
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{
    order, payment, shipment, streams, OrderInput, OrderState, PaymentInput, PaymentState,
    ShipmentInput, ShipmentState,
};
use eventstore::EventStore;
use futures::stream::{self, StreamExt};
use projector::timers::{DELIVERY, PAYMENT_TIMEOUT, REVIEW_EXPIRY};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
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

/// Timers due sooner than this are handed to the process's scheduler as well as
/// written to the table (covers the default delivery delays, 2 s and 500 ms express).
pub const HAND_OVER_WITHIN: Duration = Duration::from_secs(5);
/// Handed-over timers kept at most (a few seconds of orders at full rate); more are
/// left to the table.
const HANDED_OVER_AT_MOST: usize = 16_384;
/// Hand-overs queued between a worker and the scheduler's loop.
const HAND_OVER_QUEUE: usize = 1_024;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, sqlx::FromRow)]
pub struct DueTimer {
    pub timer_id: Uuid,
    pub kind: String,
    pub order_id: Uuid,
    pub due_at: DateTime<Utc>,
}

/// Where a worker hands over the timers it set that are due soon, to the scheduler
/// of the same process if one runs (shared through [`SharedCaches`]). Without one, or
/// when it is behind, a timer is simply not handed over: the table has it anyway.
#[derive(Clone, Default)]
pub struct Handover {
    scheduler: Arc<Mutex<Option<mpsc::Sender<DueTimer>>>>,
}

impl Handover {
    /// Hands `timer` to this process's scheduler if it is due within
    /// [`HAND_OVER_WITHIN`] of `now`; whether it was taken.
    pub fn offer(&self, timer: DueTimer, now: DateTime<Utc>) -> bool {
        if !due_soon(timer.due_at, now) {
            return false;
        }
        self.scheduler()
            .as_ref()
            .is_some_and(|scheduler| scheduler.try_send(timer).is_ok())
    }

    /// Whether a running scheduler takes hand-overs.
    pub fn attached(&self) -> bool {
        self.scheduler()
            .as_ref()
            .is_some_and(|scheduler| !scheduler.is_closed())
    }

    /// Makes the caller the scheduler handed over to (the last to attach wins).
    fn attach(&self) -> mpsc::Receiver<DueTimer> {
        let (tx, rx) = mpsc::channel(HAND_OVER_QUEUE);
        *self.scheduler() = Some(tx);
        rx
    }

    fn scheduler(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<DueTimer>>> {
        self.scheduler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn due_soon(due_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    (due_at - now)
        .to_std()
        .map_or(true, |wait| wait <= HAND_OVER_WITHIN)
}

/// The handed-over timers not fired yet, soonest first.
#[derive(Default)]
struct Soon {
    timers: BinaryHeap<Reverse<(DateTime<Utc>, DueTimer)>>,
}

impl Soon {
    /// Keeps `timer` unless full; whether it was kept.
    fn push(&mut self, timer: DueTimer) -> bool {
        if self.timers.len() >= HANDED_OVER_AT_MOST {
            return false;
        }
        self.timers.push(Reverse((timer.due_at, timer)));
        true
    }

    /// The next timer if it is due at `now`.
    fn pop_due(&mut self, now: DateTime<Utc>) -> Option<DueTimer> {
        match self.timers.peek() {
            Some(Reverse((due_at, _))) if *due_at <= now => {
                self.timers.pop().map(|Reverse((_, timer))| timer)
            }
            _ => None,
        }
    }

    /// When the next timer is due, on the runtime's clock.
    fn next_due(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((due_at, _))| {
            Instant::now() + (*due_at - Utc::now()).to_std().unwrap_or(Duration::ZERO)
        })
    }
}

/// The timers a scheduler holds in memory: handed over and not fired yet, or fired
/// (when), remembered for a lease's length. Their rows, if the projector has written
/// them, are not the table's to fire meanwhile: a claim leaves them leased, and the
/// projector deletes them when it sees the firing's outcome. A hand-over that failed
/// to fire is let go, so its row fires once its lease runs out.
#[derive(Default)]
struct Held {
    timers: HashMap<Uuid, Option<Instant>>,
    fired: VecDeque<(Instant, Uuid)>,
}

impl Held {
    fn hold(&mut self, timer_id: Uuid) {
        self.timers.insert(timer_id, None);
    }

    /// Records a firing at `now`, and forgets those fired a lease before it: most
    /// handed-over timers never get a row (the projector sees them set and ended in one
    /// page), so no claim of the table would ever prune them.
    fn fired(&mut self, timer_id: Uuid, now: Instant) {
        if let Some(at) = self.timers.get_mut(&timer_id) {
            *at = Some(now);
            self.fired.push_back((now, timer_id));
        }
        self.forget_stale(now);
    }

    /// Forgets the timers fired a lease or more before `now`.
    fn forget_stale(&mut self, now: Instant) {
        if let Some(before) = now.checked_sub(LEASE) {
            self.forget_fired_before(before);
        }
    }

    fn let_go(&mut self, timer_id: Uuid) {
        self.timers.remove(&timer_id);
    }

    fn holds(&self, timer_id: Uuid) -> bool {
        self.timers.contains_key(&timer_id)
    }

    /// Forgets the timers fired a lease ago or more: a row still there by then (the
    /// projector is behind) fires again from the table, which decides nothing.
    fn forget_fired_before(&mut self, before: Instant) {
        while let Some(&(at, timer_id)) = self.fired.front() {
            if at > before {
                break;
            }
            self.fired.pop_front();
            if self.timers.get(&timer_id) == Some(&Some(at)) {
                self.timers.remove(&timer_id);
            }
        }
    }
}

pub struct Scheduler {
    store: EventStore,
    /// The process's folded order and shipment streams: a delivery is decided on the
    /// shipment that shipping left, a review expiry on the order the saga left.
    caches: SharedCaches,
    /// The timers handed over to this scheduler (see the module's note).
    held: Mutex<Held>,
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
            held: Mutex::new(Held::default()),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this scheduler holds the timer in memory (handed over, and not fired a
    /// lease ago or failed).
    pub fn holds(&self, timer_id: Uuid) -> bool {
        self.held().holds(timer_id)
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
        // Rows of timers held in memory stay leased instead: the memory copy fires.
        let due: Vec<DueTimer> = {
            let mut held = self.held();
            held.forget_stale(Instant::now());
            due.into_iter()
                .filter(|timer| !held.holds(timer.timer_id))
                .collect()
        };
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

    /// Fires timers until `shutdown` resolves: those of the table when they are due,
    /// and those handed over in process (see the module's note) from memory.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServiceError> {
        tokio::pin!(shutdown);
        // Timers are rows of the timers projection: in this process only a committed
        // page of it wakes the scheduler, not every append (a look per append was
        // four or five statements per order that found nothing new).
        let mut wakeups = self.store.follow_projections().await?;
        let mut handed_over = self.caches.timers.attach();
        let mut soon = Soon::default();
        let mut firing = JoinSet::new();
        let mut look = true;
        let mut next_look = Instant::now();
        loop {
            if look {
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
                next_look = Instant::now() + pause;
            }
            while firing.len() < FIRING_AT_ONCE {
                let Some(timer) = soon.pop_due(Utc::now()) else {
                    break;
                };
                firing.spawn(Arc::clone(&self).fire_handed_over(timer));
            }
            // While every firing slot is busy, the next firing waits for a slot, not
            // for its time (which may have passed: waiting on it would spin).
            let soon_due = soon.next_due().filter(|_| firing.len() < FIRING_AT_ONCE);
            look = false;
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                Some(timer) = handed_over.recv() => {
                    let timer_id = timer.timer_id;
                    if soon.push(timer) {
                        self.held().hold(timer_id);
                    }
                }
                Some(_) = firing.join_next(), if !firing.is_empty() => {}
                () = tokio::time::sleep_until(soon_due.unwrap_or(next_look)), if soon_due.is_some() => {}
                _ = wakeups.wait(next_look.saturating_duration_since(Instant::now())) => look = true,
            }
        }
    }

    /// Fires a timer handed over in process. If it cannot, the table still has it.
    async fn fire_handed_over(self: Arc<Self>, timer: DueTimer) {
        match self.fire(&timer).await {
            Ok(()) => self.held().fired(timer.timer_id, Instant::now()),
            Err(error) => {
                self.held().let_go(timer.timer_id);
                warn!(kind = %timer.kind, order_id = %timer.order_id, %error, "a timer handed over could not fire; its row in the timers table will");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(due_at: DateTime<Utc>) -> DueTimer {
        DueTimer {
            timer_id: Uuid::new_v4(),
            kind: DELIVERY.to_owned(),
            order_id: Uuid::new_v4(),
            due_at,
        }
    }

    #[test]
    fn only_timers_due_within_the_horizon_or_overdue_are_handed_over() {
        let now = Utc::now();
        let horizon = chrono::Duration::from_std(HAND_OVER_WITHIN).unwrap_or_default();
        assert!(due_soon(now - chrono::Duration::seconds(1), now));
        assert!(due_soon(now, now));
        assert!(due_soon(now + horizon, now));
        assert!(!due_soon(
            now + horizon + chrono::Duration::milliseconds(1),
            now
        ));
    }

    #[tokio::test]
    async fn a_hand_over_is_taken_only_by_an_attached_scheduler() {
        let handover = Handover::default();
        let now = Utc::now();
        assert!(!handover.offer(timer(now), now), "no scheduler attached");
        let mut rx = handover.attach();
        assert!(handover.attached());
        let due = timer(now);
        assert!(handover.offer(due.clone(), now));
        assert!(!handover.offer(timer(now + chrono::Duration::hours(1)), now));
        assert_eq!(rx.recv().await, Some(due));
        drop(rx);
        assert!(!handover.attached());
        assert!(!handover.offer(timer(now), now), "the scheduler stopped");
    }

    #[test]
    fn a_held_timer_is_forgotten_a_lease_after_it_fired_or_at_once_when_it_failed() {
        let mut held = Held::default();
        let (fired, pending, failed) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for timer_id in [fired, pending, failed] {
            held.hold(timer_id);
        }
        let start = Instant::now();
        held.fired(fired, start);
        held.let_go(failed);
        held.forget_fired_before(start - Duration::from_millis(1));
        assert!(held.holds(fired) && held.holds(pending) && !held.holds(failed));
        held.forget_fired_before(start);
        assert!(!held.holds(fired), "fired a lease ago");
        assert!(
            held.holds(pending),
            "a pending timer is held until it fires"
        );
    }

    #[test]
    fn a_firing_forgets_the_timers_fired_a_lease_before_it() {
        let mut held = Held::default();
        let (early, late) = (Uuid::new_v4(), Uuid::new_v4());
        held.hold(early);
        held.hold(late);
        let start = Instant::now();
        held.fired(early, start);
        held.fired(late, start + LEASE);
        assert!(!held.holds(early), "fired a lease before the last firing");
        assert!(held.holds(late));
        assert_eq!(held.timers.len(), 1);
        assert_eq!(held.fired.len(), 1);
    }

    #[test]
    fn handed_over_timers_come_out_soonest_first_and_only_when_due() {
        let now = Utc::now();
        let mut soon = Soon::default();
        let later = timer(now + chrono::Duration::milliseconds(20));
        let first = timer(now - chrono::Duration::milliseconds(5));
        let second = timer(now);
        soon.push(later.clone());
        soon.push(second.clone());
        soon.push(first.clone());
        assert_eq!(soon.pop_due(now), Some(first));
        assert_eq!(soon.pop_due(now), Some(second));
        assert_eq!(soon.pop_due(now), None, "the third is not due yet");
        assert!(soon.next_due().is_some());
        assert_eq!(soon.pop_due(later.due_at), Some(later));
        assert!(soon.next_due().is_none());
    }
}
