use std::sync::Arc;

use sqlx::{PgConnection, PgPool};

use crate::append::{self, AttemptFailure};
use crate::database::{open_pool, parse_options};
use crate::group_commit::GroupCommit;
use crate::read::{into_events, EventRow, TextEventRow, EVENT_COLUMNS, EVENT_COLUMNS_TEXT};
use crate::wakeup::{Signals, Wakeups};
use crate::{
    AppendResult, ExpectedVersion, LogPosition, NewEvent, RecordedEvent, StoreError, StreamAppend,
};

/// The migrations in `migrations/` at the workspace root, applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Pool size of `connect`.
const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// How often an append whose streams all say `Any` is retried after losing a race.
const MAX_APPEND_ATTEMPTS: u32 = 5;

/// Connects to `database_url`, creating the database if it does not exist (and the role
/// may), and applies the migrations.
pub async fn connect(database_url: &str) -> Result<EventStore, StoreError> {
    connect_with(database_url, DEFAULT_MAX_CONNECTIONS).await
}

/// `connect` with a pool of at most `max_connections` (at least 1).
pub async fn connect_with(
    database_url: &str,
    max_connections: u32,
) -> Result<EventStore, StoreError> {
    let options = parse_options(database_url)?;
    let pool = open_pool(options, max_connections).await?;
    if !migrations_applied(&pool).await {
        // The migrator takes an advisory lock, so processes starting together are safe.
        MIGRATOR.run(&pool).await?;
    }
    Ok(EventStore::new(pool))
}

/// Whether every migration is applied already, unchanged. Then nothing needs to be
/// created, and a least-privilege role (which may not create tables, not even the
/// migrator's own `CREATE TABLE IF NOT EXISTS`) can start; otherwise the migrator runs.
async fn migrations_applied(pool: &PgPool) -> bool {
    let applied: Result<Vec<(i64, Vec<u8>)>, sqlx::Error> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await;
    let Ok(applied) = applied else {
        return false;
    };
    MIGRATOR.iter().all(|m| {
        applied
            .iter()
            .any(|(version, checksum)| *version == m.version && checksum.as_slice() == &*m.checksum)
    })
}

/// The event log. Cheap to clone; clones share the pool and the wake-up machinery.
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
    signals: Arc<Signals>,
    group_commit: Option<GroupCommit>,
}

