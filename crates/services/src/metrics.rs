//! Prometheus metrics (the `metrics` facade, rendered by `metrics-exporter-prometheus`;
//! `health` serves them on `/metrics`). docs/OPERATIONS.md lists every metric.
//!
//! Two kinds: counters and histograms recorded where things happen (a handler's outcome,
//! an append, a projected page, a relayed page, a circuit-breaker transition), and gauges
//! sampled from the database every few seconds by [`sample`] (lag of the log's followers,
//! orders by status, open timers): those describe the whole system, so every process
//! reports the same values.
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bus::{Incoming, Outcome};
use eventstore::EventStore;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::warn;

/// Messages whose handler finished with an ack, per worker.
pub const MESSAGES_HANDLED: &str = "orderflow_messages_handled_total";
/// Handler attempts that did not succeed (retry or dead letter), per worker.
pub const MESSAGES_FAILED: &str = "orderflow_messages_failed_total";
/// Handler attempts that asked to be retried (a transient failure), per worker.
pub const MESSAGES_RETRIED: &str = "orderflow_messages_retried_total";
/// Messages the handler sent to the dead-letter queue (undecodable, or can never
/// succeed), per worker.
pub const MESSAGES_DEAD_LETTERED: &str = "orderflow_messages_dead_lettered_total";
/// Time one handler attempt took, per worker.
pub const HANDLER_SECONDS: &str = "orderflow_handler_duration_seconds";
/// Time from an event's transaction beginning to the broker confirming its publish by
/// the relay: the relay's share of every hop between two services.
pub const RELAY_DELAY_SECONDS: &str = "orderflow_relay_delay_seconds";
/// Time from an event's transaction beginning to the relay reading it: the part of
/// [`RELAY_DELAY_SECONDS`] before the publish (the append's commit, the log's gap-safe
/// horizon, the relay's turn).
pub const RELAY_READ_DELAY_SECONDS: &str = "orderflow_relay_read_delay_seconds";
/// Events this process appended to the log.
pub const EVENTS_APPENDED: &str = "orderflow_events_appended_total";
/// Events this process applied to a read model, per projection.
pub const EVENTS_PROJECTED: &str = "orderflow_events_projected_total";
/// Events this process published to `orderflow.events`.
pub const EVENTS_RELAYED: &str = "orderflow_events_relayed_total";
/// Events the relay did not publish because no queue was bound to their routing key
/// (the broker would have dropped them).
pub const EVENTS_UNROUTED: &str = "orderflow_events_unrouted_total";
/// The highest global position in the log.
pub const LOG_HEAD: &str = "orderflow_log_head_position";
/// Positions between a follower's checkpoint and the log head (0 when caught up), per
/// follower (`relay`, `projection:order_status`, …).
pub const FOLLOWER_LAG_EVENTS: &str = "orderflow_follower_lag_events";
/// Age of the oldest event a follower has not applied yet (0 when caught up).
pub const FOLLOWER_LAG_SECONDS: &str = "orderflow_follower_lag_seconds";
/// Seconds since the event at the follower's checkpoint was recorded.
pub const FOLLOWER_LAST_APPLIED_AGE: &str = "orderflow_follower_last_applied_age_seconds";
/// Orders in `order_status`, per status.
pub const ORDERS: &str = "orderflow_orders";
/// Rows in `timers`: waits (payment, review, delivery) not yet ended.
pub const OPEN_TIMERS: &str = "orderflow_open_timers";
/// The payment gateway's circuit breaker: 0 closed, 1 open, 2 half-open.
pub const CIRCUIT_STATE: &str = "orderflow_circuit_breaker_state";
/// Processes with a live row in `workers` (heartbeat within three intervals).
pub const LIVE_PROCESSES: &str = "orderflow_live_processes";
/// Messages set aside behind their order (retries exhausted), by worker.
pub const MESSAGES_PARKED: &str = "orderflow_messages_parked_total";
/// Orders parked on some queue, waiting for a replay (sampled).
pub const PARKED_ORDERS: &str = "orderflow_parked_orders";

