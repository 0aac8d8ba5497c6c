//! End to end: `orderflow run` (the release binary) as a child process on the bench's
//! database and vhost; a burst of orders for sustained throughput, then paced orders at
//! half that rate for publish → final-status latency, and at a quarter and three
//! quarters of it for the latency curve (plotted by `plot`); beside a raw RabbitMQ
//! baseline (publish with confirms to a quorum queue, consume with ack) in the same
//! vhost. Then the same burst with each worker in a process of its own, and with a
//! second process of the busiest one (scale-out).
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::infra::{BenchDb, BenchVhost};
use crate::measure::percentile;
use crate::plot::LoadPoint;
use crate::report::{fmt_value, Report, Row};
use crate::workers::{cpu_by_name, Processes, WORKERS};
use crate::Ctx;

const SKUS: [&str; 4] = ["BENCH-1", "BENCH-2", "BENCH-3", "BENCH-4"];
const STOCK: i64 = 1_000_000_000;
/// Publishes in flight before the publisher waits for the oldest confirm.
const CONFIRM_WINDOW: usize = 500;
const FINAL: &str = "('delivered', 'completed')";
const FAILED: &str = "('cancelled', 'rejected')";

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        ctx.orderflow_bin.exists(),
        "{} not found: build it with `cargo build --release -p orderflow` (scripts/bench does)",
        ctx.orderflow_bin.display()
    );
    let vhost = BenchVhost::create(&ctx.amqp_url, &ctx.run_id).await?;
    let db = BenchDb::new(&ctx.database_url, &ctx.run_id, "e2e")?;
    let result = measure(ctx, &db, &vhost, report).await;
    db.drop().await;
    vhost.delete().await;
    result
}

fn order_body(order_id: Uuid, i: u64, customer: &str) -> Vec<u8> {
    let shipping = if i % 2 == 0 {
        serde_json::json!({"method": "standard", "address": "1 Bench Street, 10115 Berlin"})
    } else {
        serde_json::Value::Null
    };
    serde_json::json!({
        "order_id": order_id,
        "customer_id": customer,
        "currency": "EUR",
        "items": [{"sku": SKUS[(i as usize) % SKUS.len()], "quantity": 1, "unit_price_cents": 1_999}],
        "payment_token": "tok_ok",
        "shipping": shipping,
    })
    .to_string()
    .into_bytes()
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> anyhow::Result<PublisherConfirm> {
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(Uuid::new_v4().to_string()))
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    Ok(channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(routing_key),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?)
}

async fn confirmed(confirm: PublisherConfirm) -> anyhow::Result<()> {
    match confirm.await? {
        Confirmation::Nack(_) => bail!("the broker nacked a publish"),
        _ => Ok(()),
    }
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")
}

async fn measure(
    ctx: &Ctx,
    db: &BenchDb,
    vhost: &BenchVhost,
    report: &mut Report,
) -> anyhow::Result<()> {
    let store = db.store(2).await?;
    drop(store);
    let pool = db.pool(4).await?;
    let sample_len = order_body(Uuid::new_v4(), 0, "bench-burst").len();

    eprintln!(
        "== e2e: raw RabbitMQ baseline, {} messages",
        ctx.rabbit_messages
    );
    let (raw_rate, _) = rabbit(&vhost.url, ctx.rabbit_messages, None, sample_len).await?;
    report.add(Row {
        key: "rabbit",
        section: "raw RabbitMQ",
        what: format!("publish (confirms, {CONFIRM_WINDOW} in flight) + consume (ack, prefetch 256), quorum queue, {}-byte bodies", sample_len),
        value: raw_rate,
        unit: "msgs/s",
        baseline: None,
        note: format!("{} messages", ctx.rabbit_messages),
    });

    eprintln!("== e2e: starting {}", ctx.orderflow_bin.display());
    let mut one = Processes::start(ctx, &db.url, &vhost.url, &[vec![]])?;
    let result = drive(ctx, &pool, vhost, &mut one, report, raw_rate, sample_len).await;
    one.stop(result.is_err()).await;
    let sustained = result?;
    scale_out(ctx, db, vhost, &pool, report, sustained).await
}

/// Workers of which one process at a time works while the others stand by
/// (ARCHITECTURE.md, "Workers and how they scale"): a second process of one adds no
/// throughput, so it is never the one scaled out.
const STANDBY_ONLY: [&str; 1] = ["relay"];

