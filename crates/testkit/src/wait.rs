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

/// Counts the starts of a test's stand-in for slow work (a handler, a consumer), so
/// that each one can stay busy until the next has started, or a deadline has passed.
/// An overlap the test must rule out then happens whenever the code under test allows
/// it, rather than by the luck of how long a sleep lasted.
#[derive(Clone, Debug, Default)]
pub struct Starts(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

impl Starts {
    /// Counts a start and returns its number.
    pub fn start(&self) -> u64 {
        let mut number = 0;
        self.0.send_modify(|count| {
            *count += 1;
            number = *count;
        });
        number
    }

    /// Waits until a start after start `mine`, or until `deadline` (the last one has no
    /// successor).
    pub async fn next_after(&self, mine: u64, deadline: Duration) {
        let mut starts = self.0.subscribe();
        let _ = tokio::time::timeout(deadline, starts.wait_for(|count| *count > mine)).await;
    }
}
