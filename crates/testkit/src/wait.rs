use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, failing with `what` after `deadline`.
/// Tests wait on conditions, never on sleeps.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if started.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits until every event in the log is visible to followers (no transaction that
/// began before the last append is still running anywhere on the server; other
/// tests' transactions hold the gap-safe horizon back too), and returns the position
/// of the last one. A test that compares a follower's checkpoint with "the end of the
/// log" must take the end from here: a page read while the horizon is held back ends
/// early, and a follower idling at that same early end would look caught up.
pub async fn wait_readable(
    store: &eventstore::EventStore,
    deadline: Duration,
) -> anyhow::Result<eventstore::LogPosition> {
    let total = store.count().await?;
    wait_until("the whole log to be readable", deadline, || async {
        let visible = store
            .read_all(eventstore::LogPosition::START, total)
            .await?;
        Ok((i64::try_from(visible.len())? == total).then(|| {
            visible
                .last()
                .map(eventstore::RecordedEvent::log_position)
                .unwrap_or_default()
        }))
    })
    .await
}