/// The same burst with each worker in a process of its own, then with a second
/// process of the busiest worker that scales out (issue 6: does scaling out the
/// busiest worker raise throughput on this machine?).
async fn scale_out(
    ctx: &Ctx,
    db: &BenchDb,
    vhost: &BenchVhost,
    pool: &PgPool,
    report: &mut Report,
    one_process: f64,
) -> anyhow::Result<()> {
    let split: Vec<Vec<&'static str>> = WORKERS.iter().map(|w| vec![*w]).collect();
    eprintln!("== e2e: each worker in its own process");
    let (apart, cpu, machine) = burst_with(ctx, db, vhost, pool, &split, "bench-split").await?;
    let per_worker = cpu
        .iter()
        .map(|(worker, used)| format!("{worker} {:.2}", used * 1000.0 / ctx.orders as f64))
        .collect::<Vec<_>>()
        .join(", ");
    report.add(Row {
        key: "e2e_orders_split",
        section: "end to end",
        what: format!(
            "sustained orders/s, burst of {} orders, each of the {} workers in its own process",
            ctx.orders,
            WORKERS.len()
        ),
        value: apart.sustained,
        unit: "orders/s",
        baseline: Some(("all workers in one process (above)".to_owned(), one_process)),
        note: format!(
            "{}; {}; CPU ms per order by process: {per_worker}",
            apart.summary(),
            machine.summary(apart.span, ctx.orders)
        ),
    });
    report.add(Row {
        key: "e2e_cpu_split",
        section: "end to end",
        what: "CPU per order during the burst, each worker in its own process: every process of orderflow, PostgreSQL and RabbitMQ".to_owned(),
        value: machine.per_order(ctx.orders),
        unit: "ms CPU",
        baseline: Some((
            "all workers in one process (the three rows above)".to_owned(),
            ["e2e_cpu_orderflow", "e2e_cpu_postgres", "e2e_cpu_rabbit"]
                .iter()
                .filter_map(|key| report.value(key))
                .sum(),
        )),
        note: format!(
            "{:.1} CPU-s over {:.1} s: the cores {:.0}% busy",
            machine.total(),
            apart.span,
            machine.busy(apart.span) * 100.0
        ),
    });
    let Some(busiest) = cpu
        .iter()
        .filter(|(worker, _)| !STANDBY_ONLY.contains(&worker.as_str()))
        .max_by(|a, b| a.1.total_cmp(b.1))
        .and_then(|(worker, _)| WORKERS.iter().find(|w| **w == worker.as_str()))
    else {
        anyhow::bail!("no CPU figures for the worker processes");
    };
    eprintln!("== e2e: two processes of {busiest}, the busiest that scales out");
    let mut scaled = split.clone();
    scaled.push(vec![*busiest]);
    let (doubled, _, machine) = burst_with(ctx, db, vhost, pool, &scaled, "bench-scaled").await?;
    report.add(Row {
        key: "e2e_orders_scaled",
        section: "end to end",
        what: format!(
            "sustained orders/s, burst of {} orders, each worker in its own process and two of {busiest} (the busiest above that scales out)",
            ctx.orders
        ),
        value: doubled.sustained,
        unit: "orders/s",
        baseline: Some((
            "each worker in its own process (above)".to_owned(),
            apart.sustained,
        )),
        note: format!(
            "{}; {}",
            doubled.summary(),
            machine.summary(doubled.span, ctx.orders)
        ),
    });
    Ok(())
}

/// CPU seconds spent between two readings of the same counters, by name.
fn spent(
    before: &std::collections::BTreeMap<String, f64>,
    after: std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    after
        .into_iter()
        .map(|(name, seconds)| {
            let used = seconds - before.get(&name).copied().unwrap_or(0.0);
            (name, used)
        })
        .collect()
}

/// CPU seconds the whole machine's share of a burst took: every orderflow process,
/// PostgreSQL and RabbitMQ, from the first publish until the burst's work was done.
struct MachineCpu {
    by_name: std::collections::BTreeMap<String, f64>,
}

impl MachineCpu {
    fn between(
        before: &std::collections::BTreeMap<String, f64>,
        after: std::collections::BTreeMap<String, f64>,
    ) -> MachineCpu {
        MachineCpu {
            by_name: spent(before, after),
        }
    }

    fn total(&self) -> f64 {
        self.by_name.values().sum()
    }

    /// The share of the cores' time over `span` seconds.
    fn busy(&self, span: f64) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.total() / (span.max(1e-3) * cores)
    }

    /// CPU milliseconds per order, all three together.
    fn per_order(&self, orders: u64) -> f64 {
        self.total() * 1000.0 / orders.max(1) as f64
    }

    /// How busy the cores were, and each server's CPU per order.
    fn summary(&self, span: f64, orders: u64) -> String {
        let per_order = |name: &str| {
            self.by_name.get(name).copied().unwrap_or(0.0) * 1000.0 / orders.max(1) as f64
        };
        format!(
            "the cores {:.0}% busy (CPU ms per order: every orderflow process {:.2}, PostgreSQL {:.2}, RabbitMQ {:.2})",
            self.busy(span) * 100.0,
            per_order("orderflow"),
            per_order("postgres"),
            per_order("beam.smp")
        )
    }
}

