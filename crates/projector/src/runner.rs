//! Following the log: live projection and replay share `apply_events`.
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::EventEnvelope;
use eventstore::{EventStore, LogPosition, RecordedEvent, StoreError};
use futures::future::BoxFuture;
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::decode::decode_page;
use crate::{
    milestones::MilestonesProjection, order_status::OrderStatusProjection,
    stock_levels::StockLevelsProjection, timers::TimersProjection,
};

/// Events read and applied per transaction by the live projection.
pub const PAGE_SIZE: i64 = 2_000;

/// Events read and applied per page by a replay (one transaction per projection for
/// all pages). A page costs each projection one to three statements whatever its
/// length, and on a busy machine every round trip waits for the server and the client
/// to be scheduled again: bigger pages pay that less often. Four pages are in memory at
/// most (one being read ahead, one waiting to be handed over, and `REPLAY_QUEUE` + 1
/// queued for or applied by the slowest projection), however long the log.
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
    #[error("rebuilding {projection} failed: {source}")]
    Rebuild {
        projection: &'static str,
        source: Box<ProjectorError>,
    },
    #[error("a projection's replay task ended unexpectedly: {0}")]
    Applier(String),
    #[error(
        "a replay of these projections needs {needed} database connections at once, but the pool has {pool_size}"
    )]
    PoolTooSmall { needed: usize, pool_size: u32 },
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
    /// Those of its [`Projection::tables`] whose rows it only adds, a row with the key
    /// of one already there being ignored (`ON CONFLICT DO NOTHING` without a conflict
    /// target): the first row of a key wins. A rebuild writes them into copies without
    /// indexes, where nothing is ignored, and keeps each key's first row when it
    /// installs them ([`install_rebuild`]): one sort at the end instead of an index
    /// insertion per row at a random place.
    fn first_wins_tables(&self) -> &'static [&'static str] {
        &[]
    }
    /// Whether others wait on what it writes, so that committing a page of it should
    /// wake them (`EventStore::notify_projected`): the timer scheduler follows
    /// `timers`, and looks only when this wakes it, another process notifies, or its
    /// idle cap runs out.
    fn wakes_followers(&self) -> bool {
        false
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

/// The next page, read and decoded by a task of its own while the projections apply
/// the current one: reading the log (another pooled connection, the server's scan and
/// the client's JSON decoding) overlaps with the writes in the replay's transactions
/// instead of adding to them. At most one page is read ahead, so memory stays flat.
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
    let name = checkpoint_name(projection);
    let mut tx = eventstore::begin(store.pool()).await?;
    let after = store.lock_checkpoint(&mut tx, &name).await?;
    let page = read_page(store, after, PAGE_SIZE).await?;
    let Some(last) = page.last else {
        return Ok(0);
    };
    projection.apply_page(&mut tx, &page.events).await?;
    store.save_checkpoint(&mut tx, &name, last).await?;
    tx.commit().await?;
    if projection.wakes_followers() {
        store.notify_projected();
    }
    // services::metrics::EVENTS_PROJECTED (this crate does not depend on services).
    metrics::counter!("orderflow_events_projected_total", "projection" => projection.name())
        .increment(page.read as u64);
    Ok(page.read)
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
/// keep seeing the old rows until the new ones are committed. `progress` as for
/// [`replay_many`].
pub async fn replay(
    store: &EventStore,
    projection: Arc<dyn Projection>,
    progress: impl FnMut(u64),
) -> Result<u64, ProjectorError> {
    replay_many(store, &[projection], progress).await
}

/// How long a replay waits for transactions that began before it to end.
const REPLAY_WAIT_FOR_OLDER: Duration = Duration::from_secs(60);

/// Pages queued for each projection of a replay beyond the one it applies: the reader
/// waits for the slowest projection after that many, so memory stays flat however long
/// the log. One is enough to keep every projection busy (the reader reads the next
/// page meanwhile); each more is another page in memory.
const REPLAY_QUEUE: usize = 1;

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

/// A projection's rebuild whose pages are all applied, its transaction still open.
struct Rebuilt {
    projection: Arc<dyn Projection>,
    tx: Transaction<'static, Postgres>,
}

/// Begins `projection`'s rebuild in a transaction of its own: its checkpoint lock held
/// (the live projector waits instead of racing the rebuild), and each of its tables
/// shadowed by an empty temporary copy that the pages are applied to (see
/// [`install_rebuild`] for how the copies replace the live rows). Returns the
/// transaction and its id.
///
/// Why copies: rows inserted into a live table this transaction has just emptied with
/// `DELETE` each meet the deleted row of the same key in the unique index, and checking
/// it costs a heap visit per row: replaying a million events into emptied tables ran
/// at about 150k events/s, into empty copies at about 190k (docs/BENCHMARKS.md).
async fn begin_rebuild(
    store: &EventStore,
    projection: &dyn Projection,
) -> Result<(Transaction<'static, Postgres>, i64), ProjectorError> {
    let mut tx = eventstore::begin(store.pool()).await?;
    store
        .lock_checkpoint(&mut tx, &checkpoint_name(projection))
        .await?;
    let id: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *tx)
        .await?;
    more_temp_buffers(&mut tx).await?;
    find_rows_by_key(&mut tx, true).await?;
    for table in rebuilt_tables(projection) {
        // `pg_temp` comes first on every search path: the projection's own statements,
        // which name their tables unqualified, write the copy.
        let copy = if projection.first_wins_tables().contains(&table) {
            // Numbered as the rows arrive, so that the install knows which came first.
            format!("LIKE public.{table} INCLUDING ALL EXCLUDING INDEXES, {ARRIVAL} bigint GENERATED ALWAYS AS IDENTITY")
        } else {
            format!("LIKE public.{table} INCLUDING ALL")
        };
        sqlx::query(&format!(
            "CREATE TEMP TABLE {table} ({copy}) ON COMMIT DROP"
        ))
        .execute(&mut *tx)
        .await?;
    }
    // A statement this pooled connection prepared before (live projection) keeps the
    // live table it was planned against: a new table of the same name that shadows it
    // does not invalidate the plan. Replanned, the statements find the copies.
    sqlx::query("DISCARD PLANS").execute(&mut *tx).await?;
    Ok((tx, id))
}

