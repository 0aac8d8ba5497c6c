//! The order saga's reactions: outcomes of the parallel branches (stock, payment) are
//! recorded on the order stream, where the pure process manager (`domain::order`)
//! joins them and decides confirmation or compensation.
use domain::{order, streams, DomainEvent, EventEnvelope, OrderInput, OrderState};
use eventstore::EventStore;
use futures::future::BoxFuture;
use tracing::info;

use std::sync::Arc;

use crate::exec::{decide_together_on_cached, Cause, SharedCaches, StreamCache};
use crate::worker::EventService;
use crate::ServiceError;

pub struct OrderSaga {
    store: EventStore,
    /// Folded order streams, shared with the process's other workers: most of an
    /// order's events reach the same process one after another, which then decides
    /// without reading the stream again.
    orders: Arc<StreamCache<OrderState>>,
}

impl OrderSaga {
    /// A saga with caches of its own.
    pub fn new(store: EventStore) -> OrderSaga {
        OrderSaga::sharing(store, &SharedCaches::default())
    }

    /// A saga that decides on the order states the process's other workers left.
    pub fn sharing(store: EventStore, caches: &SharedCaches) -> OrderSaga {
        OrderSaga {
            store,
            orders: Arc::clone(&caches.orders),
        }
    }

    /// The saga's input for an event, if the saga cares about it.
    fn input(event: &DomainEvent) -> Option<OrderInput<'static>> {
        Some(match event {
            DomainEvent::StockReserved(e) => OrderInput::LineReserved(e.clone()),
            DomainEvent::StockReservationFailed(e) => OrderInput::LineOutOfStock(e.clone()),
            DomainEvent::PaymentCaptured(e) => OrderInput::PaymentCaptured(e.clone()),
            DomainEvent::PaymentDeclined(e) => OrderInput::PaymentDeclined(e.clone()),
            DomainEvent::PaymentTimedOut(e) => OrderInput::PaymentTimedOut(e.clone()),
            _ => return None,
        })
    }

    pub async fn react(&self, env: &EventEnvelope) -> Result<(), ServiceError> {
        let (Some(input), Some(order_id)) = (Self::input(&env.event), env.event.order_id()) else {
            return Ok(());
        };
        let cause = Cause::new(env.event_id, env.correlation_id, "order");
        // A burst brings an order's outcomes (each line's reservation, the capture)
        // within milliseconds of each other: those queued for the order's turn are
        // decided in order and appended together.
        let decided = decide_together_on_cached(
            &self.store,
            &self.orders,
            &streams::order(order_id),
            &cause,
            move |s: &OrderState| order::decide(s, input.clone()),
        )
        .await?;
        let types: Vec<&str> = decided.events().iter().map(|e| e.event_type()).collect();
        if !types.is_empty() {
            info!(%order_id, events = ?types, "order saga moved on");
        }
        Ok(())
    }
}

impl EventService for OrderSaga {
    fn name(&self) -> &'static str {
        "order"
    }

    fn on_event(&self, env: EventEnvelope) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.react(&env).await })
    }
}
