//! One look at the whole system, gathered from where each figure really lives:
//! PostgreSQL (orders, the log head and its followers' lag, timers, the worker
//! registry), RabbitMQ (queue depths and consumers, by passive declares) and the
//! `/metrics` endpoints of the registered payment processes (the circuit breaker lives
//! in their memory only).
use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use eventstore::EventStore;
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use services::metrics::FollowerLag;
use services::registry::Process;

use super::scrape;

/// Every status of `order_status`, in the order's course (contract section 3).
pub const STATUSES: [&str; 8] = domain::order::READ_MODEL_STATUSES;

/// Statuses an order ends in.
pub const TERMINAL: [&str; 4] = ["delivered", "completed", "cancelled", "rejected"];

/// A queue as the broker counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub name: String,
    /// Ready messages (not those delivered and awaiting an ack).
    pub messages: u32,
    pub consumers: u32,
}

/// The payment gateway's circuit breaker in one payment process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
    /// The process's `/metrics` did not answer or did not carry the gauge.
    Unknown,
}

impl Circuit {
    /// The gauge's value as `services::breaker` sets it: 0 closed, 1 open, 2 half-open.
    pub fn from_gauge(value: f64) -> Circuit {
        match value {
            0.0 => Circuit::Closed,
            1.0 => Circuit::Open,
            2.0 => Circuit::HalfOpen,
            _ => Circuit::Unknown,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "OPEN",
            Circuit::HalfOpen => "half-open",
            Circuit::Unknown => "unknown",
        }
    }
}

/// One payment process's breaker, named by where its `/metrics` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    pub process: String,
    pub state: Circuit,
}

/// Everything one frame shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The database's clock, so rates do not depend on this machine's.
    pub taken_at: DateTime<Utc>,
    /// Every status of [`STATUSES`], 0 included, in that order.
    pub orders: Vec<(String, i64)>,
    /// Orders placed within the last minute (by `placed_at`).
    pub placed_last_minute: i64,
    /// The log holds transaction ids the server has not reached: a logical restore
    /// into another server (docs/OPERATIONS.md, "Backup and restore"). The followers
    /// then read nothing new, and their lag still says 0.
    pub log_ahead_of_server: bool,
    pub head: i64,
    pub followers: Vec<FollowerLag>,
    pub open_timers: i64,
    /// Every orderflow queue, or why the broker could not be asked.
    pub queues: Result<Vec<QueueDepth>, String>,
    /// Registered processes, live ones first.
    pub processes: Vec<Process>,
    /// One per live payment process that serves `/metrics`.
    pub breakers: Vec<Breaker>,
}

impl Snapshot {
    pub fn orders_total(&self) -> i64 {
        self.orders.iter().map(|(_, n)| n).sum()
    }

    /// Orders in a final status.
    pub fn finished_total(&self) -> i64 {
        self.orders
            .iter()
            .filter(|(status, _)| TERMINAL.contains(&status.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn orders_in(&self, status: &str) -> i64 {
        self.orders
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n)
    }

    /// Messages in `orderflow.dead-letter`, when the broker answered.
    pub fn dead_letters(&self) -> Option<u32> {
        self.queue(bus::DEAD_LETTER_QUEUE).map(|q| q.messages)
    }

    pub fn queue(&self, name: &str) -> Option<&QueueDepth> {
        self.queues.as_ref().ok()?.iter().find(|q| q.name == name)
    }

    pub fn live_processes(&self) -> impl Iterator<Item = &Process> {
        self.processes.iter().filter(|p| !p.gone)
    }

    /// The worst state any payment process reports.
    pub fn circuit(&self) -> Option<Circuit> {
        let rank = |c: &Circuit| match c {
            Circuit::Open => 3,
            Circuit::HalfOpen => 2,
            Circuit::Unknown => 1,
            Circuit::Closed => 0,
        };
        self.breakers.iter().map(|b| b.state).max_by_key(rank)
    }
}

/// Every queue orderflow declares: the command intake, the services', the dead
/// letters and the retry tiers (bus::topology).
pub fn orderflow_queues() -> Vec<&'static str> {
    bus::topology::all_queues()
        .chain(bus::topology::RETRY_TIERS.iter().map(|(tier, _)| *tier))
        .collect()
}

/// Where the figures come from; kept open between frames.
pub struct Sources {
    store: EventStore,
    /// Connected again at the next refresh when it failed.
    bus: Result<bus::Bus, String>,
    amqp_url: String,
}

/// How long one `/metrics` scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// How long connecting to RabbitMQ may take; a dashboard must not hang on it.
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

impl Sources {
    pub async fn open(store: EventStore, amqp_url: &str) -> Sources {
        let bus = connect_bus(amqp_url).await;
        Sources {
            store,
            bus,
            amqp_url: amqp_url.to_owned(),
        }
    }

