//! orderflow's functional core: commands, events and the pure functions that decide
//! (state + command → events) and evolve (state + event → state).
//!
//! Nothing here does IO: no database, no broker, no clock. Time comes in as arguments.

pub mod commands;
pub mod events;
pub mod ids;
pub mod money;
pub mod streams;

pub use events::{DecodeError, DomainEvent, EventEnvelope};
pub use ids::derive_event_id;
pub use money::Cents;
