//! The worker registry: every `orderflow run` process keeps a row in `workers`
//! (migration 0040) — who it is, which workers it runs, when it last said so — and
//! removes it when it stops cleanly. A process that dies without stopping leaves its row;
//! silent for more than [`GONE_AFTER_HEARTBEATS`] of its own heartbeat intervals, it is
//! shown as gone. Times are the database's clock, so hosts' clocks need not agree.
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A process silent for more than this many of its heartbeat intervals is gone.
pub const GONE_AFTER_HEARTBEATS: i32 = 3;

/// Rows of processes gone this long are deleted when another process starts.
const FORGET_AFTER: &str = "7 days";

/// What a process says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: Uuid,
    pub host: String,
    pub pid: u32,
    pub workers: Vec<String>,
    pub version: String,
    /// Where it serves `/metrics` and `/readyz`, if it does.
    pub http_addr: Option<String>,
    pub heartbeat_interval: Duration,
}

impl Registration {
    /// This process, running `workers`.
    pub fn this_process(
        workers: &[&str],
        heartbeat_interval: Duration,
        http_addr: Option<String>,
    ) -> Registration {
        Registration {
            id: Uuid::new_v4(),
            host: hostname(),
            pid: std::process::id(),
            workers: workers.iter().map(|w| (*w).to_owned()).collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            http_addr,
            heartbeat_interval,
        }
    }
}

/// The machine's name: `HOSTNAME`, else the kernel's, else `unknown`.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A row of `workers`, as `orderflow workers` shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Process {
    pub id: Uuid,
    pub host: String,
    pub pid: i32,
    pub workers: Vec<String>,
    pub version: String,
    pub http_addr: Option<String>,
    pub heartbeat_interval_ms: i64,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    /// Seconds since the last heartbeat, by the database's clock.
    pub silent_seconds: f64,
    /// Silent for more than three heartbeat intervals.
    pub gone: bool,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Inserts (or refreshes) the process's row.
pub async fn register(pool: &PgPool, me: &Registration) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "DELETE FROM workers WHERE last_heartbeat < now() - interval '{FORGET_AFTER}'"
    ))
    .execute(pool)
    .await?;
    upsert(pool, me).await
}

async fn upsert(pool: &PgPool, me: &Registration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO workers (id, host, pid, workers, version, http_addr, heartbeat_interval_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (id) DO UPDATE SET last_heartbeat = now()",
    )
    .bind(me.id)
    .bind(&me.host)
    .bind(i32::try_from(me.pid).unwrap_or(i32::MAX))
    .bind(&me.workers)
    .bind(&me.version)
    .bind(&me.http_addr)
    .bind(millis(me.heartbeat_interval))
    .execute(pool)
    .await?;
    Ok(())
}

/// Says "still here"; puts the row back if someone removed it.
pub async fn heartbeat(pool: &PgPool, me: &Registration) -> Result<(), sqlx::Error> {
    let updated = sqlx::query("UPDATE workers SET last_heartbeat = now() WHERE id = $1")
        .bind(me.id)
        .execute(pool)
        .await?;
    if updated.rows_affected() == 0 {
        upsert(pool, me).await?;
    }
    Ok(())
}

/// Removes the process's row (on a clean shutdown).
pub async fn deregister(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM workers WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Every registered process, live ones first, then by host and start.
pub async fn list(pool: &PgPool) -> Result<Vec<Process>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT id, host, pid, workers, version, http_addr, heartbeat_interval_ms, started_at,
                last_heartbeat,
                extract(epoch FROM now() - last_heartbeat)::float8 AS silent_seconds,
                {GONE} AS gone
           FROM workers
          ORDER BY {GONE}, host, started_at, id"
    ))
    .fetch_all(pool)
    .await
}

/// Processes that are not gone.
pub async fn live_count(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM workers WHERE NOT {GONE}"))
        .fetch_one(conn)
        .await
}

/// The SQL that says a row is gone.
const GONE: &str =
    "(now() - last_heartbeat > heartbeat_interval_ms * 3 * interval '1 millisecond')";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_means_three_silent_intervals() {
        assert!(GONE.contains(&GONE_AFTER_HEARTBEATS.to_string()));
    }

    #[test]
    fn a_registration_names_this_process() {
        let me = Registration::this_process(&["relay", "projector"], Duration::from_secs(5), None);
        assert_eq!(me.pid, std::process::id());
        assert_eq!(me.workers, ["relay", "projector"]);
        assert!(!me.host.is_empty());
        assert_eq!(me.version, env!("CARGO_PKG_VERSION"));
    }
}
