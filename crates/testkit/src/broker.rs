//! Owned by the bus work: `TestVhost`.
//!
//! Each test gets a RabbitMQ vhost of its own, created with `rabbitmqctl` and deleted when
//! the guard drops, so tests run in parallel (and beside a running orderflow) without
//! seeing each other's queues.

use crate::url::with_path;
use anyhow::{bail, Context};

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A throw-away vhost. `url` is the base `AMQP_URL` pointed at it.
#[derive(Debug)]
pub struct TestVhost {
    pub name: String,
    pub url: String,
}

impl TestVhost {
    /// Creates `orderflow_test_<uuid>` and grants the `guest` user full permissions on it.
    /// Fails (never skips) when the broker or `rabbitmqctl` cannot be reached.
    pub async fn new() -> anyhow::Result<TestVhost> {
        let base = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
        let name = format!("orderflow_test_{}", uuid::Uuid::new_v4().simple());
        let url = with_path(&base, &name)?;
        rabbitmqctl(&["add_vhost", &name]).await?;
        let vhost = TestVhost { name, url };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])
        .await?;
        Ok(vhost)
    }

    /// Makes the broker close every client connection to this vhost (a broker-side
    /// network failure, as seen by the clients).
    pub async fn close_all_connections(&self) -> anyhow::Result<()> {
        rabbitmqctl(&[
            "close_all_connections",
            "--vhost",
            &self.name,
            "closed by a test",
        ])
        .await
        .map(drop)
    }

    /// `(name, type)` of every queue in this vhost, e.g. `("orderflow.order", "quorum")`.
    pub async fn queue_types(&self) -> anyhow::Result<Vec<(String, String)>> {
        let out = rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.name,
            "-q",
            "--no-table-headers",
            "name",
            "type",
        ])
        .await?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                Some((words.next()?.to_owned(), words.next()?.to_owned()))
            })
            .collect())
    }

    /// `(ready, unacked)` messages of `queue` in this vhost, as the broker counts them
    /// (`rabbitmqctl list_queues name messages_ready messages_unacknowledged`).
    /// Fails when the vhost has no such queue.
    pub async fn queue_counts(&self, queue: &str) -> anyhow::Result<(u64, u64)> {
        let out = rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.name,
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .await?;
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [name, ready, unacked] = words.as_slice() {
                if *name == queue {
                    let ready = ready
                        .parse()
                        .with_context(|| format!("messages_ready of {queue}: {ready:?}"))?;
                    let unacked = unacked.parse().with_context(|| {
                        format!("messages_unacknowledged of {queue}: {unacked:?}")
                    })?;
                    return Ok((ready, unacked));
                }
            }
        }
        bail!("no queue {queue} in vhost {}:\n{out}", self.name)
    }

    /// Number of client connections the broker currently has open on this vhost.
    pub async fn connection_count(&self) -> anyhow::Result<usize> {
        let out = rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "vhost"]).await?;
        Ok(out.lines().filter(|line| line.trim() == self.name).count())
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let (program, mut args) = match command() {
            Ok(command) => command,
            Err(err) => {
                eprintln!("TestVhost: cannot delete vhost {}: {err:#}", self.name);
                return;
            }
        };
        args.extend(["delete_vhost".to_owned(), self.name.clone()]);
        match std::process::Command::new(&program).args(&args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "TestVhost: `{program} delete_vhost {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => eprintln!("TestVhost: cannot run `{program}`: {err}"),
        }
    }
}

/// The rabbitmqctl command line, from `ORDERFLOW_RABBITMQCTL` (split on whitespace,
/// e.g. `docker compose exec -T rabbitmq rabbitmqctl`) or plain `rabbitmqctl`.
fn command() -> anyhow::Result<(String, Vec<String>)> {
    let line = std::env::var("ORDERFLOW_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut words = line.split_whitespace().map(str::to_owned);
    let Some(program) = words.next() else {
        bail!("ORDERFLOW_RABBITMQCTL is set but empty");
    };
    Ok((program, words.collect()))
}

/// Runs `rabbitmqctl` (or `ORDERFLOW_RABBITMQCTL`) with `args`; its standard output.
pub async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let (program, mut full) = command()?;
    full.extend(args.iter().map(|arg| (*arg).to_owned()));
    let out = tokio::process::Command::new(&program)
        .args(&full)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| {
            format!("cannot run `{program}` (set ORDERFLOW_RABBITMQCTL to override)")
        })?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            full.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_replaces_the_path_and_keeps_the_query() -> anyhow::Result<()> {
        assert_eq!(
            with_path("amqp://guest:guest@127.0.0.1:5672/%2f", "a b")?,
            "amqp://guest:guest@127.0.0.1:5672/a%20b"
        );
        assert_eq!(
            with_path("amqp://u:p@host?heartbeat=10", "v")?,
            "amqp://u:p@host/v?heartbeat=10"
        );
        Ok(())
    }
}
