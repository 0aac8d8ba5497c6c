use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::commands::OrderLine;
use domain::events::{
    PaymentCaptured, PaymentRequested, ShipmentDelivered, ShipmentShipped, StockCommitted,
    StockReserved, StockSet,
};
use domain::{order, streams, DomainEvent, Evolve, OrderInput, OrderState};
use eventstore::{EventStore, ExpectedVersion, RecordedEvent};
use projector::order_status::OrderStatusRow;
use projector::Projection;
use uuid::Uuid;

/// Generous: `read_all` waits for every transaction on the server that began before,
/// including other tests' databases.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub use testkit::fixtures::{append, line, new_events, placement};

/// One order driven through the domain's own decisions, its events appended as the
/// services would append them.
pub struct OrderScript<'a> {
    pub store: &'a EventStore,
    pub order_id: Uuid,
    pub state: OrderState,
}

impl<'a> OrderScript<'a> {
    pub fn new(store: &'a EventStore) -> Self {
        OrderScript {
            store,
            order_id: Uuid::new_v4(),
            state: OrderState::default(),
        }
    }

    pub fn placed(&self) -> anyhow::Result<&domain::events::OrderPlaced> {
        self.state
            .placed
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("order not placed"))
    }

    /// Decides `input` on the order and appends what it decided; returns the events.
    pub async fn order(&mut self, input: OrderInput<'_>) -> anyhow::Result<Vec<DomainEvent>> {
        let events = order::decide(&self.state, input);
        anyhow::ensure!(!events.is_empty(), "the order decided nothing");
        append(self.store, &streams::order(self.order_id), &events).await?;
        for e in &events {
            self.state.apply(e);
        }
        Ok(events)
    }

    pub async fn place(
        &mut self,
        items: Vec<OrderLine>,
        shipped: bool,
    ) -> anyhow::Result<Vec<DomainEvent>> {
        let events = placement(
            self.order_id,
            "tok_ok",
            &items,
            shipped,
            Utc::now() + chrono::Duration::hours(24),
        )?;
        append(self.store, &streams::order(self.order_id), &events).await?;
        for e in &events {
            self.state.apply(e);
        }
        Ok(events)
    }

    /// Reserves every line on its stock stream and tells the order.
    pub async fn reserve_all(&mut self) -> anyhow::Result<()> {
        let items = self.placed()?.items.clone();
        for (line, item) in items.iter().enumerate() {
            let reserved = StockReserved {
                sku: item.sku.clone(),
                order_id: self.order_id,
                line: u32::try_from(line)?,
                quantity: item.quantity,
            };
            append(
                self.store,
                &streams::stock(&item.sku),
                &[DomainEvent::StockReserved(reserved.clone())],
            )
            .await?;
            self.order(OrderInput::LineReserved(reserved)).await?;
        }
        Ok(())
    }

    /// Requests and captures `amount_cents` on the payment stream and tells the order.
    pub async fn capture(&mut self, amount_cents: i64) -> anyhow::Result<()> {
        let captured = PaymentCaptured {
            order_id: self.order_id,
            amount_cents,
            gateway_reference: "sim-test".to_owned(),
            unwanted: false,
        };
        append(
            self.store,
            &streams::payment(self.order_id),
            &[
                DomainEvent::PaymentRequested(PaymentRequested {
                    order_id: self.order_id,
                    amount_cents,
                    currency: "EUR".to_owned(),
                    payment_token: "tok_ok".to_owned(),
                    expires_at: Utc::now() + chrono::Duration::seconds(30),
                }),
                DomainEvent::PaymentCaptured(captured.clone()),
            ],
        )
        .await?;
        self.order(OrderInput::PaymentCaptured(captured)).await?;
        Ok(())
    }

    /// Ships (shipment + order stream in one transaction, as shipping does) and
    /// commits the stock.
    pub async fn ship(&mut self, deliver_at: DateTime<Utc>) -> anyhow::Result<()> {
        let placed = self.placed()?.clone();
        let shipped = DomainEvent::ShipmentShipped(ShipmentShipped {
            order_id: self.order_id,
            shipping: placed
                .shipping
                .clone()
                .ok_or_else(|| anyhow::anyhow!("digital order"))?,
            items: placed.items.clone(),
            deliver_at,
        });
        let mark = order::decide(&self.state, OrderInput::MarkShipped);
        anyhow::ensure!(!mark.is_empty(), "the order refused to ship");
        let mut parts = vec![
            eventstore::StreamAppend {
                stream_name: streams::shipment(self.order_id),
                expected_version: ExpectedVersion::Any,
                events: new_events(&[shipped]),
            },
            eventstore::StreamAppend {
                stream_name: streams::order(self.order_id),
                expected_version: ExpectedVersion::Any,
                events: new_events(&mark),
            },
        ];
        self.store.append_batch(std::mem::take(&mut parts)).await?;
        for e in &mark {
            self.state.apply(e);
        }
        for (line, item) in placed.items.iter().enumerate() {
            append(
                self.store,
                &streams::stock(&item.sku),
                &[DomainEvent::StockCommitted(StockCommitted {
                    sku: item.sku.clone(),
                    order_id: self.order_id,
                    line: u32::try_from(line)?,
                    quantity: item.quantity,
                })],
            )
            .await?;
        }
        Ok(())
    }

    pub async fn deliver(&mut self) -> anyhow::Result<()> {
        append(
            self.store,
            &streams::shipment(self.order_id),
            &[DomainEvent::ShipmentDelivered(ShipmentDelivered {
                order_id: self.order_id,
            })],
        )
        .await
    }
}

