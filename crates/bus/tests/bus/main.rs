//! Integration tests of the bus against a real RabbitMQ, each in a vhost of its own.

mod backpressure;
mod consume;
mod dlq;
mod hand_off;
mod offer;
mod parking;
mod partition;
mod publish;
mod reconnect;
mod support;
mod topology;