/// Starts `layout`, waits until it takes commands, runs a burst of `customer`'s orders
/// and stops it. Returns the burst, each process's CPU seconds during it, and the
/// machine's.
async fn burst_with(
    ctx: &Ctx,
    db: &BenchDb,
    vhost: &BenchVhost,
    pool: &PgPool,
    layout: &[Vec<&'static str>],
    customer: &str,
) -> anyhow::Result<(Burst, std::collections::BTreeMap<String, f64>, MachineCpu)> {
    let mut processes = Processes::start(ctx, &db.url, &vhost.url, layout)?;
    let outcome = async {
        let connection = connect(&vhost.url).await?;
        let channel = ready_channel(&connection, &mut processes).await?;
        let (before, machine_before) = (processes.cpu(), cpu_by_name());
        let burst = burst(pool, &channel, customer, ctx.orders).await?;
        let (after, machine) = (
            processes.cpu(),
            MachineCpu::between(&machine_before, cpu_by_name()),
        );
        let _ = connection.close(200, ShortString::from("done")).await;
        anyhow::Ok((burst, spent(&before, after), machine))
    }
    .await;
    processes.stop(outcome.is_err()).await;
    outcome
}

/// A channel with publisher confirms, once orderflow consumes its commands: it
/// declares every queue before it binds any, so a queue that merely exists may not be
/// bound yet, and a command published then reaches no queue (the bench waited 60 s
/// for stock that never came).
async fn ready_channel(
    connection: &Connection,
    processes: &mut Processes,
) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        processes.check_running()?;
        let probe = connection.create_channel().await?;
        let declared = probe
            .queue_declare(
                ShortString::from(bus_intake()),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = probe.close(200, "checked".into()).await;
        if matches!(declared, Ok(queue) if queue.consumer_count() > 0) {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            return Ok(channel);
        }
        if Instant::now() > deadline {
            bail!("orderflow did not consume its commands within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A burst: every order published at once, measured until the last is final and the
/// work that follows it (stock committed, notifications written) is done too.
struct Burst {
    /// Orders per second from the first publish until every order is final and its
    /// work done: a rate the system can keep up, not one that leaves a queue behind.
    sustained: f64,
    /// Orders per second from the first publish to the last final status.
    all_final: f64,
    done: u64,
    failed: u64,
    /// Seconds from the first publish until all the work was done.
    span: f64,
    /// Seconds from the first publish to the last final status.
    final_span: f64,
    published_in: Duration,
    first_quarter: f64,
    last_quarter: f64,
    /// Seconds from the first publish to the last notification written, and to the
    /// last event of the bench's stock streams: which of the two ended the burst.
    last_notification: f64,
    last_stock_event: f64,
}

impl Burst {
    fn summary(&self) -> String {
        format!(
            "{} final, {} cancelled/rejected; all work done in {:.1} s (every order final in {:.1} s: {} orders/s; the last notification written at {:.1} s, the last stock event at {:.1} s); published in {:.1} s; final statuses in the first quarter {} orders/s, last quarter {} orders/s",
            self.done,
            self.failed,
            self.span,
            self.final_span,
            fmt_value(self.all_final),
            self.last_notification,
            self.last_stock_event,
            self.published_in.as_secs_f64(),
            fmt_value(self.first_quarter),
            fmt_value(self.last_quarter)
        )
    }
}

async fn burst(pool: &PgPool, channel: &Channel, customer: &str, k: u64) -> anyhow::Result<Burst> {
    eprintln!("== e2e: burst of {k} orders ({customer})");
    let t0 = SystemTime::now();
    let started = Instant::now();
    let mut window = VecDeque::new();
    for i in 0..k {
        let body = order_body(Uuid::new_v4(), i, customer);
        window.push_back(publish(channel, "orderflow.commands", "order.place", &body).await?);
        if window.len() >= CONFIRM_WINDOW {
            if let Some(oldest) = window.pop_front() {
                confirmed(oldest).await?;
            }
        }
    }
    for confirm in window.drain(..) {
        confirmed(confirm).await?;
    }
    let published_in = started.elapsed();
    let burst_deadline = Duration::from_secs(120).max(Duration::from_secs_f64(k as f64 / 50.0));
    let (done, failed) = wait_orders(pool, customer, k, burst_deadline).await?;
    let finals: Vec<DateTime<Utc>> = sqlx::query_scalar(&format!(
        "SELECT updated_at FROM order_status WHERE customer_id = $1 AND status IN {FINAL} ORDER BY updated_at"
    ))
    .bind(customer)
    .fetch_all(pool)
    .await?;
    let t0_utc: DateTime<Utc> = t0.into();
    let last = finals.last().copied().unwrap_or(t0_utc);
    let span = (last - t0_utc)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-3);
    let drained = drained(pool, customer, burst_deadline).await?;
    let since_start = |at: DateTime<Utc>| (at - t0_utc).to_std().unwrap_or_default().as_secs_f64();
    let drain_span = since_start(drained.last()).max(span);
    let quarter = |from: f64, to: f64| {
        let a = t0_utc + chrono::Duration::milliseconds((span * from * 1000.0) as i64);
        let b = t0_utc + chrono::Duration::milliseconds((span * to * 1000.0) as i64);
        finals.iter().filter(|t| **t >= a && **t < b).count() as f64 / (span * (to - from))
    };
    Ok(Burst {
        sustained: finals.len() as f64 / drain_span,
        all_final: finals.len() as f64 / span,
        done,
        failed,
        span: drain_span,
        final_span: span,
        published_in,
        first_quarter: quarter(0.0, 0.25),
        last_quarter: quarter(0.75, 1.0),
        last_notification: since_start(drained.notification),
        last_stock_event: since_start(drained.stock),
    })
}

/// All workers in one process: the stock, a burst (throughput, CPU per order), then
/// paced orders (latency). Returns the burst's sustained rate.
#[allow(clippy::too_many_arguments)]
async fn drive(
    ctx: &Ctx,
    pool: &PgPool,
    vhost: &BenchVhost,
    processes: &mut Processes,
    report: &mut Report,
    raw_rate: f64,
    body_len: usize,
) -> anyhow::Result<f64> {
    let connection = connect(&vhost.url).await?;
    let channel = ready_channel(&connection, processes).await?;

    for sku in SKUS {
        let body = serde_json::json!({"sku": sku, "quantity": STOCK}).to_string();
        confirmed(publish(&channel, "orderflow.commands", "stock.set", body.as_bytes()).await?)
            .await?;
    }
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        "stock levels",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM stock_levels WHERE sku LIKE 'BENCH-%' AND on_hand >= $1",
            )
            .bind(STOCK - 1_000_000)
            .fetch_one(pool)
            .await?;
            Ok(n == SKUS.len() as i64)
        },
    )
    .await?;

    let k = ctx.orders;
    let cpu_before = cpu_by_name();
    let moved_before = processes.messages().await?;
    let burst = burst(pool, &channel, "bench-burst", k).await?;
    let cpu_used = spent(&cpu_before, cpu_by_name());
    let moved = processes.messages().await?.since(moved_before);
    let (sustained, span, done, failed) = (burst.sustained, burst.span, burst.done, burst.failed);
    report.add(Row {
        key: "e2e_orders",
        section: "end to end",
        what: format!(
            "sustained orders/s, burst of {k} orders (publish → all delivered/completed, stock committed, notifications written)"
        ),
        value: sustained,
        unit: "orders/s",
        baseline: Some((
            "raw RabbitMQ publish + consume (msgs/s, above)".to_owned(),
            raw_rate,
        )),
        note: burst.summary(),
    });
    let cpu: Vec<String> = cpu_used
        .iter()
        .map(|(comm, used)| {
            format!(
                "{comm} {used:.1} s ({:.2} ms per order)",
                used * 1000.0 / k as f64
            )
        })
        .collect();
    for (comm, key, who) in [
        (
            "orderflow",
            "e2e_cpu_orderflow",
            "orderflow run (all workers)",
        ),
        ("postgres", "e2e_cpu_postgres", "PostgreSQL (all backends)"),
        ("beam.smp", "e2e_cpu_rabbit", "RabbitMQ (beam.smp)"),
    ] {
        let used = cpu_used.get(comm).copied().unwrap_or(0.0);
        report.add(Row {
            key,
            section: "end to end",
            what: format!("CPU per order during the burst: {who}"),
            value: used * 1000.0 / k as f64,
            unit: "ms CPU",
            baseline: None,
            note: format!("{used:.1} CPU-s over {span:.1} s"),
        });
    }
    messages_per_order(report, moved, k, raw_rate, sustained);
    report.note(format!(
        "CPU time during the burst of {k} orders ({span:.1} s on {} cores = {:.0} core-seconds): {} (postgres includes other sessions' work on the same server)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        span * std::thread::available_parallelism().map_or(0, |n| n.get()) as f64,
        cpu.join(", ")
    ));
    for (floor, issue) in [(500.0, "issue 3"), (1_000.0, "issue 6")] {
        report.target(
            format!("end to end ≥ {} orders/s ({issue})", fmt_value(floor)),
            sustained >= floor && failed == 0,
            format!(
                "{} orders/s ({done} of {k} final, {failed} failed)",
                fmt_value(sustained)
            ),
        );
    }

    // Paced: half the sustained rate (or the rate asked for), latency publish → final
    // status.
    let rate = ctx.paced_rate.unwrap_or(sustained * 0.5).max(1.0);
    let load = if ctx.paced_rate.is_some() {
        "the rate asked for"
    } else {
        "half load"
    };
    let count = ((rate * ctx.paced_duration.as_secs_f64()) as u64).max(20);
    let Paced {
        published,
        latencies,
        done: paced_done,
        failed: paced_failed,
    } = paced(pool, &channel, "bench-paced", rate, count).await?;
    let after = recorded_after(pool, &published).await?;
    let timeline = timeline(&after);
    report.note(format!(
        "where the latency goes at {load}: after the publish, each event of a paced order was recorded at (p50 / p99; `recorded_at` is its transaction's start): {timeline}"
    ));

    eprintln!("== e2e: stopping orderflow; raw RabbitMQ at the same pace");
    let cost: (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT transaction_id) FROM events")
            .fetch_one(pool)
            .await?;
    let hottest: Option<i64> = sqlx::query_scalar(
        "SELECT max(stream_version) + 1 FROM events WHERE stream_name LIKE 'stock-%'",
    )
    .fetch_one(pool)
    .await?;
    // The latency curve: the same at a quarter and three quarters of the burst's
    // rate, shorter; the half-load run above is its middle point.
    let mut curve = Vec::new();
    if ctx.paced_rate.is_none() {
        for share in [0.25, 0.75] {
            let at = (sustained * share).max(1.0);
            let n = ((at * ctx.paced_duration.as_secs_f64() / 2.0) as u64).max(20);
            let customer = format!("bench-curve-{:.0}", share * 100.0);
            let point = paced(pool, &channel, &customer, at, n).await?;
            curve.push(LoadPoint::of(at, &point.latencies));
        }
    }
    curve.push(LoadPoint::of(rate, &latencies));
    curve.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    report.note(format!(
        "latency against offered load (publish → final status): {}. ![p50, p95 and p99 latency against offered load]({})",
        curve.iter().map(LoadPoint::describe).collect::<Vec<_>>().join("; "),
        crate::plot::FILE_NAME
    ));
    report.curve = curve;
    processes.stop(false).await;
    let (_, raw_latencies) = rabbit(&vhost.url, count, Some(rate), body_len).await?;

    for (p, key) in [(50.0, "e2e_p50"), (95.0, "e2e_p95"), (99.0, "e2e_p99")] {
        report.add(Row {
            key,
            section: "end to end",
            what: format!("publish → final status latency p{p:.0} at {rate:.0} orders/s ({load})"),
            value: percentile(&latencies, p) as f64 / 1000.0,
            unit: "ms",
            baseline: Some((
                format!("raw RabbitMQ publish → consume p{p:.0} at the same pace"),
                percentile(&raw_latencies, p) as f64 / 1000.0,
            )),
            note: if p >= 99.0 {
                format!(
                    "{count} orders over {:.0} s: {paced_done} final, {paced_failed} cancelled/rejected; max {:.0} ms; final = the commit time of the final event (`updated_at`)",
                    ctx.paced_duration.as_secs_f64(),
                    percentile(&latencies, 100.0) as f64 / 1000.0
                )
            } else {
                String::new()
            },
        });
    }
    // Issue 3 times an order to `confirmed` (a digital order's `OrderCompleted` is
    // appended with its `OrderConfirmed`); issue 6 to the final status (above).
    let confirmed = after.get("OrderConfirmed").cloned().unwrap_or_default();
    let confirmed_p99 = percentile(&confirmed, 99.0) as f64 / 1000.0;
    report.add(Row {
        key: "e2e_p99_confirmed",
        section: "end to end",
        what: format!(
            "publish → confirmed (a digital order: completed) latency p99 at {rate:.0} orders/s ({load})"
        ),
        value: confirmed_p99,
        unit: "ms",
        baseline: None,
        note: format!(
            "p50 {:.0} ms, p95 {:.0} ms; {} of {count} orders confirmed; confirmed = the start of the transaction that appended `OrderConfirmed`",
            percentile(&confirmed, 50.0) as f64 / 1000.0,
            percentile(&confirmed, 95.0) as f64 / 1000.0,
            confirmed.len()
        ),
    });
    let p99 = percentile(&latencies, 99.0) as f64 / 1000.0;
    let paced_ok = paced_failed == 0 && paced_done == count;
    report.target(
        "end to end p99 < 250 ms from publish to confirmed/completed at half load (issue 3)",
        confirmed_p99 < 250.0 && paced_ok && confirmed.len() as u64 == count,
        format!(
            "p99 {confirmed_p99:.0} ms at {rate:.0} orders/s ({} of {count} confirmed)",
            confirmed.len()
        ),
    );
    report.target(
        "end to end p99 ≤ 50 ms from publish to the final status at half load (issue 6)",
        p99 <= 50.0 && paced_ok,
        format!("p99 {p99:.0} ms at {rate:.0} orders/s ({paced_done} of {count} final)"),
    );
    let orders = (k + count) as f64;
    report.add(Row {
        key: "e2e_events_per_order",
        section: "end to end",
        what: "events per order (events ÷ orders)".to_owned(),
        value: cost.0 as f64 / orders,
        unit: "events",
        baseline: None,
        note: format!(
            "{} events for {} orders (+ {} stock.set)",
            cost.0,
            orders,
            SKUS.len()
        ),
    });
    report.add(Row {
        key: "e2e_tx_per_order",
        section: "end to end",
        what: "appending transactions per order (distinct transaction_id ÷ orders)".to_owned(),
        value: cost.1 as f64 / orders,
        unit: "transactions",
        baseline: None,
        note: format!(
            "the hottest stock stream reached {} events ({} SKUs shared by all orders)",
            hottest.unwrap_or(0),
            SKUS.len()
        ),
    });
    Ok(sustained)
}