pub async fn set_stock(store: &EventStore, sku: &str, quantity: i64) -> anyhow::Result<()> {
    append(
        store,
        &streams::stock(sku),
        &[DomainEvent::StockSet(StockSet {
            sku: sku.to_owned(),
            quantity,
        })],
    )
    .await
}

/// Events after the projection's checkpoint (0: caught up).
pub async fn behind(store: &EventStore, projection: &dyn Projection) -> anyhow::Result<i64> {
    let at = store
        .load_checkpoint(&format!("projection:{}", projection.name()))
        .await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (transaction_id, global_position) > ($1, $2)",
    )
    .bind(at.transaction_id)
    .bind(at.global_position)
    .fetch_one(store.pool())
    .await?;
    Ok(n)
}

/// Runs `run_once` until the projection has applied every event in the log.
pub async fn catch_up(store: &EventStore, projection: &dyn Projection) -> anyhow::Result<()> {
    testkit::wait_until(
        &format!("{} to catch up", projection.name()),
        DEADLINE,
        || async {
            while projector::run_once(store, projection).await? > 0 {}
            Ok((behind(store, projection).await? == 0).then_some(()))
        },
    )
    .await
}

pub async fn catch_up_all(store: &EventStore) -> anyhow::Result<()> {
    for projection in projector::all_projections() {
        catch_up(store, projection.as_ref()).await?;
    }
    Ok(())
}

pub async fn order_rows(store: &EventStore) -> anyhow::Result<Vec<OrderStatusRow>> {
    Ok(sqlx::query_as(
        "SELECT order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                placed_at, updated_at, last_global_position FROM order_status ORDER BY order_id",
    )
    .fetch_all(store.pool())
    .await?)
}

pub async fn order_row(
    store: &EventStore,
    order_id: Uuid,
) -> anyhow::Result<Option<OrderStatusRow>> {
    Ok(order_rows(store)
        .await?
        .into_iter()
        .find(|r| r.order_id == order_id))
}

pub async fn stock_rows(store: &EventStore) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(
        sqlx::query_as("SELECT sku, on_hand, reserved FROM stock_levels ORDER BY sku")
            .fetch_all(store.pool())
            .await?,
    )
}

pub async fn timer_rows(
    store: &EventStore,
) -> anyhow::Result<Vec<(Uuid, String, Uuid, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT timer_id, kind, order_id, due_at FROM timers ORDER BY order_id, kind, timer_id",
    )
    .fetch_all(store.pool())
    .await?)
}

/// The stream's events as stored.
pub async fn stream(store: &EventStore, name: &str) -> anyhow::Result<Vec<RecordedEvent>> {
    Ok(store.read_stream(name, 0).await?)
}

/// The last stored event of `event_type` on `name`.
pub async fn last_of(
    store: &EventStore,
    name: &str,
    event_type: &str,
) -> anyhow::Result<RecordedEvent> {
    stream(store, name)
        .await?
        .into_iter()
        .rev()
        .find(|r| r.event_type == event_type)
        .ok_or_else(|| anyhow::anyhow!("no {event_type} on {name}"))
}

/// A projection that does what `inner` does, but on page `at` (1-based) applies the
/// page and then stops in the middle of its transaction: it fails (`Stop::Fail`; on
/// that page and every later one with `Stop::FailEvery`) or signals `reached` and
/// waits for `release` (`Stop::Hold`; never released = a crash).
pub struct Interrupted {
    pub inner: std::sync::Arc<dyn Projection>,
    pub at: usize,
    pub stop: Stop,
    pub pages: std::sync::atomic::AtomicUsize,
    pub reached: std::sync::Arc<tokio::sync::Notify>,
    pub release: std::sync::Arc<tokio::sync::Notify>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Fail,
    FailEvery,
    Hold,
}

impl Interrupted {
    pub fn new(inner: std::sync::Arc<dyn Projection>, at: usize, stop: Stop) -> Self {
        Interrupted {
            inner,
            at,
            stop,
            pages: std::sync::atomic::AtomicUsize::new(0),
            reached: std::sync::Arc::default(),
            release: std::sync::Arc::default(),
        }
    }
}

