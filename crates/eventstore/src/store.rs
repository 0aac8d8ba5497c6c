use sqlx::PgPool;

use crate::{
    AppendResult, ExpectedVersion, LogPosition, NewEvent, RecordedEvent, StoreError, StreamAppend,
};

/// The migrations in `migrations/` at the workspace root, applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Connects to `database_url`, creating the database if it does not exist (and the role
/// may), and applies the migrations.
pub async fn connect(database_url: &str) -> Result<EventStore, StoreError> {
    let _ = database_url;
    todo!()
}

#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn append(
        &self,
        stream_name: &str,
        expected_version: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let _ = (stream_name, expected_version, events);
        todo!()
    }

    pub async fn append_batch(&self, appends: Vec<StreamAppend>) -> Result<AppendResult, StoreError> {
        let _ = appends;
        todo!()
    }

    pub async fn read_stream(
        &self,
        stream_name: &str,
        from_version: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let _ = (stream_name, from_version);
        todo!()
    }

    pub async fn read_all(
        &self,
        after: LogPosition,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let _ = (after, limit);
        todo!()
    }
}
