//! Flood: memory under a backlog. N cheap commands (`stock.set` over 100 SKUs, rising
//! quantities) are queued on `orderflow.commands` while no worker runs; then
//! `orderflow run --only commands` (the release binary) starts on the backlog and the
//! bench samples its resident set (VmRSS) every 200 ms while it drains, for a bounded
//! window. The same is done with a backlog of N/100 for comparison: if the prefetch
//! bounds what is in memory, the peak does not grow with the backlog.
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use sqlx::PgPool;
use uuid::Uuid;

use crate::infra::{BenchDb, BenchVhost};
use crate::report::{fmt_ratio, fmt_value, Report, Row};
use crate::workers::stop;
use crate::Ctx;

const COMMANDS_EXCHANGE: &str = "orderflow.commands";
/// Where commands arrive (the router's queue, ADR 0005); the partitions follow it.
const INTAKE_QUEUE: &str = "orderflow.commands.router";
const SKUS: u64 = 100;
/// Publishes in flight before the publisher waits for the oldest confirm.
const CONFIRM_WINDOW: usize = 1_000;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Sampling goes on at least this long (within the window) even when the backlog drained
/// sooner, so a small backlog's peak covers the worker's start-up and steady state too.
const MIN_SAMPLING: Duration = Duration::from_secs(3);
/// The peak with the full backlog may exceed the small backlog's by this factor and still
/// count as bounded (allocator noise, a busier runtime).
const BOUNDED_FACTOR: f64 = 1.5;

/// What one drain did.
#[derive(Debug, Clone)]
struct Drain {
    backlog: u64,
    publish: Duration,
    handled: u64,
    /// From the worker's start to the last command handled, or to the window's end.
    window: Duration,
    drained: bool,
    left_in_queue: u64,
    /// VmRSS samples in kB, (ms since the worker started, kB).
    samples: Vec<(u64, u64)>,
    /// VmHWM (the kernel's own peak) at the end of the window, kB.
    hwm_kb: Option<u64>,
}

impl Drain {
    fn peak_kb(&self) -> u64 {
        self.samples.iter().map(|(_, kb)| *kb).max().unwrap_or(0)
    }

    /// The first sample taken at least one second after the worker started.
    fn after_1s_kb(&self) -> Option<u64> {
        self.samples
            .iter()
            .find(|(ms, _)| *ms >= 1_000)
            .map(|(_, kb)| *kb)
    }

    fn rate(&self) -> f64 {
        self.handled as f64 / self.window.as_secs_f64().max(1e-3)
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        ctx.orderflow_bin.exists(),
        "{} not found: build it with `cargo build --release -p orderflow` (scripts/bench does)",
        ctx.orderflow_bin.display()
    );
    let vhost = BenchVhost::create(&ctx.amqp_url, &ctx.run_id).await?;
    let result = measure(ctx, &vhost, report).await;
    vhost.delete().await;
    result
}

