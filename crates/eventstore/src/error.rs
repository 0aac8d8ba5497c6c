use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to the stream first (SQLSTATE 23505 on the
    /// `(stream_name, stream_version)` key, or a version check that failed).
    #[error(
        "concurrency conflict on stream {stream}: expected version {expected:?}, found {actual:?}"
    )]
    Conflict {
        stream: String,
        expected: Option<i64>,
        actual: Option<i64>,
    },
    /// An event with this id is already in the log: the message that caused it was
    /// handled before. Callers treat this as success.
    #[error("event {event_id} is already in the log")]
    Duplicate { event_id: Uuid },
    #[error("stored event at position {global_position} is malformed: {reason}")]
    Malformed {
        global_position: i64,
        reason: String,
    },
    /// The task that groups appends is gone (its runtime shut down): the append may or
    /// may not have been written.
    #[error("the group-commit task has stopped; the append's outcome is unknown")]
    GroupCommitStopped,
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}
