//! Parking (docs/adr/0005-parking-and-per-order-ordering.md): a message about an order
//! whose in-process retries ran out is set aside in PostgreSQL (`parked_orders`,
//! `parked_messages`, migration 0070) instead of going through the delay tiers to the
//! dead-letter queue, and the order's later messages on the same queue wait behind it,
//! in arrival order, while every other order flows. A drainer in each consuming process
//! replays a parked order's messages in order when it is due (automatically on the
//! delay tiers' schedule a few times, then after `orderflow resume`), and unparks the
//! order once none is left.
//!
//! Why no window lets a new message overtake or strand: a message joins the queue
//! behind a parked order under a row lock on its `parked_orders` row, and the drainer
//! deletes that row under the same lock, only after seeing no waiting message. Either
//! the message is queued before the drainer looks (and is replayed), or the row is gone
//! (and the message is handled at once, after everything parked before it).
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::{Bus, ConsumeOptions, Incoming, Outcome};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::json;
use sqlx::PgPool;
use tracing::{info, info_span, warn, Instrument};
use uuid::Uuid;

use crate::metrics::Metered;
use crate::ServiceError;

/// Automatic replays of a parked order (1 s, 5 s, 30 s, 30 s after each other, the
/// delay tiers' schedule) before it waits for an operator.
pub const AUTO_REPLAYS: i32 = 4;
/// Handler attempts per replayed message before the replay gives up.
const REPLAY_ATTEMPTS: u32 = 3;
/// First pause between a replayed message's attempts (doubling).
const REPLAY_PAUSE: Duration = Duration::from_millis(100);
/// How often the drainer looks for due parked orders.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// A drainer's claim on a parked order lasts this long past its last step; a process
/// that dies while replaying leaves the order to another after this.
const CLAIM_SECONDS: f64 = 60.0;
/// Why a message that was not itself failing was parked.
const BEHIND: &str = "waiting behind an earlier parked message of its order";

/// Header of a dead-letter copy naming the parked order that keeps the original.
pub const PARKED_ORDER_HEADER: &str = "x-orderflow-parked-order";

/// The key parked orders are stored under.
pub fn order_key(order_id: Uuid) -> String {
    format!("order:{order_id}")
}

/// The pause before the `round`-th automatic replay (1-based), or `None` once the
/// automatic replays are used up.
fn replay_delay(round: i32) -> Option<Duration> {
    if round > AUTO_REPLAYS {
        return None;
    }
    let round = u32::try_from(round).unwrap_or(1);
    let tier = bus::topology::retry_tier(round);
    bus::topology::RETRY_TIERS
        .iter()
        .find(|(name, _)| *name == tier)
        .map(|(_, ms)| Duration::from_millis(u64::from(*ms)))
}

fn millis(delay: Option<Duration>) -> Option<f64> {
    delay.map(|d| d.as_secs_f64() * 1000.0)
}

/// How long a process trusts its last look at whether its queue has any parked order.
/// Within a process the answer is exact (parking here marks it at once, and one
/// order's messages are handled one after another); another process's parking is seen
/// within this, well inside the window the in-process retries already leave between
/// two processes (a failing message is retried for up to seconds before it parks,
/// while its order's next message may be handled elsewhere).
const PARKED_LOOK_VALID: Duration = Duration::from_millis(250);

/// Whether the queue has any parked order, as last seen: most messages then need no
/// query at all (the lookup per message was a tenth of all statements of the flow).
#[derive(Default)]
struct AnyParked {
    /// Some order of this queue is (or may be) parked.
    some: AtomicBool,
    /// Parkings by this process so far: a look that raced one must not clear `some`.
    parked_here: AtomicU64,
    /// When `some` was last read from the database; `None`: never, or forgotten.
    looked_at: Mutex<Option<Instant>>,
}

impl AnyParked {
    /// Whether it is time to look again; only one caller at a time gets `true`.
    fn due(&self) -> bool {
        let mut looked_at = self.looked_at();
        let due = looked_at.is_none_or(|at| at.elapsed() >= PARKED_LOOK_VALID);
        if due {
            *looked_at = Some(Instant::now());
        }
        due
    }