    /// Reads one snapshot. A database failure is an error (nothing to show); a broker
    /// or a `/metrics` endpoint that does not answer shows as such in the snapshot.
    pub async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        use anyhow::Context;
        // The sampler behind /metrics, so top and the gauges agree. (It also sets the
        // gauges, which do nothing here: this process installs no recorder.)
        let sample = services::metrics::sample(&self.store)
            .await
            .context("cannot read the log and read models")?;
        let (taken_at, placed_last_minute) = placed_last_minute(&self.store)
            .await
            .context("cannot count recent orders")?;
        let log_ahead_of_server = log_ahead_of_server(&self.store)
            .await
            .context("cannot compare the log's transaction ids with the server's")?;
        let processes = services::registry::list(self.store.pool())
            .await
            .context("cannot read the workers table")?;
        if self.bus.is_err() {
            self.bus = connect_bus(&self.amqp_url).await;
        }
        let queues = match &self.bus {
            Ok(bus) => queue_depths(bus).await,
            Err(why) => Err(why.clone()),
        };
        let breakers = breakers(&processes).await;
        Ok(Snapshot {
            taken_at,
            orders: every_status(&sample.orders_by_status),
            placed_last_minute,
            log_ahead_of_server,
            head: sample.head,
            followers: sample.followers,
            open_timers: sample.open_timers,
            queues,
            processes,
            breakers,
        })
    }
}

async fn connect_bus(amqp_url: &str) -> Result<bus::Bus, String> {
    let options = bus::BusOptions {
        connect_timeout: BROKER_TIMEOUT,
        publish_timeout: BROKER_TIMEOUT,
        connection_name: "orderflow-top".to_owned(),
    };
    bus::Bus::connect_with(amqp_url, options)
        .await
        .map_err(|e| e.to_string())
}

/// Counts as read, completed with 0 for statuses that have no rows, in course order.
fn every_status(counted: &[(String, i64)]) -> Vec<(String, i64)> {
    let mut all: Vec<(String, i64)> = STATUSES
        .iter()
        .map(|status| {
            let n = counted
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            ((*status).to_owned(), n)
        })
        .collect();
    // A status this build does not know still shows (after the known ones).
    all.extend(
        counted
            .iter()
            .filter(|(s, _)| !STATUSES.contains(&s.as_str()))
            .cloned(),
    );
    all
}

/// The database's `now()` and the orders placed within the minute before it. Naming
/// every status lets PostgreSQL use `order_status_status_idx (status, placed_at)` as
/// eight short range scans, however many orders there are.
async fn placed_last_minute(store: &EventStore) -> Result<(DateTime<Utc>, i64), sqlx::Error> {
    let statuses: Vec<&str> = STATUSES.to_vec();
    sqlx::query_as(
        "SELECT now(), count(*) FROM order_status
          WHERE status = ANY($1) AND placed_at > now() - interval '1 minute'",
    )
    .bind(statuses)
    .fetch_one(store.pool())
    .await
}