impl EventStore {
    /// Wraps a pool on an already migrated database.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            signals: Arc::new(Signals::new()),
            group_commit: None,
        }
    }

    /// The same store, writing single-stream appends made at the same time together
    /// (see `group_commit`): at most `in_flight` statements at once, each as many
    /// appends as waited for a free one. Each append keeps its own outcome. Must be
    /// called inside a tokio runtime, which runs the batching task.
    pub fn with_group_commit(self, in_flight: usize) -> Self {
        let group_commit =
            GroupCommit::start(self.pool.clone(), Arc::clone(&self.signals), in_flight);
        Self {
            group_commit: Some(group_commit),
            ..self
        }
    }

    /// Appends waiting for a free group-commit slot (0 without group commit).
    pub fn appends_waiting(&self) -> usize {
        self.group_commit.as_ref().map_or(0, GroupCommit::waiting)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to one stream as versions `expected + 1 …` in one transaction.
    /// `Conflict` if the stream's last version is not `expected_version` (also when a
    /// concurrent writer wins), `Duplicate` if an event id is already in the log.
    pub async fn append(
        &self,
        stream_name: &str,
        expected_version: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        if expected_version != ExpectedVersion::Any && !events.is_empty() {
            // The common case (a decision on one stream) in one statement and one round
            // trip, instead of BEGIN, a version query, the INSERT and COMMIT.
            if let Some(group_commit) = &self.group_commit {
                return group_commit
                    .append(stream_name, expected_version, events)
                    .await;
            }
            let result =
                append::single_statement(&self.pool, stream_name, expected_version, &events).await;
            if result.is_ok() {
                self.notify_appended();
            }
            return result;
        }
        self.append_batch(vec![StreamAppend {
            stream_name: stream_name.to_owned(),
            expected_version,
            events,
        }])
        .await
    }

    /// Appends to several streams atomically: all or nothing, one INSERT for all events,
    /// in the order given (which is the order followers see them). Streams that say
    /// `Any` are retried internally when a concurrent writer takes their next version.
    /// For a batch, `next_expected_version` is the last stream's; an append without
    /// events only checks the expectations and returns `last_global_position` 0
    /// (`next_expected_version` -1 for a stream with no events).
    pub async fn append_batch(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<AppendResult, StoreError> {
        if append::one_statement_will_do(&appends) {
            // The common case (a decision on known versions of a few streams) in one
            // statement, instead of BEGIN, a version query, the INSERT and COMMIT.
            if let Some(result) = append::batch_statement(&self.pool, &appends).await? {
                self.notify_appended();
                return Ok(result);
            }
        }
        let mut attempt = 1;
        loop {
            let mut tx = crate::begin(&self.pool).await?;
            let failure = match append::attempt(&mut tx, &appends).await {
                Ok(result) => {
                    tx.commit().await?;
                    self.notify_appended();
                    return Ok(result);
                }
                Err(failure) => failure,
            };
            tx.rollback().await?;
            match self.explain(failure, &appends).await? {
                Some(error) => return Err(error),
                None if attempt < MAX_APPEND_ATTEMPTS => attempt += 1,
                None => return Err(lost_every_race(&appends)),
            }
        }
    }

    /// Appends inside the caller's transaction (to write other rows atomically with the
    /// events). Does not commit and does not retry: a race lost on an `Any` stream is a
    /// `Conflict`, and after an error the transaction is aborted. After committing, call
    /// `notify_appended` so followers wake at once.
    pub async fn append_batch_in(
        &self,
        conn: &mut PgConnection,
        appends: &[StreamAppend],
    ) -> Result<AppendResult, StoreError> {
        match append::attempt(conn, appends).await {
            Ok(result) => Ok(result),
            Err(failure) => Err(self
                .explain(failure, appends)
                .await?
                .unwrap_or_else(|| lost_every_race(appends))),
        }
    }

    /// Turns a failed attempt into the error to report, looking at the committed log
    /// (outside the failed transaction); `None` means "retry".
    async fn explain(
        &self,
        failure: AttemptFailure,
        appends: &[StreamAppend],
    ) -> Result<Option<StoreError>, StoreError> {
        match failure {
            AttemptFailure::Conflict(mismatch) => Ok(Some(mismatch.into())),
            AttemptFailure::Database(error) => Ok(Some(error.into())),
            AttemptFailure::EventIdTaken => {
                let mut conn = self.pool.acquire().await?;
                Ok(Some(append::explain_duplicate(&mut conn, appends).await?))
            }
            AttemptFailure::VersionTaken => {
                let mut conn = self.pool.acquire().await?;
                append::explain_version_clash(&mut conn, appends).await
            }
        }
    }

    /// Wakes followers after an append committed through `append_batch_in`.
    pub fn notify_appended(&self) {
        self.signals.appended(&self.pool);
    }

    /// Wakes the followers of projections (and every follower of the log, as an append
    /// does) after a projection page they wait on committed.
    pub fn notify_projected(&self) {
        self.signals.projected(&self.pool);
    }

    /// A wake-up source for a follower of a projection rather than of the log (the timer
    /// scheduler follows the `timers` table): in this process only
    /// [`notify_projected`](Self::notify_projected) wakes it, not every append; from
    /// other processes every notification does. The store's followers share one
    /// connection for `LISTEN`, outside its pool.
    pub async fn follow_projections(&self) -> Result<Wakeups, StoreError> {
        let remote = self.signals.hear(&self.pool).await?;
        Ok(Wakeups::new(self.signals.subscribe_projected(), remote))
    }

    /// A wake-up source for a follower of the log (see `Wakeups`). The store's
    /// followers share one connection for `LISTEN`, outside its pool.
    pub async fn follow(&self) -> Result<Wakeups, StoreError> {
        let remote = self.signals.hear(&self.pool).await?;
        Ok(Wakeups::new(self.signals.subscribe(), remote))
    }

    /// The stream's events from `from_version` on, oldest first.
    pub async fn read_stream(
        &self,
        stream_name: &str,
        from_version: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_stream_page(stream_name, from_version, i64::MAX)
            .await
    }

    /// At most `limit` events of the stream from `from_version` on, in version order: a
    /// long stream read page by page, so that its length does not set the memory used.
    pub async fn read_stream_page(
        &self,
        stream_name: &str,
        from_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE stream_name = $1 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
        ))
        .bind(stream_name)
        .bind(from_version)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    /// The stream from `from_version` on, read `page` events at a time: a long stream
    /// whose length must not set the memory used.
    pub fn stream_pages<'a>(
        &'a self,
        stream_name: &'a str,
        from_version: i64,
        page: i64,
    ) -> StreamPages<'a> {
        StreamPages {
            store: self,
            stream_name,
            next_version: from_version,
            page: page.max(1),
            done: false,
        }
    }

    /// The stream's last version, `None` if it has no events.
    pub async fn stream_version(&self, stream_name: &str) -> Result<Option<i64>, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar("SELECT max(stream_version) FROM events WHERE stream_name = $1")
                .bind(stream_name)
                .fetch_one(&self.pool)
                .await?;
        Ok(version)
    }

    /// Whether the stream has ever recorded an event of this type.
    pub async fn stream_has_event_type(
        &self,
        stream_name: &str,
        event_type: &str,
    ) -> Result<bool, StoreError> {
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE stream_name = $1 AND event_type = $2)",
        )
        .bind(stream_name)
        .bind(event_type)
        .fetch_one(&self.pool)
        .await?;
        Ok(found)
    }

    /// Of `stream_names`, those that have ever recorded an event of this type (one round
    /// trip for many streams, e.g. all SKUs of an order).
    pub async fn streams_with_event_type(
        &self,
        stream_names: &[String],
        event_type: &str,
    ) -> Result<Vec<String>, StoreError> {
        // An EXISTS per stream stops at its first event of the type (a stock stream's
        // `StockSet` is usually its first), where `DISTINCT … WHERE stream_name = ANY`
        // read every event of every named stream.
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT n.name FROM unnest($1::text[]) AS n(name) \
             WHERE EXISTS (SELECT 1 FROM events WHERE stream_name = n.name AND event_type = $2) \
             ORDER BY n.name",
        )
        .bind(stream_names)
        .bind(event_type)
        .fetch_all(&self.pool)
        .await?;
        Ok(found)
    }

    /// Up to `limit` events after `after`, in `(transaction_id, global_position)` order,
    /// and only from transactions older than every transaction still running: a
    /// transaction that commits late cannot add an event before the returned ones, so a
    /// follower that checkpoints the last returned `log_position()` never skips one.
    /// The price is that a long transaction anywhere on the server holds readers back.
    pub async fn read_all(
        &self,
        after: LogPosition,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(&read_all_sql(EVENT_COLUMNS))
            .bind(after.transaction_id)
            .bind(after.global_position)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await?;
        into_events(rows)
    }

    /// [`read_all`](Self::read_all) with each payload as its JSON text (`payload::text`),
    /// for a reader that deserialises payloads straight into its own types: building a
    /// `serde_json::Value` of every payload first is most of the client's work of a
    /// replay. The same events, in the same order, with the same guarantees.
    pub async fn read_all_text(
        &self,
        after: LogPosition,
        limit: i64,
    ) -> Result<Vec<RecordedEvent<String>>, StoreError> {
        let rows: Vec<TextEventRow> = sqlx::query_as(&read_all_sql(EVENT_COLUMNS_TEXT))
            .bind(after.transaction_id)
            .bind(after.global_position)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(RecordedEvent::try_from).collect()
    }

    /// The highest `global_position` in the log (0 when empty), committed or not yet
    /// visible to `read_all`; for lag reporting.
    pub async fn head(&self) -> Result<i64, StoreError> {
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(head)
    }

    /// The number of events in the log.
    pub async fn count(&self) -> Result<i64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(count)
    }

    /// The follower's saved position, `LogPosition::START` if it has none.
    pub async fn load_checkpoint(&self, name: &str) -> Result<LogPosition, StoreError> {
        load_checkpoint(&self.pool, name).await
    }

    /// Saves the follower's position on `conn`, typically inside the transaction that
    /// also writes what the follower derived from the events, so both commit together.
    pub async fn save_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
        position: LogPosition,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (name, transaction_id, global_position) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
               global_position = EXCLUDED.global_position, updated_at = now()",
        )
        .bind(name)
        .bind(position.transaction_id)
        .bind(position.global_position)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Loads the follower's position inside the caller's transaction and holds the
    /// follower's lock until that transaction ends, so two instances of one follower
    /// take turns instead of applying the same events twice.
    ///
    /// The lock is a transaction-scoped advisory lock, not a row lock on the
    /// checkpoint: a row lock gives the transaction an xid at once, and every reader
    /// of the log waits for the oldest xid (the gap-safe horizon of `read_all`). The
    /// follower's transaction now takes one only at its first write, so each hop
    /// through the log waits for a page's writes, not for its reads as well.
    pub async fn lock_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<LogPosition, StoreError> {
        sqlx::query(&format!(
            "SELECT pg_advisory_xact_lock({})",
            checkpoint_lock("$1")
        ))
        .bind(name)
        .execute(&mut *conn)
        .await?;
        // A statement of its own: its snapshot must be taken after the lock is
        // granted, so that it sees what the previous holder committed.
        load_checkpoint(&mut *conn, name).await
    }

    /// The follower's lock, as [`lock_checkpoint`](Self::lock_checkpoint) takes it,
    /// without waiting and without reading the checkpoint: `false` when another
    /// transaction holds it (a replay, or the same follower in another process), so a
    /// follower of several checkpoints can get on with the others. For a follower that
    /// knows where its checkpoint was and confirms it when it moves it
    /// ([`advance_checkpoint`](Self::advance_checkpoint)): one statement a turn fewer.
    pub async fn try_lock_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<bool, StoreError> {
        let held = self.try_lock_checkpoints(conn, &[name]).await?;
        Ok(held.first().copied().unwrap_or(false))
    }

    /// [`try_lock_checkpoint`](Self::try_lock_checkpoint) for several followers in
    /// one statement: whether this transaction now holds each of `names`, in order.
    pub async fn try_lock_checkpoints(
        &self,
        conn: &mut PgConnection,
        names: &[&str],
    ) -> Result<Vec<bool>, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT pg_try_advisory_xact_lock({}) \
             FROM UNNEST($1::text[]) WITH ORDINALITY AS f(name, n) ORDER BY n",
            checkpoint_lock("f.name")
        ))
        .bind(names)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Moves the follower's position from `from` to `to` in the caller's transaction,
    /// only if it is still at `from`. `false`: it is not (another instance of the
    /// follower moved it, or it was reset, since `from` was read), nothing was saved,
    /// and the caller rolls back what it derived from `from` and reads the checkpoint
    /// again. The check sees the last committed position even when it was committed
    /// after the transaction began (an UPDATE re-reads the row it would change).
    pub async fn advance_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
        from: LogPosition,
        to: LogPosition,
    ) -> Result<bool, StoreError> {
        // No row is the same as a row at the start: a follower that starts creates it.
        let sql = if from == LogPosition::START {
            "INSERT INTO checkpoints (name, transaction_id, global_position) \
             VALUES ($1, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
               global_position = EXCLUDED.global_position, updated_at = now() \
             WHERE (checkpoints.transaction_id, checkpoints.global_position) = ($2, $3)"
        } else {
            "UPDATE checkpoints SET transaction_id = $4, global_position = $5, updated_at = now() \
             WHERE name = $1 AND (transaction_id, global_position) = ($2, $3)"
        };
        let moved = sqlx::query(sql)
            .bind(name)
            .bind(from.transaction_id)
            .bind(from.global_position)
            .bind(to.transaction_id)
            .bind(to.global_position)
            .execute(conn)
            .await?;
        Ok(moved.rows_affected() == 1)
    }

    /// [`advance_checkpoint`](Self::advance_checkpoint) for several followers, each
    /// from where it was (`moves`) to the same `to`, in one statement (followers that
    /// have no checkpoint yet take one each). `true` only if every one moved; on
    /// `false` the caller rolls back, as for a single follower.
    pub async fn advance_checkpoints(
        &self,
        conn: &mut PgConnection,
        moves: &[(&str, LogPosition)],
        to: LogPosition,
    ) -> Result<bool, StoreError> {
        let (first, known): (Vec<_>, Vec<_>) = moves
            .iter()
            .partition(|(_, from)| *from == LogPosition::START);
        for (name, from) in first {
            if !self.advance_checkpoint(conn, name, from, to).await? {
                return Ok(false);
            }
        }
        if known.is_empty() {
            return Ok(true);
        }
        let names: Vec<&str> = known.iter().map(|(name, _)| *name).collect();
        let transactions: Vec<i64> = known.iter().map(|(_, from)| from.transaction_id).collect();
        let positions: Vec<i64> = known.iter().map(|(_, from)| from.global_position).collect();
        let moved = sqlx::query(
            "UPDATE checkpoints c \
             SET transaction_id = $4, global_position = $5, updated_at = now() \
             FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) \
               AS f(name, transaction_id, global_position) \
             WHERE c.name = f.name \
               AND (c.transaction_id, c.global_position) = (f.transaction_id, f.global_position)",
        )
        .bind(names)
        .bind(transactions)
        .bind(positions)
        .bind(to.transaction_id)
        .bind(to.global_position)
        .execute(conn)
        .await?;
        Ok(moved.rows_affected() == known.len() as u64)
    }

    /// Forgets the follower's position: it starts again from `LogPosition::START`
    /// (replay). Waits for the follower's current turn to end, so that turn cannot save its
    /// position over the reset.
    pub async fn reset_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = crate::begin(&self.pool).await?;
        self.lock_checkpoint(&mut tx, name).await?;
        sqlx::query("DELETE FROM checkpoints WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The advisory lock key of the follower whose name is the SQL expression `name`: one
/// definition, so the waiting and the trying locks can never take different keys.
fn checkpoint_lock(name: &str) -> String {
    format!("hashtextextended('checkpoint:' || {name}, 0)")
}

async fn load_checkpoint(
    conn: impl sqlx::PgExecutor<'_>,
    name: &str,
) -> Result<LogPosition, StoreError> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT transaction_id, global_position FROM checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(
        row.map_or(LogPosition::START, |(transaction_id, global_position)| {
            LogPosition {
                transaction_id,
                global_position,
            }
        }),
    )
}