/// Whether the rest of the transaction avoids scanning whole tables where an index
/// finds the rows. A rebuild's copies are never analysed, and the planner takes them
/// for small: it joins a page's few hundred keys to a copy by hashing a scan of the
/// whole copy, on every page, so that a rebuild slows down as its copies grow
/// (quadratic in the log's length; order_status's page statement took 50 ms instead of
/// 5 at a million events). Every statement a projection applies a page with finds its
/// rows by key.
pub(crate) async fn find_rows_by_key(
    conn: &mut PgConnection,
    by_key: bool,
) -> Result<(), ProjectorError> {
    let setting = if by_key { "off" } else { "DEFAULT" };
    sqlx::query(&format!("SET LOCAL enable_seqscan = {setting}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// Local buffers for the copies. A session fixes its `temp_buffers` (8 MB unless
/// configured) when it first uses a temporary table, and the copy of a big read model
/// spills to temporary files beyond that. The buffers are taken as the copies grow,
/// and kept by the connection until it closes.
const REBUILD_TEMP_BUFFERS: &str = "128MB";

/// Asks for [`REBUILD_TEMP_BUFFERS`] in a savepoint: a session (a pooled connection)
/// that has used temporary tables with another size refuses the change, and the
/// rebuild then goes on with what it has.
async fn more_temp_buffers(tx: &mut Transaction<'static, Postgres>) -> Result<(), ProjectorError> {
    let mut attempt = sqlx::Acquire::begin(&mut **tx).await?;
    match sqlx::query(&format!(
        "SET LOCAL temp_buffers = '{REBUILD_TEMP_BUFFERS}'"
    ))
    .execute(&mut *attempt)
    .await
    {
        Ok(_) => attempt.commit().await?,
        Err(error) => {
            debug!(%error, "the rebuild keeps the session's temp_buffers");
            attempt.rollback().await?;
        }
    }
    Ok(())
}

/// The tables a rebuild replaces: the read model's and the projection's own state.
fn rebuilt_tables(projection: &dyn Projection) -> impl Iterator<Item = &'static str> {
    projection
        .tables()
        .iter()
        .chain(projection.state_tables())
        .copied()
}

/// How long the rebuild's last step waits for readers to let go of a live table
/// before it empties the table with `DELETE` instead of `TRUNCATE`: while it waits,
/// new readers queue behind it.
const TRUNCATE_LOCK_WAIT: &str = "200ms";

/// The rebuild's last step, once every page is applied: each live table gets the rows
/// of its copy. `TRUNCATE` empties it fastest (no deleted rows in its indexes for the
/// copied ones to meet), but holds the table's exclusive lock until the commit: readers
/// see the old rows until this step and wait for the new ones during it (about a
/// second for half a million rows). Where the role may not truncate, or a reader keeps
/// the table longer than [`TRUNCATE_LOCK_WAIT`], `DELETE` does it (slower, and readers
/// go on seeing the old rows until the commit).
async fn install_rebuild(done: &mut Rebuilt) -> Result<(), ProjectorError> {
    sqlx::query(&format!("SET LOCAL work_mem = '{INSTALL_WORK_MEM}'"))
        .execute(&mut *done.tx)
        .await?;
    for table in rebuilt_tables(done.projection.as_ref()) {
        empty_live_table(&mut done.tx, table).await?;
        let columns = crate::tables::columns_of(&mut done.tx, table).await?;
        let first_wins = done.projection.first_wins_tables().contains(&table);
        sqlx::query(&install_sql(table, &columns, first_wins))
            .execute(&mut *done.tx)
            .await?;
    }
    Ok(())
}

/// The statement that copies `table`'s rebuilt rows into the live table: in key
/// order, so that the index grows at its right edge instead of at random pages, and
/// for a first-wins table only each key's first arrival. `columns` as
/// [`crate::tables::columns_of`] gives them.
fn install_sql(table: &str, columns: &[(String, bool)], first_wins: bool) -> String {
    let named = |keys_only: bool| {
        columns
            .iter()
            .filter(|(_, key)| *key || !keys_only)
            .map(|(column, _)| crate::tables::ident(column))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (listed, key) = (named(false), named(true));
    let select = match (key.is_empty(), first_wins) {
        (true, _) => format!("SELECT {listed} FROM pg_temp.{table}"),
        (false, false) => format!("SELECT {listed} FROM pg_temp.{table} ORDER BY {key}"),
        (false, true) => format!(
            "SELECT DISTINCT ON ({key}) {listed} FROM pg_temp.{table} ORDER BY {key}, {ARRIVAL}"
        ),
    };
    format!("INSERT INTO public.{table} ({listed}) {select}")
}

/// The column that numbers the rows of a first-wins table's copy in the order they
/// were added ([`Projection::first_wins_tables`]).
const ARRIVAL: &str = "rebuild_arrival";

/// Memory for the install's sorts (the server's default of 4 MB sorts half a million
/// rows on disk); only for the rebuild's transaction.
const INSTALL_WORK_MEM: &str = "256MB";

async fn empty_live_table(
    tx: &mut Transaction<'static, Postgres>,
    table: &str,
) -> Result<(), ProjectorError> {
    // In a savepoint: a refused TRUNCATE leaves the rebuild's transaction usable.
    let mut attempt = sqlx::Acquire::begin(&mut **tx).await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{TRUNCATE_LOCK_WAIT}'"))
        .execute(&mut *attempt)
        .await?;
    match sqlx::query(&format!("TRUNCATE public.{table}"))
        .execute(&mut *attempt)
        .await
    {
        Ok(_) => {
            sqlx::query("SET LOCAL lock_timeout = DEFAULT")
                .execute(&mut *attempt)
                .await?;
            attempt.commit().await?;
        }
        Err(error) => {
            attempt.rollback().await?;
            info!(table, %error, "could not truncate the live table; deleting its rows instead");
            sqlx::query(&format!("DELETE FROM public.{table}"))
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

/// One projection's side of a replay: applies each page it is handed in its own
/// transaction until the reader closes the channel, counting the records applied.
/// Returns the transaction uncommitted; an error drops it, which rolls it back.
async fn apply_pages(
    projection: Arc<dyn Projection>,
    mut tx: Transaction<'static, Postgres>,
    mut pages: mpsc::Receiver<Arc<Page>>,
    applied: Arc<AtomicU64>,
) -> Result<Rebuilt, ProjectorError> {
    while let Some(page) = pages.recv().await {
        projection
            .apply_page(&mut tx, &page.events)
            .await
            .map_err(|source| ProjectorError::Rebuild {
                projection: projection.name(),
                source: Box::new(source),
            })?;
        applied.fetch_add(page.read as u64, Ordering::Relaxed);
    }
    Ok(Rebuilt { projection, tx })
}

/// Where the reader of a replay stopped.
struct Fed {
    /// The position of the last record read (the checkpoint every projection saves).
    after: LogPosition,
    /// Records read.
    read: u64,
    /// The last count handed to `progress`.
    reported: u64,
}

/// The reader of a replay: reads the log once, one page ahead, and hands every page to
/// each projection's applier, until nothing is left to read and no transaction older
/// than `ours` can still add events. `None`: an applier stopped taking pages (it
/// failed; its task says why). After each page is handed over, `progress` is called
/// with the number of records every projection has applied, when that grew.
async fn feed(
    store: &EventStore,
    appliers: Vec<mpsc::Sender<Arc<Page>>>,
    applied: &[Arc<AtomicU64>],
    ours: i64,
    progress: &mut impl FnMut(u64),
) -> Result<Option<Fed>, ProjectorError> {
    let mut after = LogPosition::START;
    let (mut read, mut reported) = (0u64, 0u64);
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
        read += page.read as u64;
        after = last;
        let page = Arc::new(page);
        for applier in &appliers {
            if applier.send(page.clone()).await.is_err() {
                return Ok(None);
            }
        }
        let done = applied
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .min()
            .unwrap_or(read);
        if done > reported {
            reported = done;
            progress(done);
        }
    }
    Ok(Some(Fed {
        after,
        read,
        reported,
    }))
}

/// The error of the first applier that ended with one (the others' transactions roll
/// back as they are dropped).
async fn first_failure(appliers: &mut JoinSet<Result<Rebuilt, ProjectorError>>) -> ProjectorError {
    while let Some(ended) = appliers.join_next().await {
        match ended {
            Ok(Ok(_rebuilt)) => {}
            Ok(Err(error)) => return error,
            Err(join_error) => return ProjectorError::Applier(join_error.to_string()),
        }
    }
    ProjectorError::Applier("it stopped taking pages without an error".to_owned())
}

/// Rebuilds several projections from the start of the log, reading it once, each
/// projection in its own transaction on its own connection, concurrently.
///
/// Every projection's transaction is begun first: it takes the projection's checkpoint
/// lock (the live projector waits on it instead of racing the rebuild) and empties its
/// tables and state tables. Then one reader reads the log in pages of
/// [`REPLAY_PAGE_SIZE`], one page ahead, and hands each page (shared, not copied) to
/// one task per projection through a channel of [`REPLAY_QUEUE`] pages, so the log's
/// length does not change the memory used. The reader stops when nothing is left to
/// read and no transaction older than the oldest of the projections' transactions can
/// still add events (waiting at most a minute for one). Only when every projection has
/// applied every page does each save its checkpoint at the last position read (the
/// same for all: the live projector continues from there, so nothing is skipped or
/// applied twice) and commit; readers see the old rows until then.
///
/// Each projection's rebuild is atomic on its own: if any projection fails, the reader
/// stops and none commits, so every projection keeps its old rows and checkpoint.
/// Only a failure during the commits themselves (the last step, a few milliseconds)
/// can leave some projections rebuilt and the others as they were, each consistent
/// with its own checkpoint. Nothing more is needed across projections: the live
/// projector runs each one on its own checkpoint too.
///
/// `progress` is called after each page is handed to the projections, with the number
/// of events every one of them has applied so far when that grew, and once more at the
/// end (before the commits) with the total.
///
/// Needs one pooled connection per projection and one for the reader at the same time:
/// a pool smaller than that is refused up front ([`ProjectorError::PoolTooSmall`]);
/// `eventstore::connect` opens ten. No projections: nothing is read, 0.
pub async fn replay_many(
    store: &EventStore,
    projections: &[Arc<dyn Projection>],
    mut progress: impl FnMut(u64),
) -> Result<u64, ProjectorError> {
    if projections.is_empty() {
        return Ok(0);
    }
    let needed = projections.len() + 1;
    let pool_size = store.pool().options().get_max_connections();
    if usize::try_from(pool_size).is_ok_and(|size| size < needed) {
        return Err(ProjectorError::PoolTooSmall { needed, pool_size });
    }
    ensure_schema(store).await?;
    // Every transaction is begun before the reader takes its connection: whatever then
    // waits on our checkpoint locks (a live projector on the same pool holds a
    // connection while it waits) cannot hold the connections the replay still needs,
    // beyond the reader's one.
    let begun = futures::future::try_join_all(
        projections
            .iter()
            .map(|projection| begin_rebuild(store, projection.as_ref())),
    )
    .await?;
    // The oldest of our transactions: every event of an older transaction belongs in
    // this rebuild, also one whose transaction is still running somewhere and so not
    // yet readable; younger ones are the live projector's after we commit. Not the
    // newest: the log is readable only below the oldest transaction still open, ours
    // included, so an event appended between our transactions' ids cannot be read
    // before we commit, and waiting for it would wait the whole minute for nothing. It
    // lies beyond the checkpoint we save, so the live projector applies it.
    let ours = begun.iter().map(|(_, id)| *id).min().unwrap_or(0);
    let started = std::time::Instant::now();
    let mut appliers = JoinSet::new();
    let mut senders = Vec::with_capacity(projections.len());
    let mut applied = Vec::with_capacity(projections.len());
    for (projection, (tx, _)) in projections.iter().zip(begun) {
        let (send, receive) = mpsc::channel(REPLAY_QUEUE);
        let count = Arc::new(AtomicU64::new(0));
        let span = tracing::info_span!("replay", projection = projection.name());
        appliers
            .spawn(apply_pages(projection.clone(), tx, receive, count.clone()).instrument(span));
        senders.push(send);
        applied.push(count);
    }
    // An applier that ends while the log is still being read has failed: stop reading.
    let fed = tokio::select! {
        fed = feed(store, senders, &applied, ours, &mut progress) => fed?,
        Some(ended) = appliers.join_next() => match ended {
            Ok(Err(error)) => return Err(error),
            Err(join_error) => return Err(ProjectorError::Applier(join_error.to_string())),
            Ok(Ok(_rebuilt)) => None,
        },
    };
    let Some(fed) = fed else {
        return Err(first_failure(&mut appliers).await);
    };
    // The barrier: every projection has applied every page, or none commits.
    let mut rebuilt = Vec::with_capacity(projections.len());
    while let Some(ended) = appliers.join_next().await {
        match ended {
            Ok(Ok(done)) => rebuilt.push(done),
            Ok(Err(error)) => return Err(error),
            Err(join_error) => return Err(ProjectorError::Applier(join_error.to_string())),
        }
    }
    if fed.read > fed.reported {
        progress(fed.read);
    }
    futures::future::try_join_all(rebuilt.iter_mut().map(install_rebuild)).await?;
    for done in &mut rebuilt {
        store
            .save_checkpoint(
                &mut done.tx,
                &checkpoint_name(done.projection.as_ref()),
                fed.after,
            )
            .await?;
    }
    let mut committed = Vec::with_capacity(rebuilt.len());
    for done in rebuilt {
        let name = done.projection.name();
        if let Err(error) = done.tx.commit().await {
            warn!(
                %error,
                projection = name,
                ?committed,
                "a rebuilt projection failed to commit; the ones committed before it stay rebuilt and the others keep their old rows"
            );
            return Err(error.into());
        }
        committed.push(name);
    }
    let elapsed = started.elapsed();
    info!(
        projections = ?committed,
        events = fed.read,
        elapsed_ms = elapsed.as_millis() as u64,
        "the replay rebuilt every projection, each in its own transaction"
    );
    Ok(fed.read)
}
