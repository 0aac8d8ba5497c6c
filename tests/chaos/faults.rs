//! Faults that touch only this test's own resources: its vhost's connections, its
//! database's backends, its worker processes. The real broker restart is for
//! `scripts/chaos` only (`CHAOS_BROKER_RESTART=1`), never while others run tests.

use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::Connection;
use testkit::TestVhost;

/// The broker closes every client connection of the vhost (a network failure as the
/// clients see it). Other vhosts, other tests, are untouched.
pub async fn close_broker_connections(vhost: &TestVhost) -> anyhow::Result<()> {
    rabbitmqctl(&["close_all_connections", "--vhost", &vhost.name, "chaos"]).await
}

/// Terminates every backend of the test's own database (but the one asking). Returns
/// how many were terminated.
pub async fn terminate_db_backends(db_url: &str, db_name: &str) -> anyhow::Result<usize> {
    let mut admin = sqlx::PgConnection::connect(db_url)
        .await
        .context("connecting to the test database to kill its backends")?;
    let killed: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(db_name)
    .fetch_all(&mut admin)
    .await?;
    let _ = admin.close().await;
    Ok(killed.iter().filter(|(done,)| *done).count())
}

/// Restarts the RabbitMQ application (`stop_app`, a pause, `start_app`). The guard
/// starts it again whatever happens in between, and `scripts/chaos` has a trap too.
pub async fn restart_broker(down_for: Duration) -> anyhow::Result<()> {
    let guard = BrokerStarter;
    rabbitmqctl(&["stop_app"]).await?;
    tokio::time::sleep(down_for).await;
    drop(guard);
    rabbitmqctl(&["await_startup"]).await
}

/// Starts the broker application on drop (also on panic or an early return).
struct BrokerStarter;

impl Drop for BrokerStarter {
    fn drop(&mut self) {
        let (program, mut args) = command();
        args.push("start_app".to_owned());
        match std::process::Command::new(&program).args(&args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "chaos: `{program} start_app` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => eprintln!("chaos: cannot run `{program} start_app`: {err}"),
        }
    }
}

/// The rabbitmqctl command line, as the testkit reads it (`ORDERFLOW_RABBITMQCTL`).
fn command() -> (String, Vec<String>) {
    let line = std::env::var("ORDERFLOW_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = line.split_whitespace().map(str::to_owned);
    let program = words.next().unwrap_or_else(|| "rabbitmqctl".to_owned());
    (program, words.collect())
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let (program, mut full) = command();
    full.extend(args.iter().map(|a| (*a).to_owned()));
    let out = tokio::process::Command::new(&program)
        .args(&full)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run `{program}`"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            full.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
