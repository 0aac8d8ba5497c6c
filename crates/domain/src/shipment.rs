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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{OrderLine, Shipping, ShippingMethod};
    use crate::fold;
    use chrono::TimeDelta;
    use uuid::Uuid;

    fn now() -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000)
    }

    fn confirmed(method: Option<ShippingMethod>) -> OrderConfirmed {
        OrderConfirmed {
            order_id: Uuid::from_u128(5),
            items: vec![OrderLine {
                sku: "A".into(),
                quantity: 1,
                unit_price_cents: 100,
            }],
            shipping: method.map(|method| Shipping {
                method,
                address: "1 Main St".into(),
            }),
            delivery_delay_ms: 500,
        }
    }

    #[test]
    fn a_confirmed_order_ships_with_a_delivery_timer() {
        let order = confirmed(Some(ShippingMethod::Express));
        let events = decide(
            &ShipmentState::default(),
            ShipmentInput::Ship {
                confirmed: &order,
                now: now(),
            },
        );
        let [DomainEvent::ShipmentShipped(shipped)] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(shipped.deliver_at, now() + TimeDelta::milliseconds(500));
        assert_eq!(shipped.items, order.items);
    }

    #[test]
    fn a_shipment_ships_once() {
        let order = confirmed(Some(ShippingMethod::Standard));
        let ship = || ShipmentInput::Ship {
            confirmed: &order,
            now: now(),
        };
        let state: ShipmentState = fold(&decide(&ShipmentState::default(), ship()));
        assert_eq!(decide(&state, ship()), vec![]);
        assert_eq!(state.version, Some(0));
    }

    #[test]
    fn a_digital_order_never_ships() {
        let order = confirmed(None);
        let input = ShipmentInput::Ship {
            confirmed: &order,
            now: now(),
        };
        assert_eq!(decide(&ShipmentState::default(), input), vec![]);
    }

    #[test]
    fn a_shipped_order_is_delivered_once_and_nothing_unshipped_is_delivered() {
        assert_eq!(
            decide(&ShipmentState::default(), ShipmentInput::Deliver),
            vec![]
        );
        let order = confirmed(Some(ShippingMethod::Standard));
        let mut history = decide(
            &ShipmentState::default(),
            ShipmentInput::Ship {
                confirmed: &order,
                now: now(),
            },
        );
        let delivered = decide(&fold(&history), ShipmentInput::Deliver);
        assert!(
            matches!(&delivered[..], [DomainEvent::ShipmentDelivered(d)] if d.order_id == order.order_id)
        );
        history.extend(delivered);
        let state: ShipmentState = fold(&history);
        assert!(state.delivered);
        assert_eq!(decide(&state, ShipmentInput::Deliver), vec![]);
    }
}
