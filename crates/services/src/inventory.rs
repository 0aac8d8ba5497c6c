//! Inventory: reserves each order line on its `stock-<sku>` stream (multi-instance: one
//! reservation per line, decided independently and concurrently), releases on
//! compensation, and commits reserved units when they ship or a digital order completes.
use domain::commands::OrderLine;
use domain::{stock, streams, DomainEvent, EventEnvelope, StockInput, StockState};
use eventstore::EventStore;
use futures::future::{try_join_all, BoxFuture};
use tracing::info;
use uuid::Uuid;

use crate::exec::{decide_together_on_cached, Cause, StreamCache};
use crate::worker::EventService;
use crate::ServiceError;

pub struct Inventory {
    store: EventStore,
    /// Stock streams are long (every order touches them): fold only what is new, and
    /// after a restart start from the stream's snapshot.
    cache: StreamCache<StockState>,
}

/// SKUs whose folded stock is kept in memory.
const CACHED_SKUS: usize = 10_000;

impl Inventory {
    pub fn new(store: EventStore) -> Inventory {
        Inventory {
            store,
            cache: StreamCache::with_snapshots(CACHED_SKUS, crate::snapshots::stock()),
        }
    }

    async fn on_line(
        &self,
        cause: &Cause,
        sku: &str,
        input: StockInput,
    ) -> Result<(), ServiceError> {
        // Every order reserves and commits on the streams of its SKUs: a popular SKU's
        // stream is hot, so the decisions queued for it are appended together.
        let decided = decide_together_on_cached(
            &self.store,
            &self.cache,
            &streams::stock(sku),
            cause,
            move |s| stock::decide(s, input.clone()),
        )
        .await?;
        for e in decided.events() {
            info!(sku, event = e.event_type(), "stock moved");
        }
        Ok(())
    }

    /// One independent decision per line, run concurrently; each has its own ids.
    async fn per_line(
        &self,
        cause: &Cause,
        step: &str,
        order_id: Uuid,
        items: &[OrderLine],
        input: impl Fn(u32, &OrderLine) -> StockInput,
    ) -> Result<(), ServiceError> {
        let lines = items.iter().enumerate().map(|(i, line)| {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let cause = cause.for_handler(format!("inventory.{step}.{order_id}.{index}"));
            let input = input(index, line);
            async move { self.on_line(&cause, &line.sku, input).await }
        });
        try_join_all(lines).await.map(|_| ())
    }

    pub async fn react(&self, env: &EventEnvelope) -> Result<(), ServiceError> {
        let cause = Cause::new(env.event_id, env.correlation_id, "inventory");
        match &env.event {
            DomainEvent::OrderAccepted(e) => {
                self.per_line(&cause, "reserve", e.order_id, &e.items, |line, l| {
                    StockInput::Reserve {
                        sku: l.sku.clone(),
                        order_id: e.order_id,
                        line,
                        quantity: l.quantity,
                    }
                })
                .await
            }
            DomainEvent::StockReleaseRequested(e) => {
                let input = StockInput::Release {
                    sku: e.sku.clone(),
                    order_id: e.order_id,
                    line: e.line,
                };
                self.on_line(&cause, &e.sku, input).await
            }
            DomainEvent::OrderCompleted(e) => self.commit(&cause, e.order_id, &e.items).await,
            DomainEvent::ShipmentShipped(e) => self.commit(&cause, e.order_id, &e.items).await,
            _ => Ok(()),
        }
    }

    async fn commit(
        &self,
        cause: &Cause,
        order_id: Uuid,
        items: &[OrderLine],
    ) -> Result<(), ServiceError> {
        self.per_line(cause, "commit", order_id, items, |line, l| {
            StockInput::Commit {
                sku: l.sku.clone(),
                order_id,
                line,
            }
        })
        .await
    }
}

impl EventService for Inventory {
    fn name(&self) -> &'static str {
        "inventory"
    }

    fn on_event(&self, env: EventEnvelope) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.react(&env).await })
    }
}
