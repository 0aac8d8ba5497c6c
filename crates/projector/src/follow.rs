//! Live projection: one reader follows the log for every projection of the process.
//!
//! Each page is read and decoded once and handed to every projection, which applies
//! the part after its own checkpoint, rows and checkpoint together. Normally all of
//! them do so in one transaction: one BEGIN, one statement that takes every
//! checkpoint's lock, one that moves every checkpoint, one commit, instead of one of
//! each per projection. A projection stays independent of the others all the same:
//! its checkpoint is its own, and when the shared transaction cannot be had (a lock
//! held by someone else, a replay or the same projection in another process) or fails
//! (one projection's write), the page is applied again with a transaction per
//! projection, so that the trouble holds back only the projection it belongs to. The
//! reader starts each page at the checkpoint of the one that is furthest behind.
//! Reading once instead of once per projection saves three queries and three
//! decodings of every event.
use std::sync::Arc;
use std::time::Duration;

use domain::EventEnvelope;
use eventstore::{EventStore, LogPosition, RecordedEvent};
use tracing::{debug, warn};

use crate::decode::decode_page_at;
use crate::runner::checkpoint_name;
use crate::{Projection, ProjectorError, PAGE_SIZE};

/// How long a caught-up follower waits for a wake-up before looking again anyway.
const FALLBACK_POLL: Duration = Duration::from_millis(500);
/// Pause after a failed round before the next.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// After a page that was not full, the next page is read this long after it at the
/// earliest (or at once, when the log's followers were idle in between). Every page is
/// a transaction of about ten statements: at a steady rate, reading on every append
/// made a page of 3–4 events each, about thirteen statements per order at 200 orders/s
/// and most of PostgreSQL's work at lower rates. Waiting also catches events held
/// back behind a transaction whose end wakes nobody (the log's horizon).
const PAGE_INTERVAL: Duration = Duration::from_millis(10);

/// A page read once for every projection.
struct SharedPage {
    /// The position of the last record read (also of one that could not be decoded).
    last: LogPosition,
    /// It held as many records as a page can: more may follow at once.
    full: bool,
    positions: Vec<LogPosition>,
    events: Vec<EventEnvelope>,
}

impl SharedPage {
    /// The events after `after`.
    fn after(&self, after: LogPosition) -> &[EventEnvelope] {
        let start = self.positions.partition_point(|p| *p <= after);
        self.events.get(start..).unwrap_or_default()
    }
}

/// One projection and where this follower believes its checkpoint is (`None`: read
/// it before the next page).
struct Follower {
    projection: Arc<dyn Projection>,
    checkpoint: String,
    known: Option<LogPosition>,
}

