//! The bench's own database(s) and vhost, created for the run and dropped after, and
//! what we can learn about the machine and the process (RSS, load).
use std::str::FromStr;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use testkit::{rabbitmqctl, with_path};

/// The user name in `scheme://user:pw@host/…`, if any.
fn url_user(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    Some(userinfo.split(':').next()?.to_owned())
}

/// A database of the bench's own, `orderflow_bench_<run>_<phase>`, migrated by the event
/// store on first connect. Drop it with `drop`.
#[derive(Debug, Clone)]
pub struct BenchDb {
    pub name: String,
    pub url: String,
}

impl BenchDb {
    pub fn new(base_url: &str, run_id: &str, phase: &str) -> anyhow::Result<BenchDb> {
        let name = format!("orderflow_bench_{run_id}_{phase}");
        let url = with_path(base_url, &name)?;
        Ok(BenchDb { name, url })
    }

    /// The event store on this database (created and migrated if needed).
    pub async fn store(&self, max_connections: u32) -> anyhow::Result<eventstore::EventStore> {
        eventstore::connect_with(&self.url, max_connections)
            .await
            .with_context(|| format!("creating/opening database {}", self.name))
    }

    /// A plain pool on this database (for the raw baselines and polling).
    pub async fn pool(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        let options = PgConnectOptions::from_str(&self.url)?;
        Ok(PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await?)
    }

    pub async fn drop(&self) {
        if let Err(error) = eventstore::drop_database(&self.url).await {
            eprintln!("warning: could not drop database {}: {error}", self.name);
        }
    }
}

/// The table the raw baselines use: the columns, defaults and indexes of `events`
/// (migrations/0001_events.sql), but none of its append-only triggers.
pub const RAW_TABLE_DDL: &str = "\
CREATE TABLE IF NOT EXISTS raw_events (
    global_position bigserial   PRIMARY KEY,
    transaction_id  bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    stream_name     text        NOT NULL,
    stream_version  bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  int         NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT raw_events_stream_version_key UNIQUE (stream_name, stream_version),
    CONSTRAINT raw_events_event_id_key UNIQUE (event_id),
    CONSTRAINT raw_events_stream_version_not_negative CHECK (stream_version >= 0)
);
CREATE INDEX IF NOT EXISTS raw_events_transaction_position_idx
    ON raw_events (transaction_id, global_position);";

pub async fn create_raw_table(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(RAW_TABLE_DDL).execute(pool).await?;
    Ok(())
}

/// A RabbitMQ vhost of the bench's own, `orderflow_bench_<run>`, made with rabbitmqctl.
#[derive(Debug, Clone)]
pub struct BenchVhost {
    pub name: String,
    pub url: String,
}

impl BenchVhost {
    pub async fn create(base_url: &str, run_id: &str) -> anyhow::Result<BenchVhost> {
        let name = format!("orderflow_bench_{run_id}");
        let url = with_path(base_url, &name)?;
        let user = url_user(base_url).unwrap_or_else(|| "guest".to_owned());
        rabbitmqctl(&["add_vhost", &name]).await?;
        let vhost = BenchVhost { name, url };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &user,
            ".*",
            ".*",
            ".*",
        ])
        .await?;
        Ok(vhost)
    }

    pub async fn delete(&self) {
        if let Err(error) = rabbitmqctl(&["delete_vhost", &self.name]).await {
            eprintln!("warning: could not delete vhost {}: {error:#}", self.name);
        }
    }
}

/// A field of /proc/self/status in kB (`VmHWM`, `VmRSS`).
pub fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

/// Resets the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0), so the next reading
/// of VmHWM is the peak of what runs in between. False if the kernel refused.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// One line about the machine: cores, memory, CPU model.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cores} cores (nproc), {mem_gib:.1} GiB memory, {cpu}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_path_replaces_the_database_or_vhost() -> anyhow::Result<()> {
        assert_eq!(
            with_path("postgres://postgres@127.0.0.1:5432/orderflow", "b_1")?,
            "postgres://postgres@127.0.0.1:5432/b_1"
        );
        assert_eq!(
            with_path("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=5", "v")?,
            "amqp://guest:guest@127.0.0.1:5672/v?heartbeat=5"
        );
        assert_eq!(
            url_user("amqp://guest:guest@h/%2f").as_deref(),
            Some("guest")
        );
        Ok(())
    }
}
