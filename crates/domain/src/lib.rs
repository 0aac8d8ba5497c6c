//! orderflow's functional core: commands, events and the pure functions that decide
//! (state + input → events) and evolve (state + event → state).
//!
//! Nothing here does IO: no database, no broker, no clock. Time comes in as arguments.
//!
//! Each aggregate module (`order`, `stock`, `payment`, `shipment`) has a state type
//! folded from its stream (`evolve` / [`Evolve::apply`]; events of other streams are
//! ignored) and a `decide(&State, Input) -> Vec<DomainEvent>`: refusals are events,
//! and an input without effect decides nothing (an empty `Vec`).

pub mod commands;
pub mod events;
pub mod history;
pub mod ids;
pub mod money;
pub mod order;
pub mod payment;
pub mod rules;
pub mod shipment;
pub mod stock;
pub mod streams;

pub use events::{DecodeError, DomainEvent, EventEnvelope};
pub use ids::derive_event_id;
pub use money::Cents;
pub use order::{OrderInput, OrderState, OrderStatus};
pub use payment::{GatewayAction, PaymentInput, PaymentState};
pub use rules::{PlacementFacts, Rules};
pub use shipment::{ShipmentInput, ShipmentState};
pub use stock::{StockInput, StockState};

/// A state folded from the events of one stream.
pub trait Evolve: Default {
    /// Folds one event in; events that do not concern this state are ignored.
    fn apply(&mut self, event: &DomainEvent);
}

/// The state after `events`, from the default (empty stream) state.
pub fn fold<'a, S: Evolve>(events: impl IntoIterator<Item = &'a DomainEvent>) -> S {
    let mut state = S::default();
    for event in events {
        state.apply(event);
    }
    state
}
