//! The orderflow processes of an end-to-end run: `orderflow run` with every worker, or
//! several `orderflow run --only …` side by side, on the bench's database and vhost;
//! stopped with SIGINT; their CPU time read from /proc.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::Ctx;

/// The workers of `orderflow run --only`.
pub const WORKERS: [&str; 9] = services::runtime::ALL_WORKERS;

/// One process: the workers it runs (empty: all of them).
struct Process {
    workers: Vec<&'static str>,
    child: Child,
    /// Where it serves `/metrics` (`ORDERFLOW_HTTP_ADDR`).
    http: SocketAddr,
}

/// What the processes' `/metrics` count of the messages they moved, summed over them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Messages {
    /// Deliveries from the broker a handler finished (acked, forwarded, or failed and
    /// retried or dead-lettered): the handlers' count less the messages handed over in
    /// process (a command the router hands over is one delivery for two handlers; an
    /// event the relay hands over is none).
    pub delivered: f64,
    /// Commands the router published to a partition queue.
    pub forwarded: f64,
    /// Commands the router handed over to a partition of its own process.
    pub handed_over: f64,
    /// Events the relay handed over to the services of its own process (one per
    /// service queue that takes the event).
    pub events_handed_over: f64,
    /// Events the relay published (once each, however many queues it reached).
    pub relayed: f64,
}

impl Messages {
    fn of(metrics: &str) -> Messages {
        use testkit::http::{sample, sum};
        let handed_over_to = |queue: &str| {
            sample(
                metrics,
                &format!("{}{{queue=\"{queue}\"}}", bus::MESSAGES_HANDED_OVER),
            )
            .unwrap_or(0.0)
        };
        let commands_handed_over: f64 = bus::COMMAND_PARTITION_QUEUES
            .iter()
            .map(|queue| handed_over_to(queue))
            .sum();
        let all_handed_over = sum(metrics, bus::MESSAGES_HANDED_OVER);
        let routed = sample(
            metrics,
            &format!(
                "{}{{worker=\"router\"}}",
                services::metrics::MESSAGES_HANDLED
            ),
        )
        .unwrap_or(0.0);
        Messages {
            delivered: sum(metrics, services::metrics::MESSAGES_HANDLED)
                + sum(metrics, services::metrics::MESSAGES_FAILED)
                - all_handed_over,
            forwarded: routed - commands_handed_over,
            handed_over: commands_handed_over,
            events_handed_over: all_handed_over - commands_handed_over,
            relayed: sum(metrics, services::metrics::EVENTS_RELAYED),
        }
    }

    /// Each field of `self` and `other` combined by `f`.
    fn zip(self, other: Messages, f: impl Fn(f64, f64) -> f64) -> Messages {
        Messages {
            delivered: f(self.delivered, other.delivered),
            forwarded: f(self.forwarded, other.forwarded),
            handed_over: f(self.handed_over, other.handed_over),
            events_handed_over: f(self.events_handed_over, other.events_handed_over),
            relayed: f(self.relayed, other.relayed),
        }
    }

    /// What was moved between `before` and `self`.
    pub fn since(self, before: Messages) -> Messages {
        self.zip(before, |now, then| now - then)
    }
}

/// Processes started together, sharing one log file.
pub struct Processes {
    running: Vec<Process>,
    log_path: PathBuf,
}

impl Processes {
    /// Starts one process per entry of `layout`, each running the workers listed (an
    /// empty list: `orderflow run` with every worker).
    pub fn start(
        ctx: &Ctx,
        database_url: &str,
        amqp_url: &str,
        layout: &[Vec<&'static str>],
    ) -> anyhow::Result<Processes> {
        let log_path = std::env::temp_dir().join(format!("orderflow_bench_{}.log", ctx.run_id));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut running = Vec::with_capacity(layout.len());
        for workers in layout {
            let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut command = Command::new(&ctx.orderflow_bin);
            command.arg("run");
            for worker in workers {
                command.args(["--only", worker]);
            }
            let child = command
                .env("DATABASE_URL", database_url)
                .env("AMQP_URL", amqp_url)
                .env("ORDERFLOW_DELIVERY_DELAY", "0s")
                .env("ORDERFLOW_EXPRESS_DELIVERY_DELAY", "0s")
                .env("RUST_LOG", "warn")
                .env("ORDERFLOW_HTTP_ADDR", http.to_string())
                .stdout(Stdio::null())
                .stderr(log.try_clone()?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting orderflow run {}", label(workers)))?;
            running.push(Process {
                workers: workers.clone(),
                child,
                http,
            });
        }
        Ok(Processes { running, log_path })
    }

    /// An error naming the first process that has exited, if one has.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for process in &mut self.running {
            if let Some(status) = process.child.try_wait()? {
                anyhow::bail!(
                    "orderflow run {} exited early: {status}",
                    label(&process.workers)
                );
            }
        }
        Ok(())
    }

    /// The messages every process has moved so far, from their `/metrics`.
    pub async fn messages(&self) -> anyhow::Result<Messages> {
        let mut total = Messages::default();
        for process in &self.running {
            let metrics = testkit::http::scrape(process.http).await.with_context(|| {
                format!(
                    "reading the metrics of orderflow run {}",
                    label(&process.workers)
                )
            })?;
            total = total.zip(Messages::of(&metrics), |sum, more| sum + more);
        }
        Ok(total)
    }

    /// CPU seconds used so far by each process, by what it runs (two processes of the
    /// same workers are summed).
    pub fn cpu(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for process in &self.running {
            let used = process
                .child
                .id()
                .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
                .and_then(|stat| stat_cpu(&stat).map(|(_, seconds)| seconds))
                .unwrap_or(0.0);
            *out.entry(label(&process.workers)).or_default() += used;
        }
        out
    }

    /// Stops every process (SIGINT, then a kill after 15 s). Keeps the log when `failed`
    /// and says where it is; removes it otherwise.
    pub async fn stop(&mut self, failed: bool) {
        for process in &mut self.running {
            stop(&mut process.child).await;
        }
        if failed {
            eprintln!("orderflow's log: {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// How a process is named in the report: its workers, or `all` for every one.
pub fn label(workers: &[&str]) -> String {
    if workers.is_empty() {
        "all".to_owned()
    } else {
        workers.join("+")
    }
}

/// SIGINT, then a kill if the process has not exited within 15 s.
pub async fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// User + system CPU seconds of every process named `orderflow` (the children),
/// `postgres` and `beam.smp` (RabbitMQ), summed per name.
pub fn cpu_by_name() -> BTreeMap<String, f64> {
    const NAMES: [&str; 3] = ["orderflow", "postgres", "beam.smp"];
    let mut out: BTreeMap<String, f64> = NAMES.iter().map(|n| ((*n).to_owned(), 0.0)).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, seconds)) = stat_cpu(&stat) {
            if NAMES.contains(&comm) {
                *out.entry(comm.to_owned()).or_default() += seconds;
            }
        }
    }
    out
}

/// (comm, user + system CPU seconds) of a /proc/<pid>/stat line (clock ticks assumed
/// 100 Hz, the Linux default).
fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    // pid (comm) state ppid … utime(14) stime(15)
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    Some((comm, ticks / 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_command_and_cpu_seconds() {
        let stat = "4242 (orderflow) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(stat_cpu(stat), Some(("orderflow", 3.0)));
        assert_eq!(stat_cpu("garbage"), None);
    }

    #[test]
    fn a_process_is_named_by_its_workers() {
        assert_eq!(label(&[]), "all");
        assert_eq!(label(&["relay", "timers"]), "relay+timers");
    }
}
