use std::time::Duration;

/// Everything that can go wrong talking to RabbitMQ. Messages name the operation and
/// the endpoint (never the password).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid AMQP URL: {reason}")]
    InvalidUrl { reason: String },

    #[error("could not connect to RabbitMQ at {endpoint} within {waited:?}")]
    Connect {
        endpoint: String,
        waited: Duration,
        #[source]
        source: Box<BusError>,
    },

    #[error("{operation} failed")]
    Amqp {
        operation: String,
        #[source]
        source: lapin::Error,
    },

    #[error("the broker refused (nack) message {message_id:?} published to exchange {exchange:?} with routing key {routing_key:?}")]
    Nacked {
        exchange: String,
        routing_key: String,
        message_id: Option<String>,
    },

    #[error("message {message_id:?} published to exchange {exchange:?} with routing key {routing_key:?} reached no queue")]
    Unroutable {
        exchange: String,
        routing_key: String,
        message_id: Option<String>,
    },

    #[error("{field} is not valid as an AMQP short string (at most 255 bytes): {value_len} bytes")]
    FieldTooLong { field: String, value_len: usize },

    #[error("RabbitMQ did not answer within {waited:?} while {operation}")]
    NoAnswer { operation: String, waited: Duration },

    #[error("could not park the message: {reason}")]
    Park { reason: String },

    #[error("a message handed over in process was not settled: {reason}")]
    HandOff { reason: String },

    #[error("invalid consume options: {reason}")]
    InvalidOptions { reason: String },
}

impl BusError {
    pub(crate) fn amqp(operation: impl Into<String>, source: lapin::Error) -> Self {
        BusError::Amqp {
            operation: operation.into(),
            source,
        }
    }

    /// Whether trying again on a fresh connection/channel may succeed: IO errors,
    /// connection-level errors and dead channels are transient; a channel-level refusal
    /// by the broker (no such exchange, access refused), a nack or bad input are not.
    pub fn is_transient(&self) -> bool {
        match self {
            BusError::Connect { .. } | BusError::NoAnswer { .. } | BusError::Park { .. } => true,
            BusError::Amqp { source, .. } => !source.is_amqp_soft_error(),
            _ => false,
        }
    }
}
