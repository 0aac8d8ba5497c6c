use eventstore::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error("stream {stream} holds an event this version cannot read: {reason}")]
    CorruptStream { stream: String, reason: String },
    #[error("stream {stream} stayed contended after many retries")]
    Contended { stream: String },
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error("this worker needs RabbitMQ, and no connection was set up")]
    NoBus,
    #[error(transparent)]
    Projector(#[from] projector::ProjectorError),
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    /// A write this message shared with other messages' (one statement for all)
    /// failed; it is retried like the database error it stands for.
    #[error("the batched write failed: {0}")]
    BatchedWrite(String),
    /// The relay's publish of a page ended without an answer (its task panicked or
    /// was stopped).
    #[error("relay: {0}")]
    Relay(String),
}

impl ServiceError {
    /// Whether trying again later may succeed (vs. a message that never will).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            ServiceError::CorruptStream { .. }
                | ServiceError::Vault(crate::vault::VaultError::BadKey { .. })
        )
    }
}