    fn looked_at(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.looked_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the queue as having a parked order, before the parking commits.
    fn parking(&self) {
        self.parked_here.fetch_add(1, Ordering::AcqRel);
        self.some.store(true, Ordering::Release);
    }

    fn parkings(&self) -> u64 {
        self.parked_here.load(Ordering::Acquire)
    }

    /// Records what a look begun after `parkings` parkings saw.
    fn seen(&self, some: bool, parkings: u64) {
        let some = some || self.parkings() != parkings;
        self.some.store(some, Ordering::Release);
    }

    fn some(&self) -> bool {
        self.some.load(Ordering::Acquire)
    }

    /// Forget the last look: the next message looks again.
    fn expire(&self) {
        *self.looked_at() = None;
    }
}

/// One queue's parking lot.
#[derive(Clone)]
pub struct ParkingLot {
    pool: PgPool,
    any_parked: Arc<AnyParked>,
    queue: String,
    worker: &'static str,
    /// Where a copy of a message goes once its automatic replays are used up.
    dead_letters: Option<Bus>,
}

/// A parked order a drainer has claimed.
#[derive(Debug, sqlx::FromRow)]
struct Claim {
    order_key: String,
    order_id: Uuid,
    rounds: i32,
    /// The database's clock at the claim (to see whether a resume came meanwhile).
    claimed_at: DateTime<Utc>,
}

/// A parked message, as stored.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    seq: i64,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: serde_json::Value,
}

impl Stored {
    /// The message as the handler first saw it (marked redelivered).
    fn incoming(&self) -> Incoming {
        let text = |name: &str| {
            self.properties
                .get(name)
                .and_then(|v| v.as_str())
                .map(ToOwned::to_owned)
        };
        Incoming {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            body: self.body.clone(),
            message_id: text("message_id"),
            correlation_id: text("correlation_id"),
            message_type: text("message_type"),
            content_type: text("content_type"),
            timestamp: text("timestamp")
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
            headers: self
                .properties
                .get("headers")
                .and_then(|h| serde_json::from_value(h.clone()).ok())
                .unwrap_or_default(),
            redelivered: true,
        }
    }
}

/// The message's identity: its `message_id` as sent (a UUID, as the contract asks, or
/// anything else), or one derived from its body when it has none.
fn message_key(msg: &Incoming) -> String {
    msg.message_id
        .clone()
        .unwrap_or_else(|| crate::message::message_uuid(msg).to_string())
}

/// What is kept of a message's properties (the body and routing are columns).
fn properties(msg: &Incoming) -> serde_json::Value {
    json!({
        "message_id": msg.message_id,
        "correlation_id": msg.correlation_id,
        "message_type": msg.message_type,
        "content_type": msg.content_type,
        "timestamp": msg.timestamp.map(|t| t.to_rfc3339()),
        "headers": msg.headers,
    })
}

impl ParkingLot {
    pub fn new(pool: PgPool, queue: impl Into<String>, worker: &'static str) -> ParkingLot {
        ParkingLot {
            pool,
            any_parked: Arc::default(),
            queue: queue.into(),
            worker,
            dead_letters: None,
        }
    }

    /// Once a parked order's automatic replays are used up, a copy of its failing
    /// message goes to `orderflow.dead-letter` (contract section 2: a message whose
    /// retries are exhausted ends there), while the order stays parked.
    pub fn with_dead_letter_copies(mut self, bus: Bus) -> ParkingLot {
        self.dead_letters = Some(bus);
        self
    }

    /// See [`ParkingLot::with_dead_letter_copies`]. A failed copy is logged, not
    /// retried: the message itself stays parked, nothing is lost.
    async fn copy_to_dead_letters(
        &self,
        claim: &Claim,
        msg: &Incoming,
        reason: &str,
        attempts: u32,
    ) {
        let Some(bus) = &self.dead_letters else {
            return;
        };
        let reason = format!(
            "{reason} (automatic replays used up; the order stays parked: orderflow resume {})",
            claim.order_id
        );
        let extra = [(PARKED_ORDER_HEADER, claim.order_id.to_string())];
        match bus::dead_letter_copy(bus, msg, &reason, attempts, &extra).await {
            Ok(()) => {
                info!(order_id = %claim.order_id, "a copy of the parked order's failing message is in the dead-letter queue")
            }
            Err(error) => {
                warn!(%error, order_id = %claim.order_id, "cannot copy the parked message to the dead-letter queue")
            }
        }
    }