/// The messages an order moves (deliveries and publishes during the burst, from the
/// process's `/metrics`), and the rate the raw RabbitMQ baseline allows at that count.
fn messages_per_order(
    report: &mut Report,
    moved: crate::workers::Messages,
    orders: u64,
    raw_rate: f64,
    sustained: f64,
) {
    let per_order = |n: f64| n / orders as f64;
    let delivered = per_order(moved.delivered);
    // The shop's publish, the router's forward, the relay's events.
    let published = 1.0 + per_order(moved.forwarded) + per_order(moved.relayed);
    report.add(Row {
        key: "e2e_msgs_per_order",
        section: "end to end",
        what: "messages per order during the burst: deliveries the workers took".to_owned(),
        value: delivered,
        unit: "deliveries",
        baseline: None,
        note: format!(
            "from the process's /metrics: handled or failed, every worker, less the messages handed over in process (commands {:.2}, events {:.2})",
            per_order(moved.handed_over),
            per_order(moved.events_handed_over)
        ),
    });
    report.add(Row {
        key: "e2e_publishes_per_order",
        section: "end to end",
        what: "messages per order during the burst: publishes with confirms".to_owned(),
        value: published,
        unit: "publishes",
        baseline: None,
        note: format!(
            "the shop's 1, the router's {:.2} forwards ({:.2} more handed over in process), the relay's {:.2} events (each to every service queue that takes it and has no consumer in the relay's process; {:.2} hand-offs to services besides)",
            per_order(moved.forwarded),
            per_order(moved.handed_over),
            per_order(moved.relayed),
            per_order(moved.events_handed_over)
        ),
    });
    if delivered > 0.0 {
        let ceiling = raw_rate / delivered;
        report.add(Row {
            key: "e2e_broker_ceiling",
            section: "end to end",
            what: "orders/s the raw RabbitMQ rate allows at that many deliveries per order (the broker alone, the whole machine to itself)".to_owned(),
            value: ceiling,
            unit: "orders/s",
            baseline: None,
            note: format!(
                "raw publish + consume {} msgs/s ÷ {delivered:.2}; the burst ran at {:.0}% of it with PostgreSQL and orderflow on the same cores",
                fmt_value(raw_rate),
                100.0 * sustained / ceiling
            ),
        });
    }
}