async fn measure(ctx: &Ctx, vhost: &BenchVhost, report: &mut Report) -> anyhow::Result<()> {
    let n = ctx.flood;
    let small_n = (n / 100).max(10);
    eprintln!("== flood: small backlog of {small_n} commands (the comparison)");
    let small = drain(ctx, vhost, "flood_small", small_n).await?;
    eprintln!("== flood: backlog of {n} commands");
    let large = drain(ctx, vhost, "flood", n).await?;

    let peak = large.peak_kb();
    let small_peak = small.peak_kb();
    report.add(Row {
        key: "flood_backlog",
        section: "flood",
        what: "commands queued on orderflow.commands before the worker starts (stock.set, 100 SKUs)".to_owned(),
        value: large.backlog as f64,
        unit: "messages",
        baseline: None,
        note: format!(
            "published with confirms ({CONFIRM_WINDOW} in flight) in {:.1} s while no worker ran; the queue held all of them",
            large.publish.as_secs_f64()
        ),
    });
    report.add(Row {
        key: "flood_handled",
        section: "flood",
        what: format!(
            "commands handled by `orderflow run --only commands` in the window (at most {:.0} s)",
            ctx.flood_window.as_secs_f64()
        ),
        value: large.handled as f64,
        unit: "messages",
        baseline: None,
        note: format!(
            "{} in {:.1} s ({} commands/s from the worker's start); {}",
            if large.drained {
                "drained"
            } else {
                "not drained"
            },
            large.window.as_secs_f64(),
            fmt_value(large.rate()),
            if large.drained {
                "queue empty".to_owned()
            } else {
                format!("{} still queued", fmt_value(large.left_in_queue as f64))
            }
        ),
    });
    report.add(Row {
        key: "flood_peak_rss",
        section: "flood",
        what: format!(
            "peak RSS of the commands worker draining {} queued commands",
            fmt_value(large.backlog as f64)
        ),
        value: mib(peak),
        unit: "MiB",
        baseline: Some((
            format!(
                "peak RSS draining {} queued commands (N/100)",
                fmt_value(small.backlog as f64)
            ),
            mib(small_peak),
        )),
        note: format!(
            "VmRSS every {} ms from the worker's start, {} samples; kernel VmHWM {} MiB (small backlog: {} samples over at least {} s, VmHWM {} MiB, {} handled in {:.1} s)",
            SAMPLE_EVERY.as_millis(),
            large.samples.len(),
            large.hwm_kb.map_or_else(|| "n/a".to_owned(), |kb| format!("{:.1}", mib(kb))),
            small.samples.len(),
            MIN_SAMPLING.as_secs(),
            small.hwm_kb.map_or_else(|| "n/a".to_owned(), |kb| format!("{:.1}", mib(kb))),
            small.handled,
            small.window.as_secs_f64(),
        ),
    });
    let after_1s = large.after_1s_kb();
    report.add(Row {
        key: "flood_rss_1s",
        section: "flood",
        what: "RSS 1 s after the worker started on the full backlog".to_owned(),
        value: after_1s.map_or(f64::NAN, mib),
        unit: "MiB",
        baseline: None,
        note: match after_1s {
            Some(kb) if kb > 0 => format!(
                "peak ÷ this = {}; growth after the first second {:.1} MiB",
                fmt_ratio(peak as f64 / kb as f64),
                mib(peak.saturating_sub(kb))
            ),
            _ => "the window ended before one second".to_owned(),
        },
    });
    let bounded = small_peak > 0 && (peak as f64) <= BOUNDED_FACTOR * small_peak as f64;
    report.target(
        format!(
            "memory bounded under a flood of {} queued commands",
            fmt_value(large.backlog as f64)
        ),
        bounded,
        format!(
            "peak RSS {:.1} MiB with {} queued, {:.1} MiB with {} queued (pass: ≤ {BOUNDED_FACTOR}×)",
            mib(peak),
            fmt_value(large.backlog as f64),
            mib(small_peak),
            fmt_value(small.backlog as f64)
        ),
    );
    Ok(())
}

/// One backlog of `n` commands on a database of its own (`phase`) in `vhost`.
async fn drain(ctx: &Ctx, vhost: &BenchVhost, phase: &str, n: u64) -> anyhow::Result<Drain> {
    let db = BenchDb::new(&ctx.database_url, &ctx.run_id, phase)?;
    let log_path = std::env::temp_dir().join(format!("orderflow_bench_{}_{phase}.log", ctx.run_id));
    let result = drain_on(ctx, &db, vhost, n, &log_path).await;
    db.drop().await;
    if result.is_err() {
        eprintln!("orderflow's log: {}", log_path.display());
    } else {
        let _ = std::fs::remove_file(&log_path);
    }
    result
}

