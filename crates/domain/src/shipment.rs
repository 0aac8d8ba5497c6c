//! The shipping sub-process of one order, folded from its `shipment-<order id>` stream.
//!
//! The shipping service asks the order first (`OrderInput::MarkShipped`); only if the
//! order says `[OrderShipped]` does it ship here, appending both in one transaction.
use chrono::{DateTime, Utc};

use crate::events::{DomainEvent, OrderConfirmed, ShipmentDelivered, ShipmentShipped};
use crate::rules;
use crate::Evolve;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShipmentState {
    pub shipped: Option<ShipmentShipped>,
    pub delivered: bool,
    /// The last `stream_version` folded (0-based); `None` for an empty stream.
    pub version: Option<i64>,
}

impl Evolve for ShipmentState {
    fn apply(&mut self, event: &DomainEvent) {
        match event {
            DomainEvent::ShipmentShipped(e) => self.shipped = Some(e.clone()),
            DomainEvent::ShipmentDelivered(_) => self.delivered = true,
            _ => return,
        }
        self.version = Some(self.version.map_or(0, |v| v + 1));
    }
}

/// Folds one event of the `shipment-<id>` stream into the state.
pub fn evolve(mut state: ShipmentState, event: &DomainEvent) -> ShipmentState {
    state.apply(event);
    state
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipmentInput<'a> {
    /// Hand the confirmed order to the carrier; starts the delivery timer.
    Ship {
        confirmed: &'a OrderConfirmed,
        now: DateTime<Utc>,
    },
    /// The delivery timer fired.
    Deliver,
}

/// What the shipment does about one input: the events to append to `shipment-<id>`.
pub fn decide(state: &ShipmentState, input: ShipmentInput<'_>) -> Vec<DomainEvent> {
    match input {
        ShipmentInput::Ship { confirmed, now } => ship(state, confirmed, now),
        ShipmentInput::Deliver => deliver(state),
    }
}

/// Ships once, and only an order with a shipping address (digital orders never ship).
fn ship(state: &ShipmentState, confirmed: &OrderConfirmed, now: DateTime<Utc>) -> Vec<DomainEvent> {
    match &confirmed.shipping {
        Some(shipping) if state.shipped.is_none() => {
            vec![DomainEvent::ShipmentShipped(ShipmentShipped {
                order_id: confirmed.order_id,
                shipping: shipping.clone(),
                items: confirmed.items.clone(),
                deliver_at: rules::after(now, confirmed.delivery_delay_ms),
            })]
        }
        _ => vec![],
    }
}

fn deliver(state: &ShipmentState) -> Vec<DomainEvent> {
    match &state.shipped {
        Some(shipped) if !state.delivered => {
            vec![DomainEvent::ShipmentDelivered(ShipmentDelivered {
                order_id: shipped.order_id,
            })]
        }
        _ => vec![],
    }
}
