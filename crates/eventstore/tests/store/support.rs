use std::time::{Duration, Instant};

use eventstore::{EventStore, LogPosition, Metadata, NewEvent, RecordedEvent};
use uuid::Uuid;

/// Generous: `read_all` waits for every transaction on the server that began before,
/// including other tests' databases.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn event(event_type: &str) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload: serde_json::json!({ "n": 1 }),
        metadata: Metadata {
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
        },
    }
}

pub fn events(n: usize) -> Vec<NewEvent> {
    (0..n).map(|_| event("Happened")).collect()
}

/// Follows the log from `after` in pages of `page` until `want` events arrived, as a
/// follower with a checkpoint would: read, then wait for a wake-up (or a short fallback).
/// Fails after `DEADLINE`.
pub async fn follow_until(
    store: &EventStore,
    after: LogPosition,
    page: i64,
    want: usize,
) -> anyhow::Result<Vec<RecordedEvent>> {
    let mut wakeups = store.follow().await?;
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut position = after;
    loop {
        loop {
            let batch = store.read_all(position, page).await?;
            let Some(last) = batch.last() else { break };
            position = last.log_position();
            seen.extend(batch);
        }
        if seen.len() >= want {
            return Ok(seen);
        }
        if started.elapsed() > DEADLINE {
            anyhow::bail!(
                "after {DEADLINE:?} the follower has {} of {want} events",
                seen.len()
            );
        }
        wakeups.wait(Duration::from_millis(50)).await;
    }
}
