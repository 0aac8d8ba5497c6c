//! Notifications: one row per customer-facing change, with the text the customer gets.
//! A failure here never blocks the flow: the notification queue is separate, and the
//! message is retried or dead-lettered on its own.
use std::sync::Mutex;
use std::time::Duration;

use domain::events::CancelReason;
use domain::{DomainEvent, EventEnvelope};
use eventstore::EventStore;
use futures::future::BoxFuture;
use tokio::sync::oneshot;
use tracing::info;
use uuid::Uuid;

use crate::generations::Generations;
use crate::worker::EventService;
use crate::ServiceError;

pub struct Notifications {
    store: EventStore,
    /// Order → customer, remembered from the first read: an order's customer never
    /// changes, and reading it from the log for every notification was a query per
    /// message. Bounded: forgets the orders seen longest ago.
    customers: Mutex<Generations<String, Uuid>>,
    /// Notifications waiting to be written with the next batch ([`Notifications::write`]).
    queue: Mutex<Batch>,
    /// Batches written at once: while one waits for its commit, the rows queued
    /// meanwhile go out in another instead of waiting for it.
    writing: tokio::sync::Semaphore,
    /// [`LINGER`] unless a test asks for another.
    linger: Duration,
}

/// The batch being gathered.
#[derive(Default)]
struct Batch {
    rows: Vec<Queued>,
    /// How many batches have been taken to be written: a handler whose batch number
    /// moved on knows its row is being written by someone else.
    taken: u64,
}

/// A notification row.
struct Notification {
    event_id: Uuid,
    order_id: Uuid,
    customer_id: Option<String>,
    kind: &'static str,
    message: String,
}

/// A queued notification and where to say whether it was written.
type Queued = (Notification, oneshot::Sender<Result<(), String>>);

/// Notification batches written at the same time.
const WRITERS: usize = 4;

/// How long a notification waits for others to share its INSERT before its handler
/// writes the batch itself. Nothing in the order's course waits for a notification,
/// and one INSERT per few rows was two commits per order (4 Dec, pg_stat_statements:
/// 2.08 inserts for 3.5 notifications).
const LINGER: Duration = Duration::from_millis(20);

/// A batch this long is written without waiting out the linger.
const FULL_BATCH: usize = 128;

/// A batch this long is written once the handlers ready to run have added their rows,
/// without waiting out the linger. Rows come this fast only while the notification
/// queue has a backlog, and then the linger is what limits the rate: each of the
/// consumer's lanes (one per order key) adds one row per batch, so fewer lanes than
/// [`FULL_BATCH`] with work meant one batch per linger (5 Dec, a burst of 10,000 orders:
/// the last notification 2.8 s after the last final status, about 75 rows an insert,
/// one insert per 20 ms).
const BUSY_BATCH: usize = 32;

/// Orders whose customer is remembered at once: more than a burst keeps in flight.
/// Emptying a map of 10,000 when full (until 5 Dec) made every later notification of a
/// burst's first 10,000 orders read its customer from the log, each in turn on its
/// order's lane: the notification worker in a process of its own then wrote the last
/// of a burst's notifications 10 s after the last final status. About 5 MiB when full.
const REMEMBERED_CUSTOMERS: usize = 65_536;

/// The kind and text of the notification an event gives the customer, if any.
pub fn notification_for(event: &DomainEvent) -> Option<(&'static str, String)> {
    use DomainEvent::*;
    Some(match event {
        OrderPlaced(e) => (
            "placed",
            format!(
                "We received your order {} ({} items).",
                e.order_id, e.item_count
            ),
        ),
        OrderRejected(e) => (
            "rejected",
            format!(
                "Your order {} could not be accepted: {}.",
                e.order_id, e.detail
            ),
        ),
        OrderSentForReview(e) => (
            "under_review",
            format!("Your order {} is being reviewed.", e.order_id),
        ),
        OrderConfirmed(e) => (
            "confirmed",
            format!("Your order {} is confirmed.", e.order_id),
        ),
        OrderCompleted(e) => (
            "completed",
            format!(
                "Your order {} is complete; your downloads are ready.",
                e.order_id
            ),
        ),
        ShipmentShipped(e) => (
            "shipped",
            format!(
                "Your order {} is on its way ({} shipping).",
                e.order_id,
                e.shipping.method.as_str()
            ),
        ),
        ShipmentDelivered(e) => (
            "delivered",
            format!("Your order {} was delivered.", e.order_id),
        ),
        OrderCancelled(e) => (
            "cancelled",
            format!(
                "Your order {} was cancelled: {}.",
                e.order_id,
                cancel_text(e.reason)
            ),
        ),
        _ => return None,
    })
}

fn cancel_text(reason: CancelReason) -> &'static str {
    match reason {
        CancelReason::InvalidOrder => "the order was invalid",
        CancelReason::PaymentDeclined => "the payment was declined",
        CancelReason::PaymentTimeout => "the payment did not go through in time",
        CancelReason::OutOfStock => "an item is out of stock",
        CancelReason::CustomerCancelled => "you cancelled it",
        CancelReason::ReviewRejected => "it did not pass our review",
        CancelReason::ReviewExpired => "its review was not completed in time",
    }
}