    /// Whether some order of this queue may be parked (see [`PARKED_LOOK_VALID`]).
    async fn any_parked(&self) -> Result<bool, sqlx::Error> {
        if self.any_parked.due() {
            let parkings = self.any_parked.parkings();
            let some: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM parked_orders WHERE queue = $1)")
                    .bind(&self.queue)
                    .fetch_one(&self.pool)
                    .await
                    .inspect_err(|_| self.any_parked.expire())?;
            self.any_parked.seen(some, parkings);
        }
        Ok(self.any_parked.some())
    }

    /// Parks `msg` behind its order if the order is parked on this queue. Returns
    /// whether it did. The common case (nothing parked on the queue) needs no query;
    /// otherwise one indexed read.
    pub async fn park_if_parked(
        &self,
        msg: &Incoming,
        order_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        if !self.any_parked().await? {
            return Ok(false);
        }
        let key = order_key(order_id);
        let parked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM parked_orders WHERE queue = $1 AND order_key = $2)",
        )
        .bind(&self.queue)
        .bind(&key)
        .fetch_one(&self.pool)
        .await?;
        if !parked {
            return Ok(false);
        }
        let mut tx = eventstore::begin(&self.pool).await?;
        // The drainer deletes the row under this lock only when no message waits.
        let still: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM parked_orders WHERE queue = $1 AND order_key = $2 FOR UPDATE",
        )
        .bind(&self.queue)
        .bind(&key)
        .fetch_optional(&mut *tx)
        .await?;
        if still.is_none() {
            tx.commit().await?;
            return Ok(false);
        }
        self.insert_message(&mut tx, msg, order_id, BEHIND, 0)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Parks the order with `msg` as its first waiting message (or, if it is parked
    /// already, adds `msg` behind the others). Idempotent per message id.
    pub async fn park(
        &self,
        msg: &Incoming,
        order_id: Uuid,
        reason: &str,
        attempts: u32,
    ) -> Result<(), sqlx::Error> {
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        // Before the row exists: a message of this order handled meanwhile in this
        // process looks it up instead of trusting an older "nothing parked".
        self.any_parked.parking();
        let mut tx = eventstore::begin(&self.pool).await?;
        sqlx::query(
            "INSERT INTO parked_orders (queue, order_key, order_id, worker, error, attempts, retry_at)
             VALUES ($1, $2, $3, $4, $5, $6, now() + $7 * interval '1 millisecond')
             ON CONFLICT (queue, order_key) DO UPDATE
                SET error = excluded.error, attempts = parked_orders.attempts + excluded.attempts,
                    updated_at = now()",
        )
        .bind(&self.queue)
        .bind(order_key(order_id))
        .bind(order_id)
        .bind(self.worker)
        .bind(reason)
        .bind(attempts)
        .bind(millis(replay_delay(1)))
        .execute(&mut *tx)
        .await?;
        self.insert_message(&mut tx, msg, order_id, reason, attempts)
            .await?;
        tx.commit().await?;
        crate::metrics::message_parked(self.worker);
        Ok(())
    }

    async fn insert_message(
        &self,
        tx: &mut sqlx::PgConnection,
        msg: &Incoming,
        order_id: Uuid,
        reason: &str,
        attempts: i32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO parked_messages
                (queue, order_key, order_id, message_id, exchange, routing_key, body, properties,
                 error, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (queue, message_id) DO NOTHING",
        )
        .bind(&self.queue)
        .bind(order_key(order_id))
        .bind(order_id)
        .bind(message_key(msg))
        .bind(&msg.exchange)
        .bind(&msg.routing_key)
        .bind(&msg.body)
        .bind(properties(msg))
        .bind(reason)
        .bind(attempts)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Claims the parked order of this queue that is due first, if any.
    async fn claim_due(&self) -> Result<Option<Claim>, sqlx::Error> {
        sqlx::query_as(
            "WITH due AS (
                SELECT queue, order_key FROM parked_orders
                 WHERE queue = $1 AND retry_at <= now()
                   AND (claimed_until IS NULL OR claimed_until < now())
                 ORDER BY retry_at LIMIT 1
                 FOR UPDATE SKIP LOCKED)
             UPDATE parked_orders p SET claimed_until = now() + $2 * interval '1 second'
               FROM due WHERE p.queue = due.queue AND p.order_key = due.order_key
             RETURNING p.order_key, p.order_id, p.rounds, now() AS claimed_at",
        )
        .bind(&self.queue)
        .bind(CLAIM_SECONDS)
        .fetch_optional(&self.pool)
        .await
    }

    async fn next_waiting(&self, key: &str) -> Result<Option<Stored>, sqlx::Error> {
        sqlx::query_as(
            "SELECT seq, exchange, routing_key, body, properties FROM parked_messages
              WHERE queue = $1 AND order_key = $2 AND replayed_at IS NULL
              ORDER BY seq LIMIT 1",
        )
        .bind(&self.queue)
        .bind(key)
        .fetch_optional(&self.pool)
        .await
    }

    /// Marks a message done and extends the claim.
    async fn replayed(&self, key: &str, seq: i64, attempts: u32) -> Result<(), sqlx::Error> {
        let mut tx = eventstore::begin(&self.pool).await?;
        sqlx::query(
            "UPDATE parked_messages SET replayed_at = now(), attempts = attempts + $2 WHERE seq = $1",
        )
        .bind(seq)
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE parked_orders SET claimed_until = now() + $3 * interval '1 second'
              WHERE queue = $1 AND order_key = $2",
        )
        .bind(&self.queue)
        .bind(key)
        .bind(CLAIM_SECONDS)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The replay failed: the order stays parked with the new error, due again after
    /// the next delay (at once if someone resumed it meanwhile; never once the
    /// automatic replays are used up). Returns whether they are used up now.
    async fn failed(
        &self,
        claim: &Claim,
        seq: i64,
        reason: &str,
        attempts: u32,
    ) -> Result<bool, sqlx::Error> {
        let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
        // Before the row exists: a message of this order handled meanwhile in this
        // process looks it up instead of trusting an older "nothing parked".
        self.any_parked.parking();
        let mut tx = eventstore::begin(&self.pool).await?;
        sqlx::query(
            "UPDATE parked_messages SET error = $2, attempts = attempts + $3 WHERE seq = $1",
        )
        .bind(seq)
        .bind(reason)
        .bind(attempts)
        .execute(&mut *tx)
        .await?;
        let used_up: Option<bool> = sqlx::query_scalar(
            "UPDATE parked_orders
                SET error = $3, attempts = attempts + $4, rounds = rounds + 1,
                    updated_at = now(), claimed_until = NULL,
                    retry_at = CASE
                        WHEN resumed_at > $5 THEN now()
                        ELSE now() + $6 * interval '1 millisecond' END
              WHERE queue = $1 AND order_key = $2
          RETURNING retry_at IS NULL",
        )
        .bind(&self.queue)
        .bind(&claim.order_key)
        .bind(reason)
        .bind(attempts)
        .bind(claim.claimed_at)
        .bind(millis(replay_delay(claim.rounds + 2)))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(used_up.unwrap_or(false))
    }

    /// Deletes the order's row if no message waits any more (under the row lock that
    /// new messages take to join the queue). Returns whether it did.
    async fn unpark_if_drained(&self, key: &str) -> Result<bool, sqlx::Error> {
        let mut tx = eventstore::begin(&self.pool).await?;
        sqlx::query("SELECT 1 FROM parked_orders WHERE queue = $1 AND order_key = $2 FOR UPDATE")
            .bind(&self.queue)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM parked_messages
                             WHERE queue = $1 AND order_key = $2 AND replayed_at IS NULL)",
        )
        .bind(&self.queue)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        if waiting {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM parked_orders WHERE queue = $1 AND order_key = $2")
            .bind(&self.queue)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// A bus handler that parks messages of parked orders behind them, and parks a message
/// whose retries ran out (see [`bus::Handler::park`]). Messages that name no order
/// (a `stock.set`, an undecodable body) pass through: they keep the delay tiers and
/// the dead-letter queue.
pub struct Parking {
    lot: ParkingLot,
    inner: Arc<dyn bus::Handler>,
    order_of: fn(&Incoming) -> Option<Uuid>,
}

impl Parking {
    pub fn new(
        lot: ParkingLot,
        inner: Arc<dyn bus::Handler>,
        order_of: fn(&Incoming) -> Option<Uuid>,
    ) -> Parking {
        Parking {
            lot,
            inner,
            order_of,
        }
    }
}

impl bus::Handler for Parking {
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let Some(order_id) = (self.order_of)(&msg) else {
            return self.inner.handle(msg);
        };
        let (lot, inner) = (self.lot.clone(), self.inner.clone());
        Box::pin(async move {
            match lot.park_if_parked(&msg, order_id).await {
                Ok(true) => {
                    info!(%order_id, queue = %lot.queue, "order is parked; message parked behind it");
                    Outcome::Ack
                }
                Ok(false) => inner.handle(msg).await,
                Err(error) => Outcome::Retry {
                    reason: format!("cannot see whether order {order_id} is parked: {error}"),
                },
            }
        })
    }

    fn ordering_key(&self, msg: &Incoming) -> Option<String> {
        self.inner.ordering_key(msg)
    }

    fn park(
        &self,
        msg: &Incoming,
        reason: &str,
        attempts: u32,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        let order_id = (self.order_of)(msg)?;
        let (lot, msg, reason) = (self.lot.clone(), msg.clone(), reason.to_owned());
        Some(Box::pin(async move {
            lot.park(&msg, order_id, &reason, attempts)
                .await
                .map_err(|e| format!("parking order {order_id}: {e}"))
        }))
    }
}

