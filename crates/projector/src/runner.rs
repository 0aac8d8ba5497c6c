//! Following the log: live projection and replay share `apply_events`.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use domain::EventEnvelope;
use eventstore::{EventStore, LogPosition, RecordedEvent, StoreError};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use tracing::{debug, info, warn, Instrument};

use crate::decode::decode_page;
use crate::{
    milestones::MilestonesProjection, order_status::OrderStatusProjection,
    stock_levels::StockLevelsProjection, timers::TimersProjection,
};

/// Events read and applied per transaction by the live projection.
pub const PAGE_SIZE: i64 = 2_000;

/// Events read and applied per page by a replay (one transaction for all pages). A
/// page costs each projection one to three statements whatever its length, and on a
/// busy machine every round trip waits for the server and the client to be scheduled
/// again: bigger pages pay that less often. Two pages are in memory at most (one
/// applied, one read ahead), some tens of MiB, however long the log.
pub const REPLAY_PAGE_SIZE: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "unknown projection '{0}' (known: order_status, stock_levels, timers, order_milestones)"
    )]
    UnknownProjection(String),
    #[error("reading the log ahead failed: {0}")]
    ReadAhead(String),
    #[error("read-model table {0} has no primary key to compare rows by")]
    NoPrimaryKey(String),
}

/// A read model built from the log.
pub trait Projection: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The read-model tables it owns (emptied before a replay, compared by verify).
    fn tables(&self) -> &'static [&'static str];
    /// Tables of its own working state, derived from the log like its read models:
    /// emptied and rebuilt with them, shadowed by verify, but not compared (they are
    /// not what users read).
    fn state_tables(&self) -> &'static [&'static str] {
        &[]
    }
    /// Applies a page of events, in log order, inside the caller's transaction.
    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>>;
}

pub fn all_projections() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(OrderStatusProjection),
        Arc::new(StockLevelsProjection),
        Arc::new(TimersProjection),
        Arc::new(MilestonesProjection),
    ]
}

pub fn by_name(name: &str) -> Result<Arc<dyn Projection>, ProjectorError> {
    all_projections()
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| ProjectorError::UnknownProjection(name.to_owned()))
}

/// The read models' tables (the same idempotent DDL the migration applies), so that a
/// table someone dropped is created again before it is rebuilt from the log.
const READ_MODEL_SCHEMA: &str = include_str!("../../../migrations/0010_read_models.sql");
const MILESTONES_SCHEMA: &str = include_str!("../../../migrations/0030_milestones.sql");
const MILESTONE_PROGRESS_SCHEMA: &str =
    include_str!("../../../migrations/0090_milestone_progress.sql");

/// Creates any read-model table that is missing.
pub async fn ensure_schema(store: &EventStore) -> Result<(), ProjectorError> {
    for schema in [
        READ_MODEL_SCHEMA,
        MILESTONES_SCHEMA,
        MILESTONE_PROGRESS_SCHEMA,
    ] {
        sqlx::raw_sql(schema).execute(store.pool()).await?;
    }
    Ok(())
}

pub(crate) fn checkpoint_name(projection: &dyn Projection) -> String {
    format!("projection:{}", projection.name())
}

/// A page read from the log: where it ends and its decoded events.
struct Page {
    /// The position of the last record read (`None`: nothing to read).
    last: Option<LogPosition>,
    /// Records read, decodable or not.
    read: usize,
    events: Vec<EventEnvelope>,
}

async fn read_page(
    store: &EventStore,
    after: LogPosition,
    limit: i64,
) -> Result<Page, ProjectorError> {
    let records = store.read_all_text(after, limit).await?;
    Ok(Page {
        last: records.last().map(RecordedEvent::log_position),
        read: records.len(),
        events: decode_page(records),
    })
}

/// [`read_page`] with the decoding on a blocking thread: decoding a replay page is tens
/// of milliseconds of CPU, which would otherwise hold up one of the runtime's workers,
/// and with it the replay's own statements waiting to be polled.
async fn read_page_off_runtime(
    store: &EventStore,
    after: LogPosition,
    limit: i64,
) -> Result<Page, ProjectorError> {
    let records = store.read_all_text(after, limit).await?;
    let last = records.last().map(RecordedEvent::log_position);
    let read = records.len();
    let events = tokio::task::spawn_blocking(move || decode_page(records))
        .await
        .map_err(|e| ProjectorError::ReadAhead(e.to_string()))?;
    Ok(Page { last, read, events })
}

/// The next page, read and decoded by a task of its own while the caller applies the
/// current one: reading the log (another pooled connection, the server's scan and the
/// client's JSON decoding) overlaps with the writes in the replay's transaction
/// instead of adding to them. At most one page is ahead, so memory stays flat.
struct ReadAhead(tokio::task::JoinHandle<Result<Page, ProjectorError>>);

impl ReadAhead {
    fn start(store: &EventStore, after: LogPosition) -> Self {
        let store = store.clone();
        Self(tokio::spawn(
            async move { read_page_off_runtime(&store, after, REPLAY_PAGE_SIZE).await }
                .in_current_span(),
        ))
    }

    async fn page(&mut self) -> Result<Page, ProjectorError> {
        (&mut self.0)
            .await
            .map_err(|e| ProjectorError::ReadAhead(e.to_string()))?
    }
}

