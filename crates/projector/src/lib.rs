//! The projector: follows the event log and materialises the read models users query
//! (`order_status`, `stock_levels`, `order_milestones`) and the durable `timers` the
//! scheduler fires.
//!
//! Each projection folds a page of events in memory (pure functions in its module), then
//! writes the changed rows and its checkpoint in one transaction: an event is applied
//! exactly once, even after a crash. Live projection and replay are the same code.

pub mod check;
mod decode;
mod follow;
pub mod milestones;
pub mod order_status;
mod runner;
pub mod stock_levels;
mod tables;
#[cfg(test)]
mod test_events;
pub mod timers;
pub mod verify;

pub use decode::{text_into_envelope, to_envelope};
pub use runner::{
    all_projections, by_name, ensure_schema, replay, replay_many, run, run_once, Projection,
    ProjectorError, PAGE_SIZE, REPLAY_PAGE_SIZE,
};
