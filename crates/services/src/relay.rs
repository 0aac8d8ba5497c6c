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
const EARLY_LIMIT: usize = 1_000;

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

    /// What of `page` to publish now: its settled events (none of them was published
    /// early: those are skipped by the read), then, while there is room to remember
    /// them, the committed ones above the horizon. Returns them and the positions to
    /// remember.
    fn due<'p>(&self, page: &'p CommittedPage) -> (Vec<&'p RecordedEvent>, Vec<LogPosition>) {
        let (settled, above) = page.split();
        let mut due: Vec<&RecordedEvent> = settled.iter().collect();
        let mut early = Vec::new();
        if self.ahead && self.early.len() < EARLY_LIMIT {
            due.extend(above);
            early.extend(above.iter().map(RecordedEvent::log_position));
        }
        (due, early)
    }

    /// After `page` was published: the position moves to the last settled event it
    /// covers, published now or early, and what it passed is forgotten. Returns how
    /// many early events the horizon passed.
    fn advance(
        &mut self,
        after: LogPosition,
        page: &CommittedPage,
        early: Vec<LogPosition>,
    ) -> usize {
        // A full page may stop before some settled events: the position must not pass
        // the page's last event, since later ones may not have been published.
        let horizon = LogPosition {
            transaction_id: page.horizon,
            global_position: 0,
        };
        let bound = match (page.full, page.events.last()) {
            (true, Some(last)) => next(last.log_position()).min(horizon),
            _ => horizon,
        };
        let settled_now = page.split().0.last().map(RecordedEvent::log_position);
        let settled_early = self.early.range(..bound).next_back().copied();
        let published = [Some(after), settled_now, settled_early]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(after);
        let kept = self.early.split_off(&next(published));
        let passed = self.early.len();
        self.early = kept;
        self.early.extend(early);
        self.published = Some(published);
        passed
    }

    /// The global positions published early, for the read to skip.
    fn skip(&self) -> Vec<i64> {
        self.early.iter().map(|p| p.global_position).collect()
    }
}

/// The position just after `position`.
fn next(position: LogPosition) -> LogPosition {
    LogPosition {
        global_position: position.global_position.saturating_add(1),
        ..position
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
    let page = store.read_committed(after, PAGE, &cursor.skip()).await?;
    let (due, early) = cursor.due(&page);
    if !due.is_empty() {
        bus.publish_many(due.iter().map(|e| event_message(e)).collect())
            .await?;
        metrics::counter!(crate::metrics::EVENTS_RELAYED).increment(due.len() as u64);
        debug!(count = due.len(), ahead = early.len(), "relayed events");
    }
    let published = due.len();
    let passed = cursor.advance(after, &page, early);
    Ok(published + passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(transaction_id: i64, global_position: i64) -> LogPosition {
        LogPosition {
            transaction_id,
            global_position,
        }
    }

    fn page(positions: &[(i64, i64)], horizon: i64, full: bool) -> CommittedPage {
        let events = positions
            .iter()
            .map(|&(transaction_id, global_position)| RecordedEvent {
                global_position,
                transaction_id,
                stream_name: format!("stock-{global_position}"),
                stream_version: 0,
                event_id: uuid::Uuid::new_v4(),
                event_type: "StockSet".to_owned(),
                schema_version: 1,
                payload: serde_json::Value::Null,
                metadata: eventstore::Metadata {
                    correlation_id: uuid::Uuid::nil(),
                    causation_id: uuid::Uuid::nil(),
                },
                recorded_at: chrono::Utc::now(),
            })
            .collect();
        CommittedPage {
            events,
            horizon,
            full,
        }
    }

    fn ahead() -> Cursor {
        Cursor {
            ahead: true,
            ..Cursor::default()
        }
    }

    #[test]
    fn events_above_the_horizon_are_published_and_remembered_but_do_not_move_the_position() {
        let mut cursor = ahead();
        let read = page(&[(5, 1), (9, 3)], 8, false);
        let (due, early) = cursor.due(&read);
        assert_eq!(
            due.len(),
            2,
            "the settled event and the one above the horizon"
        );
        assert_eq!(cursor.advance(at(0, 0), &read, early), 0);
        assert_eq!(cursor.published, Some(at(5, 1)));
        assert_eq!(cursor.skip(), [3]);

        // The older transaction 7 commits: its event is published, and the horizon
        // passes both it and the early one.
        let read = page(&[(7, 2)], 10, false);
        let (due, early) = cursor.due(&read);
        assert_eq!(due.len(), 1);
        assert_eq!(
            cursor.advance(at(5, 1), &read, early),
            1,
            "one early event passed"
        );
        assert_eq!(cursor.published, Some(at(9, 3)));
        assert!(cursor.skip().is_empty());
    }

    #[test]
    fn a_full_page_moves_the_position_no_further_than_its_last_event() {
        let mut cursor = ahead();
        cursor.early.insert(at(6, 9));
        // Settled up to transaction 10, but the page stopped at (5, 4): events between
        // it and the early one may not have been read yet.
        let read = page(&[(4, 1), (5, 4)], 10, true);
        let (_, early) = cursor.due(&read);
        assert_eq!(cursor.advance(at(0, 0), &read, early), 0);
        assert_eq!(cursor.published, Some(at(5, 4)));
        assert_eq!(cursor.skip(), [9], "still remembered");

        let read = page(&[], 10, false);
        let (due, early) = cursor.due(&read);
        assert!(due.is_empty());
        assert_eq!(cursor.advance(at(5, 4), &read, early), 1);
        assert_eq!(cursor.published, Some(at(6, 9)));
    }

    #[test]
    fn a_relay_that_cannot_remember_publishes_only_settled_events() {
        let cursor = Cursor::default();
        let read = page(&[(5, 1), (9, 3)], 8, false);
        let (due, early) = cursor.due(&read);
        assert_eq!(due.len(), 1);
        assert!(early.is_empty());
    }
}
