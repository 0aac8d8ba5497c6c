//! Shipping: the sub-process of physical orders. Ships a confirmed order and starts the
//! simulated carrier's delivery timer; the timer records the delivery.
//!
//! Shipping asks the order saga first (`MarkShipped`) and appends `OrderShipped` on the
//! order stream together with `ShipmentShipped`, in one transaction with both expected
//! versions: a cancellation racing with shipping either lands first (nothing ships) or
//! finds the order shipped (and is refused).
use chrono::Utc;
use domain::{
    order, shipment, streams, DomainEvent, EventEnvelope, OrderInput, OrderState, ShipmentInput,
    ShipmentState,
};
use eventstore::EventStore;
use futures::future::BoxFuture;
use tracing::info;

use crate::exec::{append_together, load, Cause};
use crate::worker::EventService;
use crate::ServiceError;

const MAX_ATTEMPTS: usize = 20;

pub struct Shipping {
    store: EventStore,
}

impl Shipping {
    pub fn new(store: EventStore) -> Shipping {
        Shipping { store }
    }

    pub async fn react(&self, env: &EventEnvelope) -> Result<(), ServiceError> {
        let DomainEvent::OrderConfirmed(confirmed) = &env.event else {
            return Ok(());
        };
        if confirmed.shipping.is_none() {
            return Ok(());
        }
        let cause = Cause::new(env.event_id, env.correlation_id, "shipping.ship");
        let order_stream = streams::order(confirmed.order_id);
        let shipment_stream = streams::shipment(confirmed.order_id);
        for _ in 0..MAX_ATTEMPTS {
            let order_loaded = load::<OrderState>(&self.store, &order_stream).await?;
            let shipment_loaded = load::<ShipmentState>(&self.store, &shipment_stream).await?;
            let order_events = order::decide(&order_loaded.state, OrderInput::MarkShipped);
            let shipment_events = shipment::decide(
                &shipment_loaded.state,
                ShipmentInput::Ship {
                    confirmed,
                    now: Utc::now(),
                },
            );
            if order_events.is_empty() || shipment_events.is_empty() {
                info!(order_id = %confirmed.order_id, "not shipping: the order moved on or is shipped already");
                return Ok(());
            }
            let parts = vec![
                (order_stream.clone(), order_loaded.version, order_events),
                (
                    shipment_stream.clone(),
                    shipment_loaded.version,
                    shipment_events,
                ),
            ];
            match append_together(&self.store, &cause, parts).await {
                Ok(_) => {
                    info!(order_id = %confirmed.order_id, "order shipped");
                    return Ok(());
                }
                Err(ServiceError::Store(eventstore::StoreError::Conflict { .. })) => continue,
                Err(other) => return Err(other),
            }
        }
        Err(ServiceError::Contended {
            stream: order_stream,
        })
    }
}

impl EventService for Shipping {
    fn name(&self) -> &'static str {
        "shipping"
    }

    fn on_event(&self, env: EventEnvelope) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.react(&env).await })
    }
}
