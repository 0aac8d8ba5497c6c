//! End-to-end tests: each starts the built `orderflow run` on a database and a vhost of
//! its own, publishes commands with raw AMQP as any client would, and checks the
//! contract (sections 2, 3 and 5) through SQL on the read models and the log.

mod harness;

mod bulkhead;
mod cancellation;
mod compensation;
mod concurrency;
mod forget;
mod fulfilment;
mod intake;
mod operations;
mod parking;
mod partitions;
mod refusals;
mod restart;
mod review;
mod top;
mod upgrades;