impl Drop for ReadAhead {
    /// A replay that fails (or is dropped) stops its read ahead too.
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies the next page after the projection's checkpoint, rows and checkpoint in one
/// transaction. Returns how many events it read (0: caught up).
pub async fn run_once(
    store: &EventStore,
    projection: &dyn Projection,
) -> Result<usize, ProjectorError> {
    apply_next(store, projection, &mut None).await
}

/// [`run_once`] for a follower that remembers where it is: `known` is the checkpoint it
/// last saw or wrote (`None`: read it). The page is read before any transaction, so a
/// follower that is caught up costs one query per wake-up, not a transaction; the
/// checkpoint row is locked only to apply a page, and if it has moved meanwhile (a
/// replay, or the same projection in another process) the page is read again from
/// where it now is: nothing is applied twice or skipped.
async fn apply_next(
    store: &EventStore,
    projection: &dyn Projection,
    known: &mut Option<LogPosition>,
) -> Result<usize, ProjectorError> {
    let name = checkpoint_name(projection);
    loop {
        let after = match *known {
            Some(position) => position,
            None => store.load_checkpoint(&name).await?,
        };
        *known = Some(after);
        let page = read_page(store, after, PAGE_SIZE).await?;
        let Some(last) = page.last else {
            return Ok(0);
        };
        let mut tx = eventstore::begin(store.pool()).await?;
        let locked = store.lock_checkpoint(&mut tx, &name).await?;
        if locked != after {
            debug!(
                projection = projection.name(),
                "checkpoint moved by someone else; reading again from it"
            );
            *known = Some(locked);
            continue;
        }
        projection.apply_page(&mut tx, &page.events).await?;
        store.save_checkpoint(&mut tx, &name, last).await?;
        // Unknown until the commit is confirmed: a lost answer may or may not have
        // committed, so the next round reads the checkpoint again.
        *known = None;
        tx.commit().await?;
        *known = Some(last);
        // services::metrics::EVENTS_PROJECTED (this crate does not depend on services).
        metrics::counter!("orderflow_events_projected_total", "projection" => projection.name())
            .increment(page.read as u64);
        return Ok(page.read);
    }
}

/// Follows the log with every projection until `shutdown` resolves.
pub async fn run(
    store: EventStore,
    projections: Vec<Arc<dyn Projection>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ProjectorError> {
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    let span = tracing::info_span!("projection", names = ?names);
    let following = crate::follow::follow_all(store, projections).instrument(span);
    tokio::select! {
        () = shutdown => Ok(()),
        outcome = following => outcome,
    }
}

/// Rebuilds one projection from the start of the log in a single transaction: readers
/// keep seeing the old rows until the new ones are committed. `progress` is called
/// with the number of events applied so far after each page.
pub async fn replay(
    store: &EventStore,
    projection: &dyn Projection,
    progress: impl FnMut(u64),
) -> Result<u64, ProjectorError> {
    replay_many(store, &[projection], progress).await
}

/// How long a replay waits for transactions that began before it to end.
const REPLAY_WAIT_FOR_OLDER: Duration = Duration::from_secs(60);

/// Whether events of transactions older than `ours` lie beyond `after` (written, not
/// yet readable because their transaction or an older one is still open).
async fn older_events_pending(
    store: &EventStore,
    after: LogPosition,
    ours: i64,
) -> Result<bool, ProjectorError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events
          WHERE (transaction_id, global_position) > ($1, $2) AND transaction_id < $3)",
    )
    .bind(after.transaction_id)
    .bind(after.global_position)
    .bind(ours)
    .fetch_one(store.pool())
    .await?)
}

/// Rebuilds several projections in one pass over the log and one transaction: each
/// page is read once and applied to every projection.
pub async fn replay_many(
    store: &EventStore,
    projections: &[&dyn Projection],
    mut progress: impl FnMut(u64),
) -> Result<u64, ProjectorError> {
    ensure_schema(store).await?;
    let mut tx = eventstore::begin(store.pool()).await?;
    for projection in projections {
        // Hold the checkpoint row so the live projector waits instead of racing the rebuild.
        store
            .lock_checkpoint(&mut tx, &checkpoint_name(*projection))
            .await?;
        for table in projection.tables().iter().chain(projection.state_tables()) {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
    }
    // Our own transaction id: every event of an older transaction belongs in this
    // rebuild, also one whose transaction is still running somewhere and so not yet
    // readable; younger ones are the live projector's after we commit.
    let ours: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *tx)
        .await?;
    let mut after = LogPosition::START;
    let mut applied = 0u64;
    let started = std::time::Instant::now();
    let mut ahead = ReadAhead::start(store, after);
    loop {
        let page = ahead.page().await?;
        let Some(last) = page.last else {
            if !older_events_pending(store, after, ours).await? {
                break;
            }
            if started.elapsed() > REPLAY_WAIT_FOR_OLDER {
                warn!("replay stops short: a transaction older than the replay is still open");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            ahead = ReadAhead::start(store, after);
            continue;
        };
        ahead = ReadAhead::start(store, last);
        for projection in projections {
            projection.apply_page(&mut tx, &page.events).await?;
        }
        applied += page.read as u64;
        after = last;
        progress(applied);
    }
    for projection in projections {
        store
            .save_checkpoint(&mut tx, &checkpoint_name(*projection), after)
            .await?;
    }
    tx.commit().await?;
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    info!(projections = ?names, events = applied, "replay finished");
    Ok(applied)
}
