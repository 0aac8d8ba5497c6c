//! Integration tests of the services against a fresh database per test (`TestDb`), and a
//! fresh RabbitMQ vhost where a broker is involved (`TestVhost`).

mod audit;
mod exec;
mod gateway;
mod notification;
mod partitions;
mod payment;
mod relay;
mod shared_caches;
mod snapshots;
mod support;
mod timers;
