//! The outbox relay: the event log is the outbox. It follows the log with the gap-safe
//! reader, publishes each committed event to `orderflow.events` with publisher
//! confirms, and only then moves its checkpoint. A crash in between republishes the
//! page; consumers dedupe by event id, so that is harmless.
//!
//! One relay publishes at a time: it holds a session advisory lock on a connection of
//! its own; other instances wait as hot standbys and take over when that connection
//! goes away.
use std::future::Future;
use std::time::Duration;

use bus::Bus;
use eventstore::{EventStore, LogPosition, RecordedEvent};
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
    // The active relay is the only writer of its checkpoint (it holds the lock), so it
    // remembers where it is instead of reading the checkpoint for every page.
    let mut known = None;
    loop {
        let published = relay_next(store, bus, &mut known).await?;
        if published == 0 {
            wakeups.wait(FALLBACK_POLL).await;
            // Notice a lost lock connection (another relay may have taken over).
            sqlx::query("SELECT 1").execute(&mut lock_conn).await?;
        }
    }
}

/// Publishes the next page after the checkpoint; returns how many events it published.
pub async fn relay_page(store: &EventStore, bus: &Bus) -> Result<usize, ServiceError> {
    relay_next(store, bus, &mut None).await
}

/// [`relay_page`] after `known`, the checkpoint last read or written (`None`: read
/// it). An error forgets it.
async fn relay_next(
    store: &EventStore,
    bus: &Bus,
    known: &mut Option<LogPosition>,
) -> Result<usize, ServiceError> {
    let after = match known.take() {
        Some(after) => after,
        None => store.load_checkpoint(CHECKPOINT).await?,
    };
    let records = store.read_all(after, PAGE).await?;
    let Some(last) = records.last().map(RecordedEvent::log_position) else {
        *known = Some(after);
        return Ok(0);
    };
    bus.publish_many(records.iter().map(event_message).collect())
        .await?;
    let mut conn = store.pool().acquire().await?;
    store.save_checkpoint(&mut conn, CHECKPOINT, last).await?;
    *known = Some(last);
    metrics::counter!(crate::metrics::EVENTS_RELAYED).increment(records.len() as u64);
    debug!(count = records.len(), "relayed events");
    Ok(records.len())
}