/// Paced orders: published one by one at `rate`, latency from each publish to the
/// commit of its order's final status.
struct Paced {
    published: HashMap<Uuid, SystemTime>,
    /// Microseconds, sorted.
    latencies: Vec<u64>,
    done: u64,
    failed: u64,
}

async fn paced(
    pool: &PgPool,
    channel: &Channel,
    customer: &str,
    rate: f64,
    count: u64,
) -> anyhow::Result<Paced> {
    eprintln!("== e2e: {count} paced orders at {rate:.0} orders/s ({customer})");
    let mut published: HashMap<Uuid, SystemTime> = HashMap::with_capacity(count as usize);
    let mut confirms = Vec::with_capacity(count as usize);
    let start = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let order_id = Uuid::new_v4();
        let body = order_body(order_id, i, customer);
        published.insert(order_id, SystemTime::now());
        confirms.push(publish(channel, "orderflow.commands", "order.place", &body).await?);
    }
    for confirm in confirms {
        confirmed(confirm).await?;
    }
    let (done, failed) = wait_orders(pool, customer, count, Duration::from_secs(120)).await?;
    let rows: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT order_id, updated_at FROM order_status WHERE customer_id = $1 AND status IN {FINAL}"
    ))
    .bind(customer)
    .fetch_all(pool)
    .await?;
    let mut latencies: Vec<u64> = rows
        .iter()
        .filter_map(|(id, at)| {
            let sent: DateTime<Utc> = (*published.get(id)?).into();
            Some((*at - sent).num_microseconds().unwrap_or(0).max(0) as u64)
        })
        .collect();
    latencies.sort_unstable();
    Ok(Paced {
        published,
        latencies,
        done,
        failed,
    })
}