impl Notifications {
    pub fn new(store: EventStore) -> Notifications {
        Notifications {
            store,
            customers: Mutex::new(Generations::new(REMEMBERED_CUSTOMERS)),
            queue: Mutex::new(Batch::default()),
            writing: tokio::sync::Semaphore::new(WRITERS),
            linger: LINGER,
        }
    }

    /// The same service with a row waiting `linger` for others to share its INSERT
    /// (the default, [`LINGER`], is what production runs with).
    pub fn with_linger(self, linger: Duration) -> Notifications {
        Notifications { linger, ..self }
    }

    pub async fn react(&self, env: &EventEnvelope) -> Result<(), ServiceError> {
        let (Some((kind, message)), Some(order_id)) =
            (notification_for(&env.event), env.event.order_id())
        else {
            return Ok(());
        };
        let customer_id = self.customer_of(order_id, &env.event).await?;
        self.write(Notification {
            event_id: env.event_id,
            order_id,
            customer_id,
            kind,
            message,
        })
        .await?;
        info!(%order_id, kind, "customer notified");
        Ok(())
    }

    /// Writes the notification together with the others handled within the linger of
    /// it ([`LINGER`]; group commit): they share one INSERT and one commit instead of
    /// one each. While rows come fast (a batch of [`BUSY_BATCH`]), the batch goes as
    /// soon as the handlers ready to run have added theirs, and the batches that wait
    /// for a free writer grow meanwhile.
    /// Returns once the row is committed, so each message is still acknowledged only
    /// after its own effect is durable; a failed INSERT fails every message in it, and
    /// each is retried on its own (the insert is idempotent by event id).
    ///
    /// Every handler writes the batch its row is in when the linger is up and nobody
    /// took it meanwhile, so a handler that is cancelled (its timeout) leaves no row
    /// behind for good: the next handler's batch carries it.
    async fn write(&self, notification: Notification) -> Result<(), ServiceError> {
        let (done, mut written) = oneshot::channel();
        let (batch, rows) = {
            let mut queue = self.queued();
            queue.rows.push((notification, done));
            (queue.taken, queue.rows.len())
        };
        if (BUSY_BATCH..FULL_BATCH).contains(&rows) {
            // The handlers that are ready to run add their rows first.
            tokio::task::yield_now().await;
        }
        if rows < BUSY_BATCH {
            if let Ok(outcome) = tokio::time::timeout(self.linger, &mut written).await {
                return written_outcome(outcome);
            }
        }
        self.write_batch(batch).await?;
        written_outcome(written.await)
    }

    /// Writes batch number `batch` unless another handler took it already.
    async fn write_batch(&self, batch: u64) -> Result<(), ServiceError> {
        if self.queued().taken != batch {
            return Ok(());
        }
        let _turn = self.writing.acquire().await.map_err(|_| {
            ServiceError::BatchedWrite("the notification writers were closed".to_owned())
        })?;
        let rows = {
            let mut queue = self.queued();
            if queue.taken != batch {
                return Ok(());
            }
            queue.taken += 1;
            std::mem::take(&mut queue.rows)
        };
        let result = self
            .insert(rows.iter().map(|(n, _)| n))
            .await
            .map_err(|e| e.to_string());
        for (_, done) in rows {
            let _ = done.send(result.clone());
        }
        Ok(())
    }

    async fn insert(&self, batch: impl Iterator<Item = &Notification>) -> Result<(), sqlx::Error> {
        let (mut ids, mut orders, mut customers, mut kinds, mut messages) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for n in batch {
            ids.push(n.event_id);
            orders.push(n.order_id);
            customers.push(n.customer_id.clone());
            kinds.push(n.kind);
            messages.push(n.message.clone());
        }
        sqlx::query(
            "INSERT INTO notifications (event_id, order_id, customer_id, kind, message)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[])
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(ids)
        .bind(orders)
        .bind(customers)
        .bind(kinds)
        .bind(messages)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, Batch> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn customer_of(
        &self,
        order_id: Uuid,
        event: &DomainEvent,
    ) -> Result<Option<String>, ServiceError> {
        if let DomainEvent::OrderPlaced(e) = event {
            self.remember(order_id, &e.customer_id);
            return Ok(Some(e.customer_id.clone()));
        }
        if let Some(customer) = self.remembered().get(&order_id) {
            return Ok(Some(customer.clone()));
        }
        let customer = crate::commands::customer_of(&self.store, order_id).await?;
        if let Some(customer) = &customer {
            self.remember(order_id, customer);
        }
        Ok(customer)
    }

    fn remember(&self, order_id: Uuid, customer: &str) {
        self.remembered().insert(order_id, customer.to_owned());
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Generations<String, Uuid>> {
        self.customers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a handler learns of its row's batch.
fn written_outcome(
    outcome: Result<Result<(), String>, oneshot::error::RecvError>,
) -> Result<(), ServiceError> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(ServiceError::BatchedWrite(reason)),
        Err(_) => Err(ServiceError::BatchedWrite(
            "the writer of the batch stopped before it finished".to_owned(),
        )),
    }
}

impl EventService for Notifications {
    fn name(&self) -> &'static str {
        "notification"
    }

    fn on_event(&self, env: EventEnvelope) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.react(&env).await })
    }
}
