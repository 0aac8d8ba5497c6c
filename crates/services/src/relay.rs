//! The outbox relay: the event log is the outbox. It follows the log with the gap-safe
//! reader, publishes each committed event to `orderflow.events` with publisher
//! confirms, and only then moves its checkpoint. A crash in between republishes the
//! page; consumers dedupe by event id, so that is harmless.
//!
//! One relay publishes at a time: it holds a session advisory lock on a connection of
//! its own; other instances wait as hot standbys and take over when that connection
//! goes away.
use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use bus::Bus;
use eventstore::{CommittedPage, EventStore, LogPosition, RecordedEvent};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tracing::{debug, info, warn};

use crate::message::event_message;
use crate::ServiceError;

pub const CHECKPOINT: &str = "relay";
const PAGE: i64 = 1_000;
const FALLBACK_POLL: Duration = Duration::from_millis(500);
/// Arbitrary, fixed: the advisory lock key that elects the active relay.
const RELAY_LOCK_KEY: i64 = 0x6f72_6465_7266_6c6f;

/// Runs the relay until `shutdown` resolves.
pub async fn run(
    store: EventStore,
    bus: Bus,
    database_url: String,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            result = lead(&store, &bus, &database_url) => {
                if let Err(error) = result {
                    warn!(%error, "relay interrupted; starting again");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Becomes the active relay (waiting for the lock), then relays until an error.
async fn lead(store: &EventStore, bus: &Bus, database_url: &str) -> Result<(), ServiceError> {
    let mut lock_conn = PgConnection::connect(database_url).await?;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK_KEY)
            .fetch_one(&mut lock_conn)
            .await?;
        if got {
            break;
        }
        debug!("another relay is active; standing by");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    info!("relay active");
    let mut wakeups = store.follow().await?;
    let mut cursor = Cursor {
        ahead: true,
        ..Cursor::default()
    };
    loop {
        let progress = relay_next(store, bus, &mut cursor).await?;
        // Under load the checkpoint is written at most every CHECKPOINT_EVERY, not
        // after every page: its commit was on every hop's path. Events published
        // since the last save are published again after a crash, which consumers
        // make harmless (derived event ids).
        cursor.save(store, progress == 0).await?;
        if progress == 0 {
            wakeups.wait(FALLBACK_POLL).await;
            // Notice a lost lock connection (another relay may have taken over).
            sqlx::query("SELECT 1").execute(&mut lock_conn).await?;
        }
    }
}

/// How often a busy relay saves its checkpoint (an idle one saves at once).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// At most this many events published ahead of the horizon are remembered; past it
/// the relay waits for the horizon, as a gap-safe reader does.
const EARLY_LIMIT: usize = 10_000;

/// Where the active relay is. It is the only writer of its checkpoint while it holds
/// the lock, so it remembers the position instead of reading it for every page.
#[derive(Default)]
struct Cursor {
    /// Every event up to here is published (`None`: read the checkpoint first).
    published: Option<LogPosition>,
    /// Events after `published` that were published already, as soon as they were
    /// committed, ahead of the gap-safe horizon (an older transaction was still open
    /// somewhere on the server). Not published again when the horizon passes them.
    early: BTreeSet<LogPosition>,
    /// The last position saved, and when.
    saved: Option<(LogPosition, Instant)>,
    /// Whether to publish events above the horizon (only a relay that keeps its
    /// cursor between pages can remember them).
    ahead: bool,
}

impl Cursor {
    /// Saves the published position if it is newer than the saved one and the last
    /// save is `CHECKPOINT_EVERY` old (or `now`).
    async fn save(&mut self, store: &EventStore, now: bool) -> Result<(), ServiceError> {
        let Some(published) = self.published else {
            return Ok(());
        };
        let due = match self.saved {
            None => true,
            Some((saved, _)) if saved == published => false,
            Some((_, at)) => now || at.elapsed() >= CHECKPOINT_EVERY,
        };
        if due {
            let mut conn = store.pool().acquire().await?;
            store
                .save_checkpoint(&mut conn, CHECKPOINT, published)
                .await?;
            self.saved = Some((published, Instant::now()));
        }
        Ok(())
    }

    /// What of `page` to publish now: the settled events not published early, and
    /// (while there is room to remember them) the committed ones above the horizon
    /// not published yet, in log order.
    fn due<'p>(&self, page: &'p CommittedPage) -> (Vec<&'p RecordedEvent>, Vec<LogPosition>) {
        let (settled, above) = page.split();
        let mut due: Vec<&RecordedEvent> = settled
            .iter()
            .filter(|e| !self.early.contains(&e.log_position()))
            .collect();
        let mut early = Vec::new();
        if self.ahead && self.early.len() < EARLY_LIMIT {
            for event in above {
                let position = event.log_position();
                if !self.early.contains(&position) {
                    due.push(event);
                    early.push(position);
                }
            }
        }
        (due, early)
    }

    /// After `page` was published: the position moves to its last settled event, and
    /// what it passed is no longer remembered as early.
    fn advance(&mut self, after: LogPosition, page: &CommittedPage, early: Vec<LogPosition>) {
        let published = page
            .split()
            .0
            .last()
            .map_or(after, RecordedEvent::log_position);
        self.early.extend(early);
        self.early = self.early.split_off(&LogPosition {
            global_position: published.global_position.saturating_add(1),
            ..published
        });
        self.published = Some(published);
    }
}

/// Publishes the next page after the checkpoint and saves the checkpoint; returns how
/// many events it published.
pub async fn relay_page(store: &EventStore, bus: &Bus) -> Result<usize, ServiceError> {
    let mut cursor = Cursor::default();
    let progress = relay_next(store, bus, &mut cursor).await?;
    if progress > 0 {
        cursor.save(store, true).await?;
    }
    Ok(progress)
}

/// Publishes what is due after the cursor's position (read from the checkpoint when
/// it has none); returns how many events it published or passed (0: nothing to do
/// until something else commits). An error forgets the position: the next page starts
/// at the checkpoint.
async fn relay_next(
    store: &EventStore,
    bus: &Bus,
    cursor: &mut Cursor,
) -> Result<usize, ServiceError> {
    let after = match cursor.published.take() {
        Some(after) => after,
        None => {
            let saved = store.load_checkpoint(CHECKPOINT).await?;
            cursor.saved = Some((saved, Instant::now()));
            cursor.early.clear();
            saved
        }
    };
    let page = store.read_committed(after, PAGE).await?;
    let (due, early) = cursor.due(&page);
    if !due.is_empty() {
        bus.publish_many(due.iter().map(|e| event_message(e)).collect())
            .await?;
        metrics::counter!(crate::metrics::EVENTS_RELAYED).increment(due.len() as u64);
        debug!(count = due.len(), ahead = early.len(), "relayed events");
    }
    // Passed by the horizon (published now or before), or published ahead of it.
    let progress = page.settled + early.len();
    cursor.advance(after, &page, early);
    Ok(progress)
}