/// For each event type of the paced orders' streams, how long after its order's
/// publish each was recorded (microseconds, sorted).
async fn recorded_after(
    pool: &PgPool,
    published: &HashMap<Uuid, SystemTime>,
) -> anyhow::Result<HashMap<String, Vec<u64>>> {
    let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT substring(stream_name from '[0-9a-f-]{36}$'), event_type, recorded_at FROM events \
          WHERE stream_name ~ '^(order|payment|shipment)-'",
    )
    .fetch_all(pool)
    .await?;
    let mut after: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, event_type, at) in rows {
        let Some(sent) = Uuid::parse_str(&id).ok().and_then(|id| published.get(&id)) else {
            continue;
        };
        let sent: DateTime<Utc> = (*sent).into();
        let micros = (at - sent).num_microseconds().unwrap_or(0).max(0) as u64;
        after.entry(event_type).or_default().push(micros);
    }
    for micros in after.values_mut() {
        micros.sort_unstable();
    }
    Ok(after)
}

/// Each event type's p50 / p99 after the publish, in the order of the p50s: which hop
/// takes the time.
fn timeline(after: &HashMap<String, Vec<u64>>) -> String {
    let mut steps: Vec<(u64, String)> = after
        .iter()
        .map(|(event_type, micros)| {
            let (p50, p99) = (percentile(micros, 50.0), percentile(micros, 99.0));
            (
                p50,
                format!(
                    "{event_type} {:.0} / {:.0} ms",
                    p50 as f64 / 1000.0,
                    p99 as f64 / 1000.0
                ),
            )
        })
        .collect();
    steps.sort();
    steps
        .into_iter()
        .map(|(_, step)| step)
        .collect::<Vec<_>>()
        .join(", ")
}