/// Consumes the lot's queue with parking around `inner` (metered as the lot's worker),
/// and drains the queue's parked orders beside it until `shutdown`.
pub async fn consume_with_parking(
    bus: &Bus,
    lot: ParkingLot,
    options: ConsumeOptions,
    inner: Arc<dyn bus::Handler>,
    order_of: fn(&Incoming) -> Option<Uuid>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    use futures::FutureExt;
    let shutdown = shutdown.boxed().shared();
    let queue = lot.queue.clone();
    let handler = parked_handler(&lot, inner.clone(), order_of);
    let lot = lot.with_dead_letter_copies(bus.clone());
    let grace = options.shutdown_grace;
    let mut drainer = tokio::spawn(drain(lot, inner, shutdown.clone()));
    let consumed = bus::consume(bus, &queue, options, handler, shutdown).await;
    // A replay in progress finishes (within the grace); one cut short is taken up
    // again by a drainer once its claim lapses.
    if tokio::time::timeout(grace, &mut drainer).await.is_err() {
        drainer.abort();
    }
    Ok(consumed?)
}

/// `inner` with parking around it, metered as the lot's worker: what consumes the
/// lot's queue (or each of its partitions).
pub fn parked_handler(
    lot: &ParkingLot,
    inner: Arc<dyn bus::Handler>,
    order_of: fn(&Incoming) -> Option<Uuid>,
) -> Arc<dyn bus::Handler> {
    Arc::new(Metered::new(
        lot.worker,
        Arc::new(Parking::new(lot.clone(), inner, order_of)),
    ))
}

