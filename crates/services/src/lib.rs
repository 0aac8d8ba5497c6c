//! The services: one module per service, each a thin shell around a pure decision of
//! the domain, plus the relay (log → RabbitMQ), the timer scheduler and the runtime
//! that starts them.
pub mod audit;
pub mod breaker;
pub mod commands;
mod error;
pub mod exec;
pub mod gateway;
mod generations;
pub mod health;
pub mod inventory;
pub mod message;
pub mod metrics;
pub mod notification;
pub mod parking;
pub mod partitions;
pub mod payment;
pub mod registry;
pub mod relay;
pub mod router;
pub mod runtime;
pub mod saga;
pub mod settings;
pub mod shipping;
pub mod snapshots;
pub mod timers;
pub mod vault;
pub mod worker;

pub use error::ServiceError;
