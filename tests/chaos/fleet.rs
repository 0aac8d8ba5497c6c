//! The workers as separate processes (`orderflow run --only <worker> …`), so that a
//! fault can kill some of them while the others go on. The layout says which workers
//! share a process: one per worker, or a few groups where database connections are
//! scarce (every process holds a pool of up to 10 PostgreSQL connections, plus one).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::Child;

/// Every worker `orderflow run --only` knows.
pub const WORKERS: [&str; 9] = [
    "commands",
    "order",
    "inventory",
    "payment",
    "shipping",
    "notification",
    "projector",
    "relay",
    "timers",
];

/// One process per worker.
pub fn separate() -> Vec<Vec<&'static str>> {
    WORKERS.iter().map(|w| vec![*w]).collect()
}

/// Three processes: intake and the saga's hot streams, the outside world, the followers
/// of the log.
pub fn grouped() -> Vec<Vec<&'static str>> {
    vec![
        vec!["commands", "order", "inventory"],
        vec!["payment", "shipping", "notification"],
        vec!["projector", "relay", "timers"],
    ]
}

/// `target/<profile>/orderflow`, next to this test binary's `deps` directory.
pub fn binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in target/<profile>/deps")?
        .join(format!("orderflow{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "the orderflow binary is missing at {}: build it first (`cargo build -p orderflow`)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The worker processes of one system, named after their workers (`payment`,
/// `commands+order+inventory`); all are killed on drop.
pub struct Fleet {
    binary: PathBuf,
    env: Vec<(String, String)>,
    log_dir: PathBuf,
    log_prefix: String,
    processes: BTreeMap<String, Vec<&'static str>>,
    running: BTreeMap<String, Child>,
    /// Processes that ended without being killed by the test: `(process, status)`.
    pub unexpected_exits: Vec<(String, ExitStatus)>,
}

impl Fleet {
    /// `layout` lists the workers of each process; `env` is given to every process;
    /// logs go to `<harness::log_dir>/<log_prefix>-<process>.log`.
    pub fn new(
        env: Vec<(String, String)>,
        log_prefix: &str,
        layout: Vec<Vec<&'static str>>,
    ) -> anyhow::Result<Fleet> {
        Ok(Fleet {
            binary: binary()?,
            env,
            log_dir: crate::harness::log_dir()?,
            log_prefix: log_prefix.to_owned(),
            processes: layout.into_iter().map(|w| (w.join("+"), w)).collect(),
            running: BTreeMap::new(),
            unexpected_exits: Vec::new(),
        })
    }

    /// The processes' names.
    pub fn names(&self) -> Vec<String> {
        self.processes.keys().cloned().collect()
    }

    pub fn log_path(&self, process: &str) -> PathBuf {
        self.log_dir
            .join(format!("{}-{process}.log", self.log_prefix))
    }

    /// Where the logs are, for failure messages.
    pub fn log_hint(&self) -> String {
        format!(
            "worker logs: {}",
            self.log_path("<process>").to_string_lossy()
        )
    }

    /// Starts every process that is not running.
    pub fn spawn_all(&mut self) -> anyhow::Result<()> {
        for name in self.names() {
            if !self.running.contains_key(&name) {
                self.spawn(&name, &[])?;
            }
        }
        Ok(())
    }

    /// Starts one process with the fleet's environment plus `extra_env`.
    pub fn spawn(&mut self, process: &str, extra_env: &[(&str, &str)]) -> anyhow::Result<()> {
        if self.running.contains_key(process) {
            bail!("{process} is already running");
        }
        let workers = self
            .processes
            .get(process)
            .with_context(|| format!("no process {process} in the layout"))?;
        let mut args = vec!["run"];
        for worker in workers {
            args.extend(["--only", worker]);
        }
        let path = self.log_path(process);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let child = tokio::process::Command::new(&self.binary)
            .args(&args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start orderflow {}", args.join(" ")))?;
        self.running.insert(process.to_owned(), child);
        Ok(())
    }

    /// SIGKILLs a process and waits until it is gone.
    pub async fn kill(&mut self, process: &str) -> anyhow::Result<()> {
        if let Some(mut child) = self.running.remove(process) {
            if let Some(status) = child.try_wait()? {
                // It had ended on its own before the supervisor noticed.
                eprintln!("chaos: {process} had exited on its own ({status})");
                self.unexpected_exits.push((process.to_owned(), status));
                return Ok(());
            }
            child
                .kill()
                .await
                .with_context(|| format!("killing {process}"))?;
        }
        Ok(())
    }

    /// Notes the processes that ended on their own (e.g. a start-up that met a fault)
    /// and starts them again, as a process supervisor would. Returns how many.
    pub fn revive(&mut self) -> anyhow::Result<usize> {
        let mut ended = Vec::new();
        for (process, child) in &mut self.running {
            if let Some(status) = child.try_wait()? {
                ended.push((process.clone(), status));
            }
        }
        for (process, status) in &ended {
            eprintln!("chaos: {process} exited on its own ({status}); restarting it");
            self.running.remove(process);
            self.unexpected_exits.push((process.clone(), *status));
            self.spawn(process, &[])?;
        }
        Ok(ended.len())
    }

    /// Waits until `process` ends on its own (within `deadline`) and returns its status.
    pub async fn wait_exit(
        &mut self,
        process: &str,
        deadline: Duration,
    ) -> anyhow::Result<ExitStatus> {
        let child = self
            .running
            .get_mut(process)
            .with_context(|| format!("{process} is not running"))?;
        let status = tokio::time::timeout(deadline, child.wait())
            .await
            .with_context(|| format!("{process} still running after {deadline:?}"))??;
        self.running.remove(process);
        Ok(status)
    }

    /// The last lines of a process's log.
    pub fn log_tail(&self, process: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(process)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in self.running.values_mut() {
            let _ = child.start_kill();
        }
    }
}