/// Replays due parked orders of the lot's queue, one at a time, until `shutdown`.
pub async fn drain(
    lot: ParkingLot,
    inner: Arc<dyn bus::Handler>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
        loop {
            match lot.claim_due().await {
                Ok(Some(claim)) => {
                    let span = info_span!("replay", queue = %lot.queue, order_id = %claim.order_id);
                    if let Err(error) = replay(&lot, &inner, &claim).instrument(span).await {
                        warn!(%error, order_id = %claim.order_id, "replaying a parked order failed; it stays parked");
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    warn!(%error, queue = %lot.queue, "cannot look for parked orders; trying again");
                    break;
                }
            }
        }
    }
}

/// Hands the order's parked messages to the handler in order; unparks it when none
/// is left, or leaves it parked with the error of the first that fails.
async fn replay(
    lot: &ParkingLot,
    inner: &Arc<dyn bus::Handler>,
    claim: &Claim,
) -> Result<(), sqlx::Error> {
    loop {
        let Some(parked) = lot.next_waiting(&claim.order_key).await? else {
            if lot.unpark_if_drained(&claim.order_key).await? {
                info!("parked order replayed and resumed");
                return Ok(());
            }
            continue;
        };
        match attempt(inner, parked.incoming()).await {
            (Ok(()), attempts) => lot.replayed(&claim.order_key, parked.seq, attempts).await?,
            (Err(reason), attempts) => {
                warn!(%reason, attempts, seq = parked.seq, "a parked message failed again; the order stays parked");
                if lot.failed(claim, parked.seq, &reason, attempts).await? {
                    lot.copy_to_dead_letters(claim, &parked.incoming(), &reason, attempts)
                        .await;
                }
                return Ok(());
            }
        }
    }
}