/// Reported when retries on `Any` streams were all lost to concurrent writers.
fn lost_every_race(appends: &[StreamAppend]) -> StoreError {
    let first = appends.first();
    StoreError::Conflict {
        stream: first.map(|a| a.stream_name.clone()).unwrap_or_default(),
        expected: first.and_then(|a| append::expected_as_option(a.expected_version)),
        actual: None,
    }
}

/// `read_all`'s query: the gap-safe page after `($1, $2)`, at most `$3` rows.
/// A stream read page by page, oldest first ([`EventStore::stream_pages`]).
#[derive(Debug)]
pub struct StreamPages<'a> {
    store: &'a EventStore,
    stream_name: &'a str,
    next_version: i64,
    page: i64,
    /// A page came back short: the stream ended there.
    done: bool,
}

impl StreamPages<'_> {
    /// The next page, `None` once the stream's last event was read.
    pub async fn next(&mut self) -> Result<Option<Vec<RecordedEvent>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let events = self
            .store
            .read_stream_page(self.stream_name, self.next_version, self.page)
            .await?;
        self.done = i64::try_from(events.len()).map_or(true, |read| read < self.page);
        let Some(last) = events.last() else {
            return Ok(None);
        };
        self.next_version = last.stream_version + 1;
        Ok(Some(events))
    }
}

fn read_all_sql(columns: &str) -> String {
    format!(
        "SELECT {columns} FROM events \
         WHERE (transaction_id, global_position) > ($1, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
         ORDER BY transaction_id, global_position \
         LIMIT $3"
    )
}
