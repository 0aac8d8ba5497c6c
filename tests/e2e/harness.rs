//! The system under test, driven as an outside client would: the built `orderflow run`
//! process on a database and a vhost of its own, raw AMQP publishes, SQL reads.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use sqlx::PgPool;
use testkit::{TestDb, TestVhost};
use tokio::process::Child;
use uuid::Uuid;

/// How long a test waits for any one condition.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub const COMMANDS_EXCHANGE: &str = "orderflow.commands";
/// Where commands arrive: the router's queue (ADR 0005).
pub const ROUTER_QUEUE: &str = "orderflow.commands.router";
/// The intake before commands were partitioned; parked commands keep its name.
pub const INTAKE_QUEUE: &str = "orderflow.commands.intake";
pub const DEAD_LETTER_QUEUE: &str = "orderflow.dead-letter";
/// Where the router forwards each command (ADR 0005): internal names, not contract.
pub use bus::topology::COMMAND_PARTITION_QUEUES;

/// Settings every system gets unless the test overrides them: short carrier delays.
const DEFAULT_ENV: &[(&str, &str)] = &[
    ("ORDERFLOW_DELIVERY_DELAY", "200ms"),
    ("ORDERFLOW_EXPRESS_DELIVERY_DELAY", "100ms"),
];

pub const TERMINAL: [&str; 4] = ["delivered", "completed", "cancelled", "rejected"];

/// One running orderflow (`orderflow run`) on a fresh database and vhost.
/// Field order matters: the child is killed (in `Drop`) before the guards drop.
pub struct System {
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// `--only` workers of the process; all when empty.
    workers: Vec<String>,
    log_path: PathBuf,
    publisher: Channel,
    connection: Connection,
    pub vhost: TestVhost,
    pub db: TestDb,
}

/// A message taken from `orderflow.dead-letter`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub headers: FieldTable,
}

impl DeadLetter {
    /// A header's value as text (strings), or its debug form.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .inner()
            .get(&ShortString::from(name))
            .map(|value| match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            })
    }

    pub fn error(&self) -> Option<String> {
        self.header("x-orderflow-error")
    }
}

/// Where the systems under test write their logs: Cargo's scratch directory for
/// integration tests (`target/tmp`), so that a test run leaves nothing in the machine's
/// `/tmp` and `cargo clean` removes them. They are kept after a passing run too: a test
/// that fails by returning an error has already dropped its system, and its message
/// points at the log.
pub fn log_dir() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("orderflow-logs");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// `target/<profile>/orderflow`, next to this test binary's `deps` directory.
fn binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in target/<profile>/deps")?;
    let bin = profile_dir.join(format!("orderflow{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "the orderflow binary is missing at {}: build it first (`cargo build -p orderflow`, \
             or run `cargo test --workspace`, which builds it)",
            bin.display()
        );
    }
    Ok(bin)
}

impl System {
    /// Starts `orderflow run` with DATABASE_URL / AMQP_URL on a fresh database and vhost,
    /// plus `extra_env`, and waits until it consumes commands.
    pub async fn start(extra_env: &[(&str, &str)]) -> anyhow::Result<System> {
        System::start_only(extra_env, &[]).await
    }