/// Runs the handler on a replayed message, retrying transient failures a few times.
async fn attempt(inner: &Arc<dyn bus::Handler>, msg: Incoming) -> (Result<(), String>, u32) {
    let mut pause = REPLAY_PAUSE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        // In a task of its own, so that a panic is a failure here, not a dead drainer.
        let handled = tokio::spawn(inner.handle(msg.clone())).await;
        let reason = match handled {
            Ok(Outcome::Ack) => return (Ok(()), attempts),
            Ok(Outcome::Retry { reason }) => reason,
            Ok(Outcome::DeadLetter { reason }) => return (Err(reason), attempts),
            // Parked messages are replayed to the worker's own handler, never a router's.
            Ok(Outcome::Forward { queue }) => {
                return (
                    Err(format!("a replay cannot be forwarded (to {queue})")),
                    attempts,
                )
            }
            Err(join_error) => return (Err(format!("handler failed: {join_error}")), attempts),
        };
        if attempts >= REPLAY_ATTEMPTS {
            return (Err(reason), attempts);
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

/// A parked order, as `orderflow parked` lists it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ParkedOrder {
    pub order_id: Uuid,
    pub queue: String,
    pub worker: String,
    pub error: String,
    pub attempts: i32,
    pub parked_at: DateTime<Utc>,
    pub retry_at: Option<DateTime<Utc>>,
    /// Messages waiting (the failing one included).
    pub waiting: i64,
}

/// Every parked order, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<ParkedOrder>, sqlx::Error> {
    sqlx::query_as(
        "SELECT o.order_id, o.queue, o.worker, o.error, o.attempts, o.parked_at, o.retry_at,
                (SELECT count(*) FROM parked_messages m
                  WHERE m.queue = o.queue AND m.order_key = o.order_key
                    AND m.replayed_at IS NULL) AS waiting
           FROM parked_orders o
          ORDER BY o.parked_at, o.queue",
    )
    .fetch_all(pool)
    .await
}

/// Asks the workers to replay the order's parked messages now (on every queue where it
/// is parked). Returns on how many queues it was parked.
pub async fn resume(pool: &PgPool, order_id: Uuid) -> Result<u64, sqlx::Error> {
    let resumed = sqlx::query(
        "UPDATE parked_orders SET retry_at = now(), resumed_at = now(), rounds = 0
          WHERE order_id = $1",
    )
    .bind(order_id)
    .execute(pool)
    .await?;
    Ok(resumed.rows_affected())
}

/// Whether the order is still parked on some queue, and with which error.
pub async fn still_parked(pool: &PgPool, order_id: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT error FROM parked_orders WHERE order_id = $1 LIMIT 1")
        .bind(order_id)
        .fetch_optional(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_replays_follow_the_delay_tiers_then_stop() {
        let delays: Vec<Option<Duration>> = (1..=5).map(replay_delay).collect();
        assert_eq!(
            delays,
            [
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(5)),
                Some(Duration::from_secs(30)),
                Some(Duration::from_secs(30)),
                None
            ]
        );
    }

    #[test]
    fn a_stored_message_comes_back_as_it_was_parked() {
        let msg = Incoming {
            exchange: "orderflow.commands".into(),
            routing_key: "order.place".into(),
            body: b"{}".to_vec(),
            message_id: Some("m-1".into()),
            correlation_id: Some("c-1".into()),
            headers: [("x-a".to_owned(), "1".to_owned())].into_iter().collect(),
            ..Incoming::default()
        };
        let stored = Stored {
            seq: 1,
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            body: msg.body.clone(),
            properties: properties(&msg),
        };
        let back = stored.incoming();
        assert_eq!(
            back,
            Incoming {
                redelivered: true,
                ..msg
            }
        );
    }
}