/// Handler latency buckets, in seconds: a few milliseconds (one append) up to a hung
/// gateway call.
const HANDLER_BUCKETS: [f64; 19] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Every status `order_status` knows: each is reported, 0 included, so a status that
/// empties drops to 0 instead of keeping its last count.
const STATUSES: [&str; 8] = domain::order::READ_MODEL_STATUSES;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (the first call; later calls return the same
/// handle) and returns the handle that renders the Prometheus text.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HANDLER_SECONDS.to_owned()), &HANDLER_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RELAY_DELAY_SECONDS.to_owned()),
                        &HANDLER_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RELAY_READ_DELAY_SECONDS.to_owned()),
                        &HANDLER_BUCKETS,
                    )
                }) {
                Ok(with_buckets) => with_buckets,
                Err(error) => {
                    warn!(%error, "latency buckets refused; reporting summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                warn!("another metrics recorder is installed; /metrics shows nothing");
            }
            handle
        })
        .clone()
}

/// Records one handler attempt of `worker`.
pub fn record_outcome(worker: &'static str, outcome: &Outcome, took: Duration) {
    metrics::histogram!(HANDLER_SECONDS, "worker" => worker).record(took.as_secs_f64());
    match outcome {
        Outcome::Ack | Outcome::Forward { .. } => {
            metrics::counter!(MESSAGES_HANDLED, "worker" => worker).increment(1)
        }
        Outcome::Retry { .. } => {
            metrics::counter!(MESSAGES_FAILED, "worker" => worker).increment(1);
            metrics::counter!(MESSAGES_RETRIED, "worker" => worker).increment(1);
        }
        Outcome::DeadLetter { .. } => {
            metrics::counter!(MESSAGES_FAILED, "worker" => worker).increment(1);
            metrics::counter!(MESSAGES_DEAD_LETTERED, "worker" => worker).increment(1);
        }
    }
}

/// A bus handler that records what the handler it wraps decided, and how long it took.
pub struct Metered {
    worker: &'static str,
    inner: Arc<dyn bus::Handler>,
}

impl Metered {
    pub fn new(worker: &'static str, inner: Arc<dyn bus::Handler>) -> Metered {
        // Present from the start (at 0), so a dashboard sees the worker before traffic.
        for name in [
            MESSAGES_HANDLED,
            MESSAGES_FAILED,
            MESSAGES_RETRIED,
            MESSAGES_DEAD_LETTERED,
        ] {
            metrics::counter!(name, "worker" => worker).absolute(0);
        }
        Metered { worker, inner }
    }
}

impl bus::Handler for Metered {
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let worker = self.worker;
        let handled = self.inner.handle(msg);
        Box::pin(async move {
            let started = Instant::now();
            let outcome = handled.await;
            record_outcome(worker, &outcome, started.elapsed());
            outcome
        })
    }

    fn ordering_key(&self, msg: &Incoming) -> Option<String> {
        self.inner.ordering_key(msg)
    }

    fn park(
        &self,
        msg: &Incoming,
        reason: &str,
        attempts: u32,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        self.inner.park(msg, reason, attempts)
    }
}

/// Counts a message parked by `worker`.
pub fn message_parked(worker: &'static str) {
    metrics::counter!(MESSAGES_PARKED, "worker" => worker).increment(1);
}

/// Counts events appended by this process.
pub fn events_appended(count: usize) {
    metrics::counter!(EVENTS_APPENDED).increment(count as u64);
}

/// One follower's place, as read from `checkpoints` and the log.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowerLag {
    pub follower: String,
    pub behind_events: i64,
    pub behind_seconds: f64,
    pub last_applied_age_seconds: Option<f64>,
}

/// What [`sample`] read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    pub head: i64,
    pub followers: Vec<FollowerLag>,
    pub orders_by_status: Vec<(String, i64)>,
    pub open_timers: i64,
    pub live_processes: i64,
    pub parked_orders: i64,
}