impl Projection for Interrupted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn tables(&self) -> &'static [&'static str] {
        self.inner.tables()
    }

    fn state_tables(&self) -> &'static [&'static str] {
        self.inner.state_tables()
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        events: &'a [domain::EventEnvelope],
    ) -> futures::future::BoxFuture<'a, Result<(), projector::ProjectorError>> {
        Box::pin(async move {
            let page = self.pages.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            self.inner.apply_page(conn, events).await?;
            let failing_from_here = self.stop == Stop::FailEvery && page > self.at;
            if page == self.at || failing_from_here {
                match self.stop {
                    Stop::Fail | Stop::FailEvery => {
                        return Err(projector::ProjectorError::UnknownProjection(
                            "injected failure".to_owned(),
                        ))
                    }
                    Stop::Hold => {
                        self.reached.notify_one();
                        self.release.notified().await;
                    }
                }
            }
            Ok(())
        })
    }
}

/// A log of more than two projector pages: stock set and reserved one unit at a time
/// on five SKUs, plus a few orders. Returns the expected (sku, on_hand, reserved).
pub async fn big_log(store: &EventStore) -> anyhow::Result<Vec<(String, i64, i64)>> {
    const SKUS: usize = 5;
    const START: i64 = 1_000_000;
    let mut expected = Vec::new();
    for s in 0..SKUS {
        set_stock(store, &format!("S{s}"), START).await?;
    }
    let mut reserved = [0i64; SKUS];
    for batch in 0..50 {
        let s = batch % SKUS;
        let sku = format!("S{s}");
        let events: Vec<DomainEvent> = (0..100)
            .map(|_| {
                DomainEvent::StockReserved(StockReserved {
                    sku: sku.clone(),
                    order_id: Uuid::new_v4(),
                    line: 0,
                    quantity: 1,
                })
            })
            .collect();
        reserved[s] += 100;
        append(store, &streams::stock(&sku), &events).await?;
        if batch % 10 == 0 {
            let mut order = OrderScript::new(store);
            order.place(vec![line(&sku, 2, 300)], true).await?;
            order.reserve_all().await?;
            order.capture(600).await?;
            reserved[s] += 2;
        }
    }
    for (s, held) in reserved.iter().enumerate() {
        expected.push((format!("S{s}"), START - held, *held));
    }
    Ok(expected)
}

/// Everything the projections wrote, for comparing two builds.
pub async fn all_rows(
    store: &EventStore,
) -> anyhow::Result<(
    Vec<OrderStatusRow>,
    Vec<(String, i64, i64)>,
    Vec<(Uuid, String, Uuid, DateTime<Utc>)>,
)> {
    Ok((
        order_rows(store).await?,
        stock_rows(store).await?,
        timer_rows(store).await?,
    ))
}

pub async fn milestone_rows(
    store: &EventStore,
) -> anyhow::Result<Vec<projector::milestones::MilestoneRow>> {
    Ok(sqlx::query_as(
        "SELECT order_id, milestone, reached_at, global_position FROM order_milestones
          ORDER BY order_id, milestone",
    )
    .fetch_all(store.pool())
    .await?)
}

pub async fn progress_rows(
    store: &EventStore,
) -> anyhow::Result<Vec<(String, i64, String, String)>> {
    Ok(sqlx::query_as(
        "SELECT stream_name, version, status, lines FROM order_milestone_progress
          ORDER BY stream_name",
    )
    .fetch_all(store.pool())
    .await?)
}

/// Every table the projections write (their state tables included).
pub type Rows = (
    (
        Vec<projector::order_status::OrderStatusRow>,
        Vec<(String, i64, i64)>,
        Vec<(Uuid, String, Uuid, DateTime<Utc>)>,
    ),
    Vec<projector::milestones::MilestoneRow>,
    Vec<(String, i64, String, String)>,
);

pub async fn every_row(store: &EventStore) -> anyhow::Result<Rows> {
    Ok((
        all_rows(store).await?,
        milestone_rows(store).await?,
        progress_rows(store).await?,
    ))
}

/// Every projection's checkpoint, by name.
pub async fn checkpoints(store: &EventStore) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT name, transaction_id, global_position FROM checkpoints
          WHERE name LIKE 'projection:%' ORDER BY name",
    )
    .fetch_all(store.pool())
    .await?)
}

pub async fn replay_all(store: &EventStore) -> anyhow::Result<()> {
    for projection in projector::all_projections() {
        projector::replay(store, projection, |_| {}).await?;
    }
    Ok(())
}

/// Waits until every event in the log is visible to followers, so that pages are full
/// and a `run_once` that follows reads something.
pub async fn wait_readable(store: &EventStore) -> anyhow::Result<()> {
    testkit::wait_readable(store, DEADLINE).await?;
    Ok(())
}