    /// Like `start`, running only `workers` (all when empty).
    pub async fn start_only(
        extra_env: &[(&str, &str)],
        workers: &[&str],
    ) -> anyhow::Result<System> {
        let db = TestDb::new().await?;
        let vhost = TestVhost::new().await?;
        let log_path = log_dir()?.join(format!("{}.log", db.name));
        eprintln!("orderflow log: {}", log_path.display());
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), db.url.clone()),
            ("AMQP_URL".into(), vhost.url.clone()),
        ];
        env.extend(
            DEFAULT_ENV
                .iter()
                .chain(extra_env)
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let connection = Connection::connect(&vhost.url, ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ as a client")?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut system = System {
            child: None,
            env,
            workers: workers.iter().map(|w| (*w).to_owned()).collect(),
            log_path,
            publisher,
            connection,
            vhost,
            db,
        };
        system.start_worker().await?;
        Ok(system)
    }

    /// Spawns `orderflow run` (again, after `kill_worker`) and waits until it is ready.
    pub async fn start_worker(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("a worker process is already running");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        let only = self.workers.iter().flat_map(|w| ["--only", w.as_str()]);
        let child = tokio::process::Command::new(binary()?)
            .arg("run")
            .args(only)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start orderflow run")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Starts one more `orderflow run` process on this system's database and vhost,
    /// running `workers` (all when empty) with `extra_env` added; its output goes to
    /// `<log>.<label>`. The caller owns (and kills) it.
    pub async fn spawn_process(
        &self,
        label: &str,
        workers: &[&str],
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Child> {
        let path = self.log_path.with_extension(format!("{label}.log"));
        eprintln!("orderflow log ({label}): {}", path.display());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let only = workers.iter().flat_map(|w| ["--only", *w]);
        tokio::process::Command::new(binary()?)
            .arg("run")
            .args(only)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start another orderflow run")
    }

    /// Binds `queue` to `exchange` with `key`, as an older build's topology did.
    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
        let channel = self.connection.create_channel().await?;
        channel
            .queue_bind(
                ShortString::from(queue),
                ShortString::from(exchange),
                ShortString::from(key),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "bound".into()).await;
        Ok(())
    }

    /// The workers the next `start_worker` runs (all when empty).
    pub fn set_workers(&mut self, workers: &[&str]) {
        self.workers = workers.iter().map(|w| (*w).to_owned()).collect();
    }

    /// Sends SIGTERM to the worker process and waits up to `deadline` for it to exit.
    pub async fn terminate_worker(
        &mut self,
        deadline: std::time::Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("no worker process is running");
        };
        let pid = child.id().context("the worker process has no pid")?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(deadline, child.wait())
            .await
            .with_context(|| format!("orderflow run did not exit within {deadline:?} of SIGTERM"))?
            .context("waiting for orderflow run")
    }

    /// SIGKILLs the worker process and waits for it to be gone.
    pub async fn kill_worker(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("killing orderflow run")?;
        }
        Ok(())
    }

    /// Ready once the commands worker consumes from the intake queue (the topology,
    /// bindings included, is declared before any consumer starts).
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let connection = &self.connection;
        let result = testkit::wait_until("orderflow run to consume commands", DEADLINE, || async {
            // A passive declare of a missing queue closes the channel: one per try.
            let channel = connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    ShortString::from(ROUTER_QUEUE),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let _ = channel.close(200, "checked".into()).await;
            Ok(matches!(declared, Ok(queue) if queue.consumer_count() > 0).then_some(()))
        })
        .await;
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "orderflow run exited ({status}) at start; log: {}\n{}",
                    self.log_path.display(),
                    self.log_tail()
                );
            }
        }
        result.with_context(|| self.log_hint())
    }

    pub fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    pub fn log_hint(&self) -> String {
        format!("orderflow log: {}", self.log_path.display())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    // ------------------------------------------------------------------ publishing

    /// Publishes a JSON command exactly as an outside client would.
    pub async fn publish(
        &self,
        routing_key: &str,
        body: Value,
        message_id: Uuid,
    ) -> anyhow::Result<()> {
        self.publish_raw(routing_key, &serde_json::to_vec(&body)?, message_id)
            .await
    }

    /// Publishes any bytes as a command (for bad input), with publisher confirms.
    pub async fn publish_raw(
        &self,
        routing_key: &str,
        body: &[u8],
        message_id: Uuid,
    ) -> anyhow::Result<()> {
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(message_id.to_string()))
            .with_delivery_mode(2);
        let confirmation = self
            .publisher
            .basic_publish(
                ShortString::from(COMMANDS_EXCHANGE),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if !confirmation.is_ack() {
            bail!("the broker nacked the publish of {routing_key} {message_id}");
        }
        if confirmation.take_message().is_some() {
            bail!("{routing_key} {message_id} was unroutable (returned)");
        }
        Ok(())
    }

    /// Publishes with a fresh message id and returns it.
    pub async fn send(&self, routing_key: &str, body: Value) -> anyhow::Result<Uuid> {
        let id = Uuid::new_v4();
        self.publish(routing_key, body, id).await?;
        Ok(id)
    }

    /// `stock.set` and waits until the read model shows the level.
    pub async fn set_stock(&self, sku: &str, quantity: i64) -> anyhow::Result<()> {
        self.send("stock.set", json!({"sku": sku, "quantity": quantity}))
            .await?;
        testkit::wait_until(
            &format!("stock of {sku} set to {quantity}"),
            DEADLINE,
            || async {
                Ok(self
                    .stock(sku)
                    .await?
                    .filter(|(on_hand, _)| *on_hand == quantity))
            },
        )
        .await
        .with_context(|| self.log_hint())?;
        Ok(())
    }

    pub async fn place(&self, body: Value) -> anyhow::Result<Uuid> {
        self.send("order.place", body).await
    }

    /// Places `count` digital orders of `lines` paid with `token`; their ids in order.
    pub async fn place_orders(
        &self,
        count: usize,
        lines: &[(&str, i64, i64)],
        token: &str,
    ) -> anyhow::Result<Vec<Uuid>> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            let id = Uuid::new_v4();
            self.place(order(id, lines, token, None)).await?;
            ids.push(id);
        }
        Ok(ids)
    }

    // ------------------------------------------------------------------ reading

    /// `(status, cancel_reason)` from `order_status`.
    pub async fn status(&self, order_id: Uuid) -> anyhow::Result<Option<(String, Option<String>)>> {
        Ok(
            sqlx::query_as("SELECT status, cancel_reason FROM order_status WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Waits until the order shows `expected`; returns its cancel_reason.
    pub async fn wait_status(
        &self,
        order_id: Uuid,
        expected: &str,
        deadline: Duration,
    ) -> anyhow::Result<Option<String>> {
        let result = testkit::wait_until(
            &format!("order {order_id} to be {expected}"),
            deadline,
            || async {
                Ok(self
                    .status(order_id)
                    .await?
                    .filter(|(status, _)| status == expected)
                    .map(|(_, reason)| reason))
            },
        )
        .await;
        match result {
            Ok(reason) => Ok(reason),
            Err(error) => {
                let now = self.status(order_id).await.ok().flatten();
                Err(error.context(format!(
                    "order {order_id} is {now:?}; events: {:?}; queues (ready, \
                     unacknowledged, consumers):\n{}{}",
                    self.event_types(&format!("order-{order_id}"))
                        .await
                        .unwrap_or_default(),
                    self.queue_report().await,
                    self.log_hint()
                )))
            }
        }
    }

    /// `(on_hand, reserved)` from `stock_levels`.
    pub async fn stock(&self, sku: &str) -> anyhow::Result<Option<(i64, i64)>> {
        Ok(
            sqlx::query_as("SELECT on_hand, reserved FROM stock_levels WHERE sku = $1")
                .bind(sku)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Waits until `stock_levels` shows exactly `(on_hand, reserved)`.
    pub async fn wait_stock(&self, sku: &str, expected: (i64, i64)) -> anyhow::Result<()> {
        let result = testkit::wait_until(
            &format!("stock of {sku} to be {expected:?}"),
            DEADLINE,
            || async { Ok((self.stock(sku).await? == Some(expected)).then_some(())) },
        )
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(error) => {
                let now = self.stock(sku).await.ok().flatten();
                Err(error.context(format!("stock of {sku} is {now:?}; {}", self.log_hint())))
            }
        }
    }

    /// A stream's events as `(event_type, payload)`, oldest first.
    pub async fn events(&self, stream: &str) -> anyhow::Result<Vec<(String, Value)>> {
        Ok(sqlx::query_as(
            "SELECT event_type, payload FROM events WHERE stream_name = $1 ORDER BY stream_version",
        )
        .bind(stream)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn event_types(&self, stream: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .events(stream)
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }

    /// How many events of `event_type` the stream holds.
    pub async fn count(&self, stream: &str, event_type: &str) -> anyhow::Result<usize> {
        Ok(self
            .event_types(stream)
            .await?
            .iter()
            .filter(|t| *t == event_type)
            .count())
    }

    /// Waits until the stream holds at least `n` events of `event_type`.
    pub async fn wait_event(&self, stream: &str, event_type: &str, n: usize) -> anyhow::Result<()> {
        testkit::wait_until(
            &format!("{n} × {event_type} on {stream}"),
            DEADLINE,
            || async { Ok((self.count(stream, event_type).await? >= n).then_some(())) },
        )
        .await
        .with_context(|| self.log_hint())
    }

    /// Takes every message now in `orderflow.dead-letter`, waiting until there are `n`.
    pub async fn take_dead_letters(&self, n: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let channel = self.connection.create_channel().await?;
        let taken = std::sync::Mutex::new(Vec::new());
        testkit::wait_until(&format!("{n} dead letters"), DEADLINE, || async {
            while let Some(message) = channel
                .basic_get(
                    ShortString::from(DEAD_LETTER_QUEUE),
                    BasicGetOptions { no_ack: true },
                )
                .await?
            {
                let delivery = message.delivery;
                let properties = &delivery.properties;
                let letter = DeadLetter {
                    body: delivery.data.clone(),
                    message_id: properties.message_id().as_ref().map(|s| s.to_string()),
                    content_type: properties.content_type().as_ref().map(|s| s.to_string()),
                    headers: properties.headers().clone().unwrap_or_default(),
                };
                taken.lock().unwrap_or_else(|e| e.into_inner()).push(letter);
            }
            let count = taken.lock().unwrap_or_else(|e| e.into_inner()).len();
            Ok((count >= n).then_some(()))
        })
        .await
        .with_context(|| self.log_hint())?;
        Ok(taken.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// Messages in a queue, ready and unacknowledged, as the broker counts them.
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u64> {
        let depths = self.queue_depths().await?;
        depths
            .iter()
            .find(|(name, _)| name == queue)
            .map(|(_, count)| *count)
            .with_context(|| format!("no queue {queue} in {depths:?}"))
    }

    /// `(queue, messages)` of every queue of the vhost, as the broker counts them.
    pub async fn queue_depths(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.list_queues(&["name", "messages"])
            .await?
            .iter()
            .filter_map(|row| Some((row.first()?, row.get(1)?)))
            .map(|(name, count)| Ok((name.clone(), count.parse::<u64>()?)))
            .collect()
    }

    /// Every non-empty or consumer-less queue of the vhost, one line each with its
    /// ready and unacknowledged messages and its consumers: what a test prints when
    /// messages seem to go nowhere.
    pub async fn queue_report(&self) -> String {
        let columns = [
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ];
        match self.list_queues(&columns).await {
            Ok(rows) => rows
                .iter()
                .filter(|row| row.iter().skip(1).any(|n| n != "0"))
                .map(|row| format!("  {}\n", row.join(" ")))
                .collect::<String>(),
            Err(error) => format!("  (queues not listed: {error:#})\n"),
        }
    }

    /// `rabbitmqctl list_queues` of the vhost with the given columns, split in words.
    async fn list_queues(&self, columns: &[&str]) -> anyhow::Result<Vec<Vec<String>>> {
        let line = std::env::var("ORDERFLOW_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
        let mut words = line.split_whitespace();
        let program = words.next().context("ORDERFLOW_RABBITMQCTL is empty")?;
        let out = tokio::process::Command::new(program)
            .args(words)
            .args([
                "list_queues",
                "-p",
                &self.vhost.name,
                "-q",
                "--no-table-headers",
            ])
            .args(columns)
            .kill_on_drop(true)
            .output()
            .await
            .context("running rabbitmqctl list_queues")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl list_queues failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect())
    }

    /// Waits until every command published so far has been handled and acknowledged:
    /// the router's queue, the old intake and every command partition are empty.
    pub async fn wait_commands_handled(&self) -> anyhow::Result<()> {
        testkit::wait_until(
            "the intake and partition queues to drain",
            DEADLINE,
            || async {
                let depths = self.queue_depths().await?;
                let pending: u64 = depths
                    .iter()
                    .filter(|(name, _)| {
                        name == INTAKE_QUEUE || COMMAND_PARTITION_QUEUES.contains(&name.as_str())
                    })
                    .map(|(_, count)| count)
                    .sum();
                Ok((pending == 0).then_some(()))
            },
        )
        .await
    }

    /// Runs `orderflow <args>` against this system.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        tokio::process::Command::new(binary()?)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .kill_on_drop(true)
            .output()
            .await
            .context("running orderflow")
    }

    /// `orderflow audit` must pass (exit 0). The read models are eventually consistent
    /// and the audit compares them with the log, so a scenario that has just ended may
    /// need the projector to catch up: retried for a few seconds, the last report shown.
    pub async fn audit(&self) -> anyhow::Result<()> {
        let last = std::sync::Mutex::new(String::new());
        let passed = testkit::wait_until(
            "orderflow audit to pass",
            Duration::from_secs(10),
            || async {
                let out = self.cli(&["audit"]).await?;
                if out.status.success() {
                    return Ok(Some(()));
                }
                *last.lock().unwrap_or_else(|e| e.into_inner()) = format!(
                    "exit {}:\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(None)
            },
        )
        .await;
        passed.map_err(|error| {
            let report = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
            error.context(format!(
                "orderflow audit failed, {report}\n{}",
                self.log_hint()
            ))
        })
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "{}\n--- last lines ---\n{}",
                self.log_hint(),
                self.log_tail()
            );
        }
    }
}

// ---------------------------------------------------------------------- bodies

/// An `order.place` body: `lines` are `(sku, quantity, unit_price_cents)`;
/// `shipping` is `None` for a digital order or the method.
pub fn order(
    order_id: Uuid,
    lines: &[(&str, i64, i64)],
    token: &str,
    shipping: Option<&str>,
) -> Value {
    json!({
        "order_id": order_id,
        "customer_id": "customer-e2e",
        "currency": "EUR",
        "items": lines
            .iter()
            .map(|(sku, quantity, price)| json!({"sku": sku, "quantity": quantity, "unit_price_cents": price}))
            .collect::<Vec<_>>(),
        "payment_token": token,
        "shipping": shipping.map(|method| json!({"method": method, "address": "1 Test Street"})),
    })
}

pub fn order_stream(order_id: Uuid) -> String {
    format!("order-{order_id}")
}

pub fn payment_stream(order_id: Uuid) -> String {
    format!("payment-{order_id}")
}

pub fn shipment_stream(order_id: Uuid) -> String {
    format!("shipment-{order_id}")
}

pub fn stock_stream(sku: &str) -> String {
    format!("stock-{sku}")
}