async fn drain_on(
    ctx: &Ctx,
    db: &BenchDb,
    vhost: &BenchVhost,
    n: u64,
    log_path: &PathBuf,
) -> anyhow::Result<Drain> {
    drop(db.store(2).await?);
    let pool = db.pool(2).await?;
    let connection = Connection::connect(&vhost.url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let result = drain_with(ctx, db, vhost, &connection, &pool, n, log_path).await;
    let _ = connection.close(200, ShortString::from("done")).await;
    pool.close().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn drain_with(
    ctx: &Ctx,
    db: &BenchDb,
    vhost: &BenchVhost,
    connection: &Connection,
    pool: &PgPool,
    n: u64,
    log_path: &PathBuf,
) -> anyhow::Result<Drain> {
    // The topology: a worker declares it when it starts; once it consumes the intake
    // queue is declared and bound. Then stop it, so the commands queue up.
    {
        let mut child = spawn_worker(ctx, db, vhost, log_path)?;
        let declared = wait_for_consumer(connection, &mut child).await;
        stop(&mut child).await;
        declared?;
    }
    // Start from an empty queue (a previous backlog may not have drained).
    let channel = connection.create_channel().await?;
    channel
        .queue_purge(
            ShortString::from(INTAKE_QUEUE),
            QueuePurgeOptions::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    publish_backlog(&channel, n).await?;
    let publish = started.elapsed();
    let _ = channel.close(200, ShortString::from("published")).await;
    eprintln!("  published {n} in {:.1} s", publish.as_secs_f64());

    // The queue should hold them all (confirmed = enqueued; allow the count a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let depth = queue_depth(connection).await?;
        if depth == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("{INTAKE_QUEUE} holds {depth} messages, expected {n}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Drain: the worker on the backlog, RSS sampled until drained or the window ends.
    let mut child = spawn_worker(ctx, db, vhost, log_path)?;
    let result = sample(ctx, &mut child, connection, pool, n).await;
    stop(&mut child).await;
    let (samples, hwm_kb, window, handled) = result?;
    let left_in_queue = queue_depth(connection).await?;
    let drained = handled >= n;
    eprintln!(
        "  handled {handled} of {n} in {:.1} s; peak RSS {:.1} MiB over {} samples",
        window.as_secs_f64(),
        mib(samples.iter().map(|(_, kb)| *kb).max().unwrap_or(0)),
        samples.len()
    );
    Ok(Drain {
        backlog: n,
        publish,
        handled,
        window,
        drained,
        left_in_queue,
        samples,
        hwm_kb,
    })
}

type Samples = (Vec<(u64, u64)>, Option<u64>, Duration, u64);

async fn sample(
    ctx: &Ctx,
    child: &mut tokio::process::Child,
    connection: &Connection,
    pool: &PgPool,
    n: u64,
) -> anyhow::Result<Samples> {
    let pid = child.id().context("the worker has no pid")?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut hwm_kb = None;
    let mut drained_at = None;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let handled = loop {
        tick.tick().await;
        if let Some(status) = child.try_wait()? {
            bail!("orderflow run --only commands exited during the drain: {status}");
        }
        let elapsed = started.elapsed();
        if let Some(kb) = proc_status_kb(pid, "VmRSS") {
            samples.push((elapsed.as_millis() as u64, kb));
        }
        hwm_kb = proc_status_kb(pid, "VmHWM").or(hwm_kb);
        let handled = handled_commands(pool).await?;
        if handled >= n && drained_at.is_none() {
            drained_at = Some(elapsed);
        }
        if elapsed >= ctx.flood_window || (handled >= n && elapsed >= MIN_SAMPLING) {
            break handled;
        }
        if handled >= n {
            continue;
        }
        // Every command yields one StockSet; a command the worker refused (dead-lettered
        // or failed) yields none, so also stop when nothing is left to deliver.
        if elapsed > Duration::from_secs(2) && queue_depth(connection).await? == 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = handled_commands(pool).await?;
            if after == handled {
                eprintln!("  the queue is empty with {handled} of {n} handled");
                break handled;
            }
        }
    };
    Ok((
        samples,
        hwm_kb,
        drained_at.unwrap_or_else(|| started.elapsed()),
        handled,
    ))
}

/// Commands the worker has handled: StockSet events committed (one per stock.set).
async fn handled_commands(pool: &PgPool) -> anyhow::Result<u64> {
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'StockSet'")
            .fetch_one(pool)
            .await?;
    Ok(count as u64)
}

/// Ready messages on the intake queue (a passive declare on a channel of its own: a
/// missing queue closes the channel).
async fn queue_depth(connection: &Connection) -> anyhow::Result<u64> {
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            ShortString::from(INTAKE_QUEUE),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("{INTAKE_QUEUE} is not declared"))?;
    let _ = channel.close(200, ShortString::from("probed")).await;
    Ok(u64::from(queue.message_count()))
}

/// Waits until the worker consumes the intake queue (its topology is then declared).
async fn wait_for_consumer(
    connection: &Connection,
    child: &mut tokio::process::Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("orderflow run --only commands exited early: {status}");
        }
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                ShortString::from(INTAKE_QUEUE),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Ok(queue) = declared {
            let _ = channel.close(200, ShortString::from("probed")).await;
            if queue.consumer_count() > 0 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("orderflow did not consume {INTAKE_QUEUE} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` stock.set commands over 100 SKUs, each SKU's quantity rising, pipelined with
/// confirms; mandatory, so an unroutable publish fails instead of vanishing.
async fn publish_backlog(channel: &Channel, n: u64) -> anyhow::Result<()> {
    let mut window = VecDeque::with_capacity(CONFIRM_WINDOW);
    for i in 0..n {
        let body = serde_json::json!({
            "sku": format!("FLOOD-{:03}", i % SKUS),
            "quantity": i / SKUS + 1,
        })
        .to_string();
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(Uuid::new_v4().to_string()))
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2);
        window.push_back(
            channel
                .basic_publish(
                    ShortString::from(COMMANDS_EXCHANGE),
                    ShortString::from("stock.set"),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    properties,
                )
                .await?,
        );
        if window.len() >= CONFIRM_WINDOW {
            if let Some(oldest) = window.pop_front() {
                confirmed(oldest.await?)?;
            }
        }
    }
    for confirm in window.drain(..) {
        confirmed(confirm.await?)?;
    }
    Ok(())
}

fn confirmed(confirmation: Confirmation) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("a command was unroutable (returned by the broker)"),
        Confirmation::Nack(_) => bail!("the broker nacked a publish"),
    }
}

fn spawn_worker(
    ctx: &Ctx,
    db: &BenchDb,
    vhost: &BenchVhost,
    log_path: &PathBuf,
) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    tokio::process::Command::new(&ctx.orderflow_bin)
        .args(["run", "--only", "commands"])
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &vhost.url)
        .env("ORDERFLOW_HTTP_ADDR", "off")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting orderflow run --only commands")
}

/// A field of /proc/<pid>/status in kB (`VmRSS`, `VmHWM`).
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}