fn bus_intake() -> &'static str {
    "orderflow.commands.router"
}

async fn wait_until<F, Fut>(
    limit: Duration,
    period: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !check().await? {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(period).await;
    }
    Ok(())
}

/// Waits until the work that follows the final statuses of `customer`'s orders is
/// done: every reservation of the bench's SKUs committed (or released), and every
/// notification of the final orders written (placed, confirmed, shipped, delivered for
/// a delivered order; placed, confirmed, completed for a completed one). Until then
/// the system is still working through queues the burst left, and a rate measured at
/// the last final status alone would not be one it can keep up. Returns when the last
/// of that work was recorded, by the rows' own timestamps as the final statuses are
/// timed by theirs, so the poll's period is not part of the measurement. The poll is
/// sparse and asks about notifications only once the stock is settled: counting them
/// joins every notification with its order, and a poll every 50 ms took about 0.4 of a
/// core of PostgreSQL from the system it measured while the burst drained.
async fn drained(pool: &PgPool, customer: &str, limit: Duration) -> anyhow::Result<Drained> {
    wait_until(
        limit,
        DRAIN_POLL,
        "the burst's stock commits and notifications",
        || async { Ok(stock_settled(pool).await? && notifications_written(pool, customer).await?) },
    )
    .await?;
    let streams: Vec<String> = SKUS.iter().map(|sku| format!("stock-{sku}")).collect();
    let (notification, stock): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT (SELECT max(n.created_at) FROM notifications n JOIN order_status o USING (order_id) \
                  WHERE o.customer_id = $1 AND o.status IN ('delivered', 'completed')), \
                (SELECT max(recorded_at) FROM events WHERE stream_name = ANY($2))",
    )
    .bind(customer)
    .bind(&streams)
    .fetch_one(pool)
    .await?;
    Ok(Drained {
        notification: notification.context("no notification recorded")?,
        stock: stock.context("no stock event recorded")?,
    })
}