/// Follows the log with `projections` until the task is dropped.
pub(crate) async fn follow_all(
    store: EventStore,
    projections: Vec<Arc<dyn Projection>>,
) -> Result<(), ProjectorError> {
    let mut wakeups = store.follow().await?;
    let mut followers: Vec<Follower> = projections
        .into_iter()
        .map(|projection| Follower {
            checkpoint: checkpoint_name(projection.as_ref()),
            projection,
            known: None,
        })
        .collect();
    loop {
        match round(&store, &mut followers).await {
            Ok(Round { applied: 0, .. }) => {
                wakeups.wait(FALLBACK_POLL).await;
            }
            Ok(Round { full: false, .. }) => {
                let next_page = tokio::time::Instant::now() + PAGE_INTERVAL;
                // Taking the wake-ups of the interval here keeps them from ending a
                // later idle wait at once: the next page reads what they announced.
                wakeups.wait(PAGE_INTERVAL).await;
                tokio::time::sleep_until(next_page).await;
            }
            Ok(_) => {}
            Err(error) => {
                // Nothing of a failed projection's page was committed: it is applied
                // again from its checkpoint once the database answers.
                warn!(%error, "projection round failed; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// What one round did (`Default`: nothing read).
#[derive(Default)]
struct Round {
    /// How many events were applied by any projection (0: nothing to do for now).
    applied: usize,
    /// The page read was full: read on at once.
    full: bool,
}

/// Reads the next page after the furthest-behind checkpoint and lets every projection
/// apply its part.
async fn round(store: &EventStore, followers: &mut [Follower]) -> Result<Round, ProjectorError> {
    for follower in followers.iter_mut() {
        if follower.known.is_none() {
            follower.known = Some(store.load_checkpoint(&follower.checkpoint).await?);
        }
    }
    let Some(from) = followers.iter().filter_map(|f| f.known).min() else {
        return Ok(Round::default());
    };
    let Some(page) = read(store, from).await? else {
        return Ok(Round::default());
    };
    Ok(Round {
        applied: apply_everywhere(store, followers, &page).await?,
        full: page.full,
    })
}

/// Applies the page for every projection, together when it can; returns how many
/// events were applied by any of them.
async fn apply_everywhere(
    store: &EventStore,
    followers: &mut [Follower],
    page: &SharedPage,
) -> Result<usize, ProjectorError> {
    match apply_together(store, followers, page).await {
        Ok(Some(applied)) => return Ok(applied),
        Ok(None) => {}
        Err(error) => {
            debug!(%error, "the page failed in the shared transaction; applying it projection by projection");
        }
    }
    let applied = futures::future::join_all(
        followers
            .iter_mut()
            .map(|follower| apply(store, follower, page)),
    )
    .await;
    let mut progress = 0;
    let mut failure = None;
    for outcome in applied {
        match outcome {
            Ok(n) => progress += n,
            Err(error) => failure = Some(error),
        }
    }
    match failure {
        Some(error) if progress == 0 => Err(error),
        Some(error) => {
            warn!(%error, "a projection failed on a page the others applied; it retries");
            Ok(progress)
        }
        None => Ok(progress),
    }
}

async fn read(
    store: &EventStore,
    after: LogPosition,
) -> Result<Option<SharedPage>, ProjectorError> {
    let records = store.read_all_text(after, PAGE_SIZE).await?;
    let Some(last) = records.last().map(RecordedEvent::log_position) else {
        return Ok(None);
    };
    let full = i64::try_from(records.len()).is_ok_and(|read| read >= PAGE_SIZE);
    let (positions, events) = decode_page_at(records).into_iter().unzip();
    Ok(Some(SharedPage {
        last,
        full,
        positions,
        events,
    }))
}

/// Applies the page for every projection that is behind, all in one transaction.
/// `None` when that is not for this page (fewer than two are behind, or a checkpoint
/// is held or moved elsewhere): nothing was committed. Returns how many events the
/// projections covered, counted as [`apply`] counts them.
async fn apply_together(
    store: &EventStore,
    followers: &mut [Follower],
    page: &SharedPage,
) -> Result<Option<usize>, ProjectorError> {
    let mut due: Vec<(&mut Follower, LogPosition)> = followers
        .iter_mut()
        .filter_map(|follower| match follower.known {
            Some(after) if after < page.last => Some((follower, after)),
            _ => None,
        })
        .collect();
    if due.len() < 2 {
        return Ok(None);
    }
    let names: Vec<&str> = due.iter().map(|(f, _)| f.checkpoint.as_str()).collect();
    let mut tx = eventstore::begin(store.pool()).await?;
    if !store
        .try_lock_checkpoints(&mut tx, &names)
        .await?
        .into_iter()
        .all(|held| held)
    {
        // Those that are free take their turns one by one.
        return Ok(None);
    }
    for (follower, after) in &due {
        follower
            .projection
            .apply_page(&mut tx, page.after(*after))
            .await?;
    }
    let moves: Vec<(&str, LogPosition)> = due
        .iter()
        .map(|(f, after)| (f.checkpoint.as_str(), *after))
        .collect();
    if !store
        .advance_checkpoints(&mut tx, &moves, page.last)
        .await?
    {
        tx.rollback().await?;
        return Ok(None);
    }
    // Unknown until the commit is confirmed (see `apply`).
    for (follower, _) in &mut due {
        follower.known = None;
    }
    tx.commit().await?;
    if due.iter().any(|(follower, after)| {
        follower.projection.wakes_followers() && !page.after(*after).is_empty()
    }) {
        store.notify_projected();
    }
    let mut covered = 0;
    for (follower, after) in due {
        follower.known = Some(page.last);
        covered += projected(follower.projection.name(), page.after(after).len());
    }
    Ok(Some(covered))
}

/// Applies the part of `page` after the follower's checkpoint, rows and checkpoint in
/// one transaction; returns how many events it covered.
async fn apply(
    store: &EventStore,
    follower: &mut Follower,
    page: &SharedPage,
) -> Result<usize, ProjectorError> {
    let Some(after) = follower.known else {
        return Ok(0);
    };
    if after >= page.last {
        return Ok(0);
    }
    let name = follower.projection.name();
    let mut tx = eventstore::begin(store.pool()).await?;
    if !store
        .try_lock_checkpoint(&mut tx, &follower.checkpoint)
        .await?
    {
        debug!(
            projection = name,
            "checkpoint held elsewhere; leaving the page to it"
        );
        follower.known = None;
        return Ok(0);
    }
    // Unknown until the commit is confirmed: a lost answer may or may not have
    // committed, so an error below makes the next round read the checkpoint again.
    follower.known = None;
    let events = page.after(after);
    follower.projection.apply_page(&mut tx, events).await?;
    // The checkpoint is not read under the lock: moving it checks that it is still
    // where this follower left it (another process may have had a turn since).
    if !store
        .advance_checkpoint(&mut tx, &follower.checkpoint, after, page.last)
        .await?
    {
        debug!(
            projection = name,
            "checkpoint moved elsewhere; undoing the page and reading it again"
        );
        tx.rollback().await?;
        return Ok(0);
    }
    tx.commit().await?;
    follower.known = Some(page.last);
    if follower.projection.wakes_followers() && !events.is_empty() {
        store.notify_projected();
    }
    Ok(projected(name, events.len()))
}

/// Counts a projection's committed events; returns the progress they make.
fn projected(projection: &'static str, events: usize) -> usize {
    // services::metrics::EVENTS_PROJECTED (this crate does not depend on services).
    metrics::counter!("orderflow_events_projected_total", "projection" => projection)
        .increment(events as u64);
    // Progress even when every event of its part was undecodable (skipped).
    events.max(1)
}