/// Reads the system-wide gauges from the database and sets them.
pub async fn sample(store: &EventStore) -> Result<Sample, sqlx::Error> {
    let mut conn = store.pool().acquire().await?;
    let head: i64 = sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events")
        .fetch_one(&mut *conn)
        .await?;
    let checkpoints: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT name, transaction_id, global_position FROM checkpoints ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut followers = Vec::with_capacity(checkpoints.len());
    for (follower, transaction_id, global_position) in checkpoints {
        // The oldest event after the checkpoint in the followers' reading order.
        let oldest_unapplied: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - recorded_at)::float8 FROM events
              WHERE (transaction_id, global_position) > ($1, $2)
              ORDER BY transaction_id, global_position LIMIT 1",
        )
        .bind(transaction_id)
        .bind(global_position)
        .fetch_optional(&mut *conn)
        .await?;
        let last_applied_age: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - recorded_at)::float8 FROM events
              WHERE global_position = $1",
        )
        .bind(global_position)
        .fetch_optional(&mut *conn)
        .await?;
        followers.push(FollowerLag {
            follower,
            // Nothing left to read: caught up, whatever the positions say (the reading
            // order is by transaction, so the last event read need not hold the highest
            // position).
            behind_events: match oldest_unapplied {
                Some(_) => (head - global_position).max(1),
                None => 0,
            },
            behind_seconds: oldest_unapplied.unwrap_or(0.0).max(0.0),
            last_applied_age_seconds: last_applied_age.map(|age| age.max(0.0)),
        });
    }
    // Kept by triggers on order_status (migration 0130): counting the table itself grew
    // with every order ever placed.
    let orders_by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, orders FROM order_status_counts ORDER BY status")
            .fetch_all(&mut *conn)
            .await?;
    let open_timers: i64 = sqlx::query_scalar("SELECT count(*) FROM timers")
        .fetch_one(&mut *conn)
        .await?;
    let live_processes = crate::registry::live_count(&mut conn).await?;
    let parked_orders: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT order_id) FROM parked_orders")
            .fetch_one(&mut *conn)
            .await?;
    let sample = Sample {
        parked_orders,
        head,
        followers,
        orders_by_status,
        open_timers,
        live_processes,
    };
    publish(&sample);
    Ok(sample)
}

fn publish(sample: &Sample) {
    metrics::gauge!(LOG_HEAD).set(sample.head as f64);
    for lag in &sample.followers {
        let follower = lag.follower.clone();
        metrics::gauge!(FOLLOWER_LAG_EVENTS, "follower" => follower.clone())
            .set(lag.behind_events as f64);
        metrics::gauge!(FOLLOWER_LAG_SECONDS, "follower" => follower.clone())
            .set(lag.behind_seconds);
        if let Some(age) = lag.last_applied_age_seconds {
            metrics::gauge!(FOLLOWER_LAST_APPLIED_AGE, "follower" => follower).set(age);
        }
    }
    for status in STATUSES {
        if !sample.orders_by_status.iter().any(|(s, _)| s == status) {
            metrics::gauge!(ORDERS, "status" => status).set(0.0);
        }
    }
    for (status, count) in &sample.orders_by_status {
        metrics::gauge!(ORDERS, "status" => status.clone()).set(*count as f64);
    }
    metrics::gauge!(OPEN_TIMERS).set(sample.open_timers as f64);
    metrics::gauge!(LIVE_PROCESSES).set(sample.live_processes as f64);
    metrics::gauge!(PARKED_ORDERS).set(sample.parked_orders as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_move_the_counters_of_their_worker() {
        let handle = install();
        record_outcome("unit-test", &Outcome::Ack, Duration::from_millis(3));
        record_outcome(
            "unit-test",
            &Outcome::Retry { reason: "x".into() },
            Duration::from_millis(3),
        );
        record_outcome(
            "unit-test",
            &Outcome::DeadLetter { reason: "x".into() },
            Duration::from_millis(3),
        );
        let text = handle.render();
        for line in [
            "orderflow_messages_handled_total{worker=\"unit-test\"} 1",
            "orderflow_messages_failed_total{worker=\"unit-test\"} 2",
            "orderflow_messages_retried_total{worker=\"unit-test\"} 1",
            "orderflow_messages_dead_lettered_total{worker=\"unit-test\"} 1",
            "orderflow_handler_duration_seconds_count{worker=\"unit-test\"} 3",
            "orderflow_handler_duration_seconds_bucket{worker=\"unit-test\",le=\"0.005\"} 3",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
