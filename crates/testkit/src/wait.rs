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