/// When the last of the work that follows the final statuses was recorded.
struct Drained {
    notification: DateTime<Utc>,
    stock: DateTime<Utc>,
}

impl Drained {
    fn last(&self) -> DateTime<Utc> {
        self.notification.max(self.stock)
    }
}

/// How often [`drained`] and [`wait_orders`] look: they decide when to read the
/// timestamps, not what the rate is.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// No reservation of the bench's SKUs is left uncommitted or unreleased.
async fn stock_settled(pool: &PgPool) -> anyhow::Result<bool> {
    let reserved: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(reserved), 0)::bigint FROM stock_levels WHERE sku LIKE 'BENCH-%'",
    )
    .fetch_one(pool)
    .await?;
    Ok(reserved == 0)
}

/// Every notification of `customer`'s final orders is written.
async fn notifications_written(pool: &PgPool, customer: &str) -> anyhow::Result<bool> {
    let (written, expected): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM notifications n JOIN order_status o USING (order_id) \
                  WHERE o.customer_id = $1 AND o.status IN ('delivered', 'completed')), \
                (SELECT coalesce(sum(CASE status WHEN 'delivered' THEN 4 ELSE 3 END), 0) \
                   FROM order_status WHERE customer_id = $1 AND status IN ('delivered', 'completed'))::bigint",
    )
    .bind(customer)
    .fetch_one(pool)
    .await?;
    Ok(written >= expected)
}

/// Waits until `expected` orders of `customer` are final or failed; (final, failed).
async fn wait_orders(
    pool: &PgPool,
    customer: &str,
    expected: u64,
    limit: Duration,
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + limit;
    loop {
        let (done, failed): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*) FILTER (WHERE status IN {FINAL}), count(*) FILTER (WHERE status IN {FAILED}) \
             FROM order_status WHERE customer_id = $1"
        ))
        .bind(customer)
        .fetch_one(pool)
        .await?;
        let (done, failed) = (done as u64, failed as u64);
        if done + failed >= expected {
            return Ok((done, failed));
        }
        if Instant::now() > deadline {
            eprintln!("  timed out: {done} final, {failed} failed of {expected}");
            return Ok((done, failed));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Publishes `count` messages with confirms to a fresh quorum queue while a consumer
/// acks them; as fast as possible, or at `rate` per second. Returns (messages per
/// second from the first publish to the last ack, sorted publish → consume latencies µs).
async fn rabbit(
    url: &str,
    count: u64,
    rate: Option<f64>,
    body_len: usize,
) -> anyhow::Result<(f64, Vec<u64>)> {
    let publisher = connect(url).await?;
    let subscriber = connect(url).await?;
    let queue = format!("bench.raw.{}", Uuid::new_v4().simple());
    let channel = publisher.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            ShortString::from(queue.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    let consuming = subscriber.create_channel().await?;
    consuming.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = consuming
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from("orderflow-bench"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let origin = Instant::now();
    let expected = count as usize;
    let consume = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(expected);
        while latencies.len() < expected {
            let delivery = consumer.next().await.context("the consumer ended")??;
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&delivery.data[..8]);
            let now = origin.elapsed().as_micros() as u64;
            latencies.push(now.saturating_sub(u64::from_le_bytes(sent)));
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok::<_, anyhow::Error>((latencies, origin.elapsed()))
    });
    let start = tokio::time::Instant::now();
    let mut window = VecDeque::new();
    for i in 0..count {
        if let Some(rate) = rate {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        }
        let mut body = vec![b' '; body_len.max(8)];
        body[..8].copy_from_slice(&(origin.elapsed().as_micros() as u64).to_le_bytes());
        window.push_back(
            channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue.as_str()),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
        );
        if window.len() >= CONFIRM_WINDOW {
            if let Some(oldest) = window.pop_front() {
                confirmed(oldest).await?;
            }
        }
    }
    for confirm in window.drain(..) {
        confirmed(confirm).await?;
    }
    let (mut latencies, elapsed) = tokio::time::timeout(Duration::from_secs(120), consume)
        .await
        .context("the raw consumer did not get every message within 120 s")???;
    latencies.sort_unstable();
    let _ = channel
        .queue_delete(
            ShortString::from(queue.as_str()),
            QueueDeleteOptions::default(),
        )
        .await;
    let _ = publisher.close(200, ShortString::from("done")).await;
    let _ = subscriber.close(200, ShortString::from("done")).await;
    Ok((count as f64 / elapsed.as_secs_f64(), latencies))
}