/// Whether an event carries a transaction id at or above the next one the server will
/// assign, which never happens on the server that appended it. The max comes from the
/// end of `events_transaction_position_idx`; `pg_snapshot_xmax` assigns no id.
async fn log_ahead_of_server(store: &EventStore) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(max(transaction_id), 0)
                >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint
           FROM events",
    )
    .fetch_one(store.pool())
    .await
}

/// Passive declares: they report ready messages and consumers, and change nothing.
async fn queue_depths(bus: &bus::Bus) -> Result<Vec<QueueDepth>, String> {
    let mut depths = Vec::new();
    let mut channel = bus.open_channel().await.map_err(|e| e.to_string())?;
    for name in orderflow_queues() {
        let declared = channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) => depths.push(QueueDepth {
                name: name.to_owned(),
                messages: queue.message_count(),
                consumers: queue.consumer_count(),
            }),
            // A missing queue closes the channel: go on with a new one.
            Err(_) => channel = bus.open_channel().await.map_err(|e| e.to_string())?,
        }
    }
    let _ = channel.close(200, "counted".into()).await;
    Ok(depths)
}

/// Scrapes the circuit-breaker gauge of every live payment process that serves
/// `/metrics`, all at once.
async fn breakers(processes: &[Process]) -> Vec<Breaker> {
    let scrapes = processes
        .iter()
        .filter(|p| !p.gone && p.workers.iter().any(|w| w == "payment"))
        .filter_map(|p| Some((p, p.http_addr.as_deref()?)))
        .map(|(p, addr)| async move {
            let state = match reachable(addr, &p.host) {
                Some(target) => scrape::circuit_gauge(target, SCRAPE_TIMEOUT)
                    .await
                    .map_or(Circuit::Unknown, Circuit::from_gauge),
                None => Circuit::Unknown,
            };
            Breaker {
                process: format!("{}:{}", p.host, p.pid),
                state,
            }
        });
    futures::future::join_all(scrapes).await
}

/// The address to scrape: as registered, except that a process listening on every
/// interface (`0.0.0.0`) is reached on 127.0.0.1 when it runs here. `None` when the
/// address cannot be used from this machine.
fn reachable(http_addr: &str, host: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = http_addr.parse().ok()?;
    if !addr.ip().is_unspecified() {
        return Some(addr);
    }
    let here = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok();
    let local =
        std::env::var("HOSTNAME").ok().as_deref() == Some(host) || here.as_deref() == Some(host);
    local.then(|| SocketAddr::from(([127, 0, 0, 1], addr.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_listed_in_course_order_with_zeros() {
        let all = every_status(&[("completed".into(), 3), ("pending".into(), 1)]);
        assert_eq!(all.len(), STATUSES.len());
        assert_eq!(all[0], ("pending".to_owned(), 1));
        assert_eq!(all[5], ("completed".to_owned(), 3));
        assert_eq!(all[1], ("under_review".to_owned(), 0));
    }

    #[test]
    fn circuit_gauge_values_map_to_states() {
        assert_eq!(Circuit::from_gauge(0.0), Circuit::Closed);
        assert_eq!(Circuit::from_gauge(1.0), Circuit::Open);
        assert_eq!(Circuit::from_gauge(2.0), Circuit::HalfOpen);
        assert_eq!(Circuit::from_gauge(7.0), Circuit::Unknown);
    }

    #[test]
    fn a_registered_address_is_scraped_as_is_unless_unspecified() {
        assert_eq!(
            reachable("10.1.2.3:9464", "elsewhere"),
            Some(SocketAddr::from(([10, 1, 2, 3], 9464)))
        );
        assert_eq!(reachable("0.0.0.0:9464", "surely-not-this-host"), None);
        assert_eq!(reachable("not an address", "x"), None);
    }

    #[test]
    fn the_queues_include_dead_letters_and_retry_tiers() {
        let queues = orderflow_queues();
        for name in [
            "orderflow.commands.intake",
            "orderflow.dead-letter",
            "orderflow.payment",
            "orderflow.retry.30s",
        ] {
            assert!(queues.contains(&name), "{name} missing from {queues:?}");
        }
    }
}
