//! Adapters from the bus's `Handler` to the services: decode, open a span with the
//! message's ids, call the service, turn its result into ack / retry / dead letter.
use std::sync::Arc;

use bus::{Incoming, Outcome};
use domain::EventEnvelope;
use futures::future::BoxFuture;
use tracing::{warn, Instrument};

use crate::message::decode_event;
use crate::ServiceError;

/// A service that reacts to events from `orderflow.events`.
pub trait EventService: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn on_event(&self, env: EventEnvelope) -> BoxFuture<'_, Result<(), ServiceError>>;
}

/// Runs an [`EventService`] as a bus handler.
pub struct EventHandler<S>(pub Arc<S>);

impl<S: EventService> bus::Handler for EventHandler<S> {
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let service = Arc::clone(&self.0);
        Box::pin(async move {
            let env = match decode_event(&msg) {
                Ok(env) => env,
                Err(reason) => return Outcome::DeadLetter { reason },
            };
            let span = tracing::info_span!(
                "event",
                service = service.name(),
                event_type = env.event.event_type(),
                event_id = %env.event_id,
                stream = %env.stream_name,
                correlation_id = %env.correlation_id,
                causation_id = %env.causation_id,
            );
            outcome(service.on_event(env).instrument(span.clone()).await, &span)
        })
    }
}

/// The order an event is about (every event but a `stock.set`'s names one): such an
/// event can be parked behind its order.
///
/// Read from the body's `order_id` alone (every event that has an order names it so):
/// finding a delivery's lane and parking key runs before the handler, which decodes
/// the whole event anyway, so a full decode here was a second one per delivery.
pub fn event_order(msg: &Incoming) -> Option<uuid::Uuid> {
    #[derive(serde::Deserialize)]
    struct About {
        order_id: Option<uuid::Uuid>,
    }
    serde_json::from_slice::<About>(&msg.body).ok()?.order_id
}

/// An event handler whose events for one order are handled one after another, in
/// delivery order, within the process (the consume loop's lanes, key `order:<id>`), so
/// that a later event of an order waits while an earlier one is retried, and parks
/// behind it if that one parks. Not for a worker whose handler may hang on an outside
/// call (payment): a lane is shared by many orders, and they would wait too.
pub struct PerOrder(pub Arc<dyn bus::Handler>);

impl bus::Handler for PerOrder {
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        self.0.handle(msg)
    }

    fn ordering_key(&self, msg: &Incoming) -> Option<String> {
        event_order(msg).map(crate::parking::order_key)
    }
}

/// Maps a service result to what the bus does with the message.
pub fn outcome(result: Result<(), ServiceError>, span: &tracing::Span) -> Outcome {
    match result {
        Ok(()) => Outcome::Ack,
        Err(error) if error.is_transient() => {
            span.in_scope(|| warn!(%error, "handling failed; will retry"));
            Outcome::Retry {
                reason: error.to_string(),
            }
        }
        Err(error) => {
            span.in_scope(|| warn!(%error, "handling can never succeed; dead-lettering"));
            Outcome::DeadLetter {
                reason: error.to_string(),
            }
        }
    }
}
