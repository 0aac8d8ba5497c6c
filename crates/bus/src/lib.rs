//! The RabbitMQ adapter (lapin): topology, confirmed publishing, a consume loop with
//! bounded concurrency, in-process retries and dead-lettering, and the dead-letter
//! operations behind `orderflow dlq`.
//!
//! The bus knows nothing of the domain: it moves bytes with properties, and handlers
//! (given as [`Handler`] trait objects) say what became of each message ([`Outcome`]).
//!
//! Reconnecting is the application's job (lapin's `reconnect_manual` example): every
//! operation asks [`Bus`] for a live channel, and the bus re-opens the connection with
//! an exponential backoff when it died, re-declaring the topology each time.

mod acks;
mod connection;
mod consume;
mod dlq;
mod error;
mod local;
mod message;
mod publish;
pub mod topology;

pub use connection::{Bus, BusOptions};
pub use consume::{
    consume, ConsumeOptions, HandOff, Handler, Offer, PublishGuard, MESSAGES_HANDED_OVER,
};
pub use dlq::{dead_letter_copy, dlq_list, dlq_retry, DeadLetter, DlqSelector};
pub use error::BusError;
pub use local::MARKER_TYPE;
pub use message::{
    headers as header_names, Incoming, Outcome, OutgoingMessage, OutgoingProperties,
};
pub use topology::{
    declare_topology, partition_of, COMMANDS_EXCHANGE, COMMAND_INTAKE_QUEUE, COMMAND_PARTITIONS,
    COMMAND_PARTITION_QUEUES, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, LEGACY_COMMAND_INTAKE_QUEUE,
};
