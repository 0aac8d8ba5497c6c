//! Running N concurrent clients against a deadline or an op count, and the figures.
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

/// What a timed run did.
#[derive(Debug, Clone)]
pub struct Timed {
    pub ops: u64,
    pub elapsed: Duration,
    /// Latency of each op, microseconds, sorted.
    pub latencies_us: Vec<u64>,
}

impl Timed {
    /// Ops (× `units_per_op`) per second.
    pub fn rate(&self, units_per_op: f64) -> f64 {
        self.ops as f64 * units_per_op / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile latency in milliseconds.
    pub fn p_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }
}

/// The `p`-th percentile (0–100) of sorted values (nearest rank); 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// How long each client keeps going.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// Until the deadline (ops are whatever fits).
    Elapsed(Duration),
    /// This many ops per client.
    Ops(usize),
}

/// Runs `clients` tasks; client `c` calls `op(c, i)` for i = 0, 1, … until `until`.
/// All clients start together; the clock runs from the start to the last one's end.
pub async fn run_clients<F, Fut>(clients: usize, until: Until, op: F) -> anyhow::Result<Timed>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let op = Arc::clone(&op);
        let barrier = Arc::clone(&barrier);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            barrier.wait().await;
            let start = Instant::now();
            let mut i = 0;
            loop {
                let go_on = match until {
                    Until::Elapsed(d) => start.elapsed() < d,
                    Until::Ops(n) => i < n,
                };
                if !go_on {
                    break;
                }
                let t = Instant::now();
                op(client, i).await?;
                latencies.push(t.elapsed().as_micros() as u64);
                i += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        });
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut latencies_us = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        latencies_us.extend(joined??);
    }
    let elapsed = start.elapsed();
    latencies_us.sort_unstable();
    Ok(Timed {
        ops: latencies_us.len() as u64,
        elapsed,
        latencies_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
