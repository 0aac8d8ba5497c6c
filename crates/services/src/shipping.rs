//! Shipping: the sub-process of physical orders. Ships a confirmed order and starts the
//! simulated carrier's delivery timer; the timer records the delivery.
//!
//! Shipping asks the order saga first (`MarkShipped`) and appends `OrderShipped` on the
//! order stream together with `ShipmentShipped`, in one transaction with both expected
//! versions: a cancellation racing with shipping either lands first (nothing ships) or
//! finds the order shipped (and is refused).
use std::sync::Arc;

use chrono::Utc;
use domain::{
    order, shipment, streams, DomainEvent, EventEnvelope, Evolve, OrderInput, OrderState,
    ShipmentInput, ShipmentState,
};
use eventstore::EventStore;
use futures::future::BoxFuture;
use projector::timers::{self, TimerChange};
use tracing::info;

use crate::exec::{append_together, cached_or_read, Cause, SharedCaches, StreamCache};
use crate::timers::{DueTimer, Handover};
use crate::worker::EventService;
use crate::ServiceError;

const MAX_ATTEMPTS: usize = 20;

pub struct Shipping {
    store: EventStore,
    /// The order states the saga left (shared): shipping decides on the one that just
    /// confirmed the order, without reading its stream.
    orders: Arc<StreamCache<OrderState>>,
    /// Shipments, shared with the delivery timer.
    shipments: Arc<StreamCache<ShipmentState>>,
    /// The process's scheduler, to which a delivery due soon is handed over.
    timers: Handover,
}

impl Shipping {
    /// Shipping with caches of its own.
    pub fn new(store: EventStore) -> Shipping {
        Shipping::sharing(store, &SharedCaches::default())
    }

    /// Shipping that decides on the order states the process's other workers left.
    pub fn sharing(store: EventStore, caches: &SharedCaches) -> Shipping {
        Shipping {
            store,
            orders: Arc::clone(&caches.orders),
            shipments: Arc::clone(&caches.shipments),
            timers: caches.timers.clone(),
        }
    }

    /// Ships on the cached order and shipment states, as `decide_on_cached` decides on
    /// one stream: a stale cache is refused as a conflict on append, and a decision
    /// not to ship is confirmed on the streams read from the log before it counts.
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
        let _turn = self.orders.serialise(&order_stream).await;
        self.shipments.assume_new(&shipment_stream);
        let mut must_read = false;
        for _ in 0..MAX_ATTEMPTS {
            let (mut order_state, order_version, order_read) =
                cached_or_read(&self.store, &self.orders, &order_stream, must_read).await?;
            let (mut shipment_state, shipment_version, shipment_read) =
                cached_or_read(&self.store, &self.shipments, &shipment_stream, must_read).await?;
            let order_events = order::decide(&order_state, OrderInput::MarkShipped);
            let shipment_events = shipment::decide(
                &shipment_state,
                ShipmentInput::Ship {
                    confirmed,
                    now: Utc::now(),
                },
            );
            if order_events.is_empty() || shipment_events.is_empty() {
                if !(order_read && shipment_read) {
                    must_read = true;
                    continue;
                }
                info!(order_id = %confirmed.order_id, "not shipping: the order moved on or is shipped already");
                return Ok(());
            }
            let parts = vec![
                (order_stream.clone(), order_version, order_events.clone()),
                (
                    shipment_stream.clone(),
                    shipment_version,
                    shipment_events.clone(),
                ),
            ];
            match append_together(&self.store, &cause, parts).await {
                Ok(appended) => {
                    if appended {
                        remember(
                            &self.orders,
                            &order_stream,
                            &mut order_state,
                            order_version,
                            &order_events,
                        );
                        remember(
                            &self.shipments,
                            &shipment_stream,
                            &mut shipment_state,
                            shipment_version,
                            &shipment_events,
                        );
                        self.hand_over_timers(&cause, order_events.len(), &shipment_events);
                        info!(order_id = %confirmed.order_id, "order shipped");
                    }
                    return Ok(());
                }
                Err(ServiceError::Store(eventstore::StoreError::Conflict { .. })) => {
                    must_read = true;
                }
                Err(other) => return Err(other),
            }
        }
        Err(ServiceError::Contended {
            stream: order_stream,
        })
    }

    /// Hands the timers a shipment just appended schedules (its delivery; its events
    /// numbered from `first_index` of `cause`'s) to the process's scheduler, when they
    /// are due soon.
    fn hand_over_timers(&self, cause: &Cause, first_index: usize, events: &[DomainEvent]) {
        for (i, event) in events.iter().enumerate() {
            let event_id = cause.event_id(first_index + i);
            if let Some(TimerChange::Schedule {
                order_id,
                kind,
                timer_id,
                due_at,
            }) = timers::change_of(event_id, event)
            {
                let timer = DueTimer {
                    timer_id,
                    kind: kind.to_owned(),
                    order_id,
                    due_at,
                };
                self.timers.offer(timer, Utc::now());
            }
        }
    }
}

/// Caches the state after `events`, appended at `version`.
fn remember<S: Evolve + Clone>(
    cache: &StreamCache<S>,
    stream: &str,
    state: &mut S,
    version: Option<i64>,
    events: &[DomainEvent],
) {
    for event in events {
        state.apply(event);
    }
    let appended = i64::try_from(events.len()).unwrap_or(i64::MAX);
    cache.put(stream, state, Some(version.unwrap_or(-1) + appended));
}

impl EventService for Shipping {
    fn name(&self) -> &'static str {
        "shipping"
    }

    fn on_event(&self, env: EventEnvelope) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.react(&env).await })
    }
}
