//! The chaos run: hundreds of orders (a mix of tokens, shipping methods, cancellations
//! and scarce SKUs) while workers are SIGKILLed and restarted, the vhost's broker
//! connections are closed and the database's backends terminated at random moments.
//! Then quiescence, `orderflow audit`, and the zeros: lost, double charges, oversold.
//!
//! The test suite runs the short form; `scripts/chaos` runs the long one through the
//! same test with `CHAOS_*` variables (see [`Config::from_env`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::faults;
use crate::fleet::{grouped, separate, Fleet};
use crate::harness::{order, System, DEAD_LETTER_QUEUE, TERMINAL};
use crate::publisher::Publisher;
use crate::{worker_env, SERIAL};

/// Short timers, so that every order can end within the run.
const TIMERS: [(&str, &str); 3] = [
    ("ORDERFLOW_DELIVERY_DELAY", "100ms"),
    ("ORDERFLOW_EXPRESS_DELIVERY_DELAY", "50ms"),
    ("ORDERFLOW_PAYMENT_TIMEOUT", "2s"),
];

/// SKUs with plenty of stock, and the scarce ones some orders will not get.
const PLENTIFUL: [&str; 3] = ["CHAOS-STD", "CHAOS-EXP", "CHAOS-DIG"];
const SCARCE: [&str; 2] = ["CHAOS-RARE-A", "CHAOS-RARE-B"];
const PLENTY: i64 = 1_000_000;

/// The statuses whose order keeps its money and its stock.
const KEPT: [&str; 4] = ["confirmed", "shipped", "delivered", "completed"];

/// How a run is sized. The defaults are the test suite's short form.
#[derive(Debug, Clone)]
pub struct Config {
    pub orders: usize,
    /// Orders published per second.
    pub rate: f64,
    pub worker_kills: usize,
    pub connection_closes: usize,
    pub db_kills: usize,
    /// Real `rabbitmqctl stop_app`/`start_app`: only from `scripts/chaos`.
    pub broker_restarts: usize,
    pub quiescence_deadline: Duration,
    pub seed: u64,
    /// Fail also on the known product bugs (see [`known_bug`]).
    pub strict: bool,
    /// `separate`, `grouped`, or `None`: separate when the PostgreSQL server has room
    /// for nine pools beside what it already serves, grouped otherwise.
    pub layout: Option<String>,
}

fn env_number<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{name}={text:?} is not a number")),
        Err(_) => Ok(None),
    }
}

impl Config {
    /// `CHAOS_ORDERS` (300), `CHAOS_RATE` (orders/s, 30), `CHAOS_WORKER_KILLS`,
    /// `CHAOS_CONNECTION_CLOSES`, `CHAOS_DB_KILLS` (scaled with the orders: at least 6,
    /// 4, 4), `CHAOS_BROKER_RESTARTS` (0), `CHAOS_QUIESCENCE_SECS` (120), `CHAOS_SEED`,
    /// `CHAOS_LAYOUT` (`separate`, `grouped` or `auto`), `CHAOS_STRICT` (default `1`:
    /// the two money bugs this test once found, now fixed, fail the run like any other
    /// finding; `0` only reports them).
    pub fn from_env() -> anyhow::Result<Config> {
        let orders = env_number("CHAOS_ORDERS")?.unwrap_or(300);
        Ok(Config {
            orders,
            rate: env_number("CHAOS_RATE")?.unwrap_or(30.0),
            worker_kills: env_number("CHAOS_WORKER_KILLS")?.unwrap_or((orders / 50).max(6)),
            connection_closes: env_number("CHAOS_CONNECTION_CLOSES")?
                .unwrap_or((orders / 75).max(4)),
            db_kills: env_number("CHAOS_DB_KILLS")?.unwrap_or((orders / 75).max(4)),
            broker_restarts: env_number("CHAOS_BROKER_RESTARTS")?.unwrap_or(0),
            quiescence_deadline: Duration::from_secs(
                env_number("CHAOS_QUIESCENCE_SECS")?.unwrap_or(120),
            ),
            seed: env_number("CHAOS_SEED")?.unwrap_or_else(|| rand::rng().random()),
            strict: std::env::var("CHAOS_STRICT").map_or(true, |v| v != "0"),
            layout: std::env::var("CHAOS_LAYOUT").ok().filter(|l| l != "auto"),
        })
    }
}

/// What kind of order, and what should become of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Standard,
    Express,
    Digital,
    Declined,
    Flaky,
    TimedOut,
    Scarce,
}

struct Planned {
    id: Uuid,
    kind: Kind,
    lines: Vec<(&'static str, i64, i64)>,
    body: Value,
    /// Publish an `order.cancel` this many orders later.
    cancel_after: Option<usize>,
}

fn plan(config: &Config, rng: &mut StdRng) -> Vec<Planned> {
    let mut orders = Vec::with_capacity(config.orders);
    for _ in 0..config.orders {
        let roll = rng.random_range(0..100);
        let kind = match roll {
            0..=29 => Kind::Standard,
            30..=41 => Kind::Express,
            42..=56 => Kind::Digital,
            57..=66 => Kind::Declined,
            67..=76 => Kind::Flaky,
            77..=83 => Kind::TimedOut,
            _ => Kind::Scarce,
        };
        let (token, shipping) = match kind {
            Kind::Standard | Kind::Scarce => ("tok_ok", Some("standard")),
            Kind::Express => ("tok_ok", Some("express")),
            Kind::Digital => ("tok_ok", None),
            Kind::Declined => ("tok_decline", Some("standard")),
            Kind::Flaky => ("tok_flaky", Some("express")),
            Kind::TimedOut => ("tok_timeout", Some("standard")),
        };
        let sku = match kind {
            Kind::Express | Kind::Flaky => PLENTIFUL[1],
            Kind::Digital => PLENTIFUL[2],
            _ => PLENTIFUL[0],
        };
        let mut lines = vec![(sku, rng.random_range(1..=3), rng.random_range(500..5_000))];
        if kind == Kind::Scarce {
            let rare = *SCARCE.choose(rng).unwrap_or(&SCARCE[0]);
            lines.push((rare, rng.random_range(1..=2), rng.random_range(500..5_000)));
        }
        let id = Uuid::new_v4();
        // Some customers cancel: soon (often before confirmation) or later.
        let cancel_after = rng.random_bool(0.1).then(|| rng.random_range(0..=20usize));
        let mut body = order(id, &lines, token, shipping);
        body["customer_id"] = json!(format!("chaos-{}", rng.random_range(0..50)));
        orders.push(Planned {
            id,
            kind,
            lines,
            body,
            cancel_after,
        });
    }
    orders
}

/// Every worker process holds up to 10 pooled PostgreSQL connections and one listener;
/// nine of them, with a margin for the test and for the others using the server.
const SEPARATE_NEEDS_CONNECTIONS: i64 = 9 * 11 + 30;

/// The processes to run: as configured, or as the database server has room for.
async fn layout(system: &System, config: &Config) -> anyhow::Result<Vec<Vec<&'static str>>> {
    let choice = match config.layout.as_deref() {
        Some(choice) => choice.to_owned(),
        None => {
            let (max, used): (i64, i64) = sqlx::query_as(
                "SELECT current_setting('max_connections')::bigint,
                        (SELECT count(*) FROM pg_stat_activity)",
            )
            .fetch_one(system.pool())
            .await?;
            let room = max - used;
            let choice = if room >= SEPARATE_NEEDS_CONNECTIONS {
                "separate"
            } else {
                "grouped"
            };
            eprintln!(
                "chaos: PostgreSQL has room for {room} more connections (max_connections \
                 {max}): {choice} worker processes"
            );
            choice.to_owned()
        }
    };
    match choice.as_str() {
        "separate" => Ok(separate()),
        "grouped" => Ok(grouped()),
        other => bail!("CHAOS_LAYOUT={other:?}: expected separate, grouped or auto"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    WorkerKill,
    ConnectionClose,
    DbKill,
    BrokerRestart,
}

#[derive(Debug, Default)]
struct Injected {
    per_kind: BTreeMap<Fault, usize>,
    killed_processes: BTreeMap<String, usize>,
    db_backends_terminated: usize,
    failures: Vec<String>,
}

/// Publishes the orders at the configured pace, and the cancellations when due.
async fn publish_all(
    publisher: &mut Publisher,
    orders: &[Planned],
    rate: f64,
) -> anyhow::Result<(usize, Duration, Instant)> {
    let started = Instant::now();
    let mut due: BTreeMap<usize, Vec<Uuid>> = BTreeMap::new();
    let mut cancels = 0;
    for (i, planned) in orders.iter().enumerate() {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        publisher
            .publish("order.place", &planned.body, Uuid::new_v4())
            .await?;
        if let Some(after) = planned.cancel_after {
            due.entry(i + after).or_default().push(planned.id);
        }
        let now_due: Vec<usize> = due.range(..=i).map(|(k, _)| *k).collect();
        for k in now_due {
            for id in due.remove(&k).unwrap_or_default() {
                let body = json!({"order_id": id, "reason": "chaos: changed my mind"});
                publisher
                    .publish("order.cancel", &body, Uuid::new_v4())
                    .await?;
                cancels += 1;
            }
        }
    }
    for id in due.into_values().flatten() {
        let body = json!({"order_id": id, "reason": "chaos: changed my mind"});
        publisher
            .publish("order.cancel", &body, Uuid::new_v4())
            .await?;
        cancels += 1;
    }
    Ok((cancels, started.elapsed(), Instant::now()))
}

/// Injects the faults at random moments of `window`, restarting whatever dies.
async fn inject_faults(
    fleet: &mut Fleet,
    system: &System,
    config: &Config,
    window: Duration,
    rng: &mut StdRng,
) -> anyhow::Result<Injected> {
    let mut schedule: Vec<(Duration, Fault)> = Vec::new();
    for (kind, n) in [
        (Fault::WorkerKill, config.worker_kills),
        (Fault::ConnectionClose, config.connection_closes),
        (Fault::DbKill, config.db_kills),
        (Fault::BrokerRestart, config.broker_restarts),
    ] {
        for _ in 0..n {
            schedule.push((window.mul_f64(rng.random_range(0.05..0.95)), kind));
        }
    }
    schedule.sort();
    let mut injected = Injected::default();
    let started = Instant::now();
    let processes = fleet.names();
    for (at, fault) in schedule {
        // Supervise until the fault is due.
        while started.elapsed() < at {
            fleet.revive()?;
            let left = at.saturating_sub(started.elapsed());
            tokio::time::sleep(left.min(Duration::from_millis(200))).await;
        }
        let result = match fault {
            Fault::WorkerKill => {
                let process = processes.choose(rng).context("no processes")?;
                let down = Duration::from_millis(rng.random_range(0..800));
                eprintln!("chaos: SIGKILL {process}, restart in {down:?}");
                fleet.kill(process).await?;
                *injected
                    .killed_processes
                    .entry(process.clone())
                    .or_default() += 1;
                tokio::time::sleep(down).await;
                fleet.spawn(process, &[]).map(drop)
            }
            Fault::ConnectionClose => {
                eprintln!(
                    "chaos: closing every connection of vhost {}",
                    system.vhost.name
                );
                faults::close_broker_connections(&system.vhost).await
            }
            Fault::DbKill => {
                let killed = faults::terminate_db_backends(&system.db.url, &system.db.name).await;
                if let Ok(n) = &killed {
                    eprintln!("chaos: terminated {n} backends of {}", system.db.name);
                    injected.db_backends_terminated += n;
                }
                killed.map(drop)
            }
            Fault::BrokerRestart => {
                let down = Duration::from_millis(rng.random_range(1_000..5_000));
                eprintln!("chaos: restarting the RabbitMQ application, down for {down:?}");
                faults::restart_broker(down).await
            }
        };
        match result {
            Ok(()) => *injected.per_kind.entry(fault).or_default() += 1,
            Err(error) => injected.failures.push(format!("{fault:?}: {error:#}")),
        }
    }
    Ok(injected)
}

/// `(order_id, status)` of the placed orders that have a row.
async fn statuses(system: &System, ids: &[Uuid]) -> anyhow::Result<BTreeMap<Uuid, String>> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT order_id, status FROM order_status WHERE order_id = ANY($1)")
            .bind(ids)
            .fetch_all(system.pool())
            .await?;
    Ok(rows.into_iter().collect())
}

fn unsettled(ids: &[Uuid], now: &BTreeMap<Uuid, String>) -> Vec<Uuid> {
    ids.iter()
        .filter(|id| !now.get(id).is_some_and(|s| TERMINAL.contains(&s.as_str())))
        .copied()
        .collect()
}

/// Waits until every placed order is terminal, restarting workers that die meanwhile;
/// returns when that was.
async fn wait_quiescence(
    fleet: &mut Fleet,
    system: &System,
    ids: &[Uuid],
    deadline: Duration,
) -> anyhow::Result<Instant> {
    let started = Instant::now();
    let mut last = Vec::new();
    loop {
        fleet.revive()?;
        match statuses(system, ids).await {
            Ok(now) => {
                last = unsettled(ids, &now);
                if last.is_empty() {
                    return Ok(Instant::now());
                }
            }
            Err(error) => eprintln!("chaos: reading order_status failed ({error:#}); again"),
        }
        if started.elapsed() > deadline {
            let mut detail = String::new();
            for id in last.iter().take(10) {
                let _ = writeln!(
                    detail,
                    "  {id}: {:?}, events {:?}",
                    system.status(*id).await.ok().flatten(),
                    system
                        .event_types(&format!("order-{id}"))
                        .await
                        .unwrap_or_default()
                );
            }
            let published = tapped(system).await;
            for id in last.iter().take(10) {
                detail.push_str(&relayed(system, *id, &published).await);
            }
            bail!(
                "{} of {} orders are not terminal after {deadline:?}:\n{detail}\
                 queues (ready, unacknowledged, consumers):\n{}\
                 partition locks:\n{}{}",
                last.len(),
                ids.len(),
                system.queue_report().await,
                partition_locks(system).await,
                fleet.log_hint()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A queue of the test's own that every event the relay publishes also reaches: on a
/// failure it tells an event never published from one published and not handled.
const TAP: &str = "chaos.tap.every-event";

async fn open_tap(system: &System) -> anyhow::Result<()> {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{FieldTable, ShortString};
    let connection =
        lapin::Connection::connect(&system.vhost.url, lapin::ConnectionProperties::default())
            .await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            ShortString::from(TAP),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            ShortString::from(TAP),
            ShortString::from(bus::EVENTS_EXCHANGE),
            ShortString::from("#"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "tap open".into()).await;
    Ok(())
}

/// The message ids (event ids) the tap received.
async fn tapped(system: &System) -> BTreeSet<String> {
    use lapin::options::BasicGetOptions;
    use lapin::types::ShortString;
    let mut ids = BTreeSet::new();
    let Ok(connection) =
        lapin::Connection::connect(&system.vhost.url, lapin::ConnectionProperties::default()).await
    else {
        return ids;
    };
    let Ok(channel) = connection.create_channel().await else {
        return ids;
    };
    while let Ok(Some(message)) = channel
        .basic_get(ShortString::from(TAP), BasicGetOptions { no_ack: true })
        .await
    {
        if let Some(id) = message.delivery.properties.message_id() {
            ids.insert(id.to_string());
        }
    }
    let _ = connection.close(200, "tap read".into()).await;
    ids
}

/// The events of an order (its streams and its stock moves), each marked with whether
/// the relay published it.
async fn relayed(system: &System, order_id: Uuid, published: &BTreeSet<String>) -> String {
    let rows: Result<Vec<(String, String, Uuid)>, _> = sqlx::query_as(
        "SELECT stream_name, event_type, event_id FROM events
          WHERE stream_name IN ($1, $2, $3) OR payload->>'order_id' = $4
          ORDER BY transaction_id, global_position",
    )
    .bind(format!("order-{order_id}"))
    .bind(format!("payment-{order_id}"))
    .bind(format!("shipment-{order_id}"))
    .bind(order_id.to_string())
    .fetch_all(system.pool())
    .await;
    let mut text = format!("  {order_id}, its events and whether they were published:\n");
    match rows {
        Ok(rows) => {
            for (stream, event_type, event_id) in rows {
                let seen = if published.contains(&event_id.to_string()) {
                    "published"
                } else {
                    "NOT PUBLISHED"
                };
                let _ = writeln!(text, "    {stream} {event_type} {event_id}: {seen}");
            }
        }
        Err(error) => {
            let _ = writeln!(text, "    (events not listed: {error:#})");
        }
    }
    text
}

/// The advisory locks of the database (partition ownership, ADR 0005), one line each.
async fn partition_locks(system: &System) -> String {
    let rows: Result<Vec<(i64, i64, i32, String)>, _> = sqlx::query_as(
        "SELECT l.classid::bigint, l.objid::bigint, l.pid, coalesce(a.application_name, '')
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          ORDER BY 1, 2",
    )
    .fetch_all(system.pool())
    .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|(class, object, pid, app)| format!("  ({class}, {object}) pid {pid} {app}\n"))
            .collect(),
        Err(error) => format!("  (locks not listed: {error:#})\n"),
    }
}

/// The checks after quiescence.
#[derive(Debug, Default)]
struct Findings {
    lost: Vec<Uuid>,
    double_charges: Vec<String>,
    money_mismatches: Vec<String>,
    duplicated_events: Vec<String>,
    oversold_units: i64,
    stock_mismatches: Vec<String>,
    /// Orders that hit a product bug already reported, by bug (not failures unless
    /// `CHAOS_STRICT=1`).
    known_bugs: BTreeMap<&'static str, Vec<Uuid>>,
}

impl Findings {
    fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.double_charges.is_empty()
            && self.money_mismatches.is_empty()
            && self.duplicated_events.is_empty()
            && self.oversold_units == 0
            && self.stock_mismatches.is_empty()
    }
}

/// One pass of the money check: `(double charges, mismatches)` as `(order, text)`.
async fn money_pass(system: &System, ids: &[Uuid]) -> anyhow::Result<MoneyPass> {
    let rows: Vec<(Uuid, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT o.order_id, o.status, o.total_cents,
                coalesce(sum(g.amount_cents), 0)::bigint,
                count(g.idempotency_key) FILTER (WHERE g.kind = 'capture' AND g.outcome = 'captured')
         FROM order_status o
         LEFT JOIN gateway_ledger g
           ON g.idempotency_key IN ('capture-' || o.order_id, 'refund-' || o.order_id)
         WHERE o.order_id = ANY($1)
         GROUP BY o.order_id, o.status, o.total_cents",
    )
    .bind(ids)
    .fetch_all(system.pool())
    .await?;
    let mut pass = MoneyPass::default();
    for (id, status, total, net, captures) in rows {
        let kept = KEPT.contains(&status.as_str());
        if net > total || captures > 1 {
            pass.double_charges
                .push(format!("{id} {status}: total {total}, net captured {net}"));
        } else if (kept && net != total) || (!kept && net != 0) {
            pass.mismatches.push((
                id,
                format!("{id} {status}: total {total}, net captured {net}"),
            ));
        }
    }
    Ok(pass)
}

#[derive(Debug, Default)]
struct MoneyPass {
    double_charges: Vec<String>,
    mismatches: Vec<(Uuid, String)>,
}

/// The signature of a product bug already reported (see docs/RELIABILITY.md, Chaos):
/// `Some(name)` when the order's money mismatch is that bug.
async fn known_bug(system: &System, order_id: Uuid) -> anyhow::Result<Option<&'static str>> {
    let payment = system.event_types(&format!("payment-{order_id}")).await?;
    let order = system.event_types(&format!("order-{order_id}")).await?;
    let position = |t: &str| payment.iter().position(|e| e == t);
    let captured_in_log = position("PaymentCaptured");
    let ledger: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM gateway_ledger WHERE idempotency_key = $1 AND outcome = 'captured'",
    )
    .bind(format!("capture-{order_id}"))
    .fetch_one(system.pool())
    .await?;
    // A: the gateway captured, the worker died before `PaymentCaptured`, and meanwhile
    // the payment was voided or timed out: nothing ever refunds that capture.
    if ledger == 1
        && captured_in_log.is_none()
        && (position("PaymentVoided").is_some() || position("PaymentTimedOut").is_some())
    {
        return Ok(Some("orphan_capture"));
    }
    // B: the capture landed after the payment timed out (so payment refunded it), but
    // the order saga handled `PaymentCaptured` before `PaymentTimedOut` and confirmed.
    if let (Some(timed_out), Some(captured)) = (position("PaymentTimedOut"), captured_in_log) {
        if timed_out < captured && order.iter().any(|e| e == "OrderConfirmed") {
            return Ok(Some("confirmed_after_payment_timeout"));
        }
    }
    Ok(None)
}

/// Money is conserved per order. Compensations (refunds) may still be running when the
/// statuses are terminal, so this waits a little for the mismatches to clear.
async fn check_money(
    system: &System,
    ids: &[Uuid],
    strict: bool,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let pass = loop {
        let pass = money_pass(system, ids).await?;
        if (pass.double_charges.is_empty() && pass.mismatches.is_empty())
            || Instant::now() > deadline
        {
            break pass;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    findings.double_charges = pass.double_charges;
    for (order_id, text) in pass.mismatches {
        match known_bug(system, order_id).await? {
            Some(bug) if !strict => {
                eprintln!("chaos: KNOWN BUG {bug}: {text}");
                findings.known_bugs.entry(bug).or_default().push(order_id);
            }
            _ => findings.money_mismatches.push(text),
        }
    }
    Ok(())
}

async fn check_duplicates(system: &System, findings: &mut Findings) -> anyhow::Result<()> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT stream_name, event_type, count(*) FROM events
         WHERE event_type IN ('OrderPlaced', 'OrderConfirmed', 'OrderCancelled',
                              'PaymentCaptured', 'PaymentRefunded', 'ShipmentDelivered')
         GROUP BY stream_name, event_type HAVING count(*) > 1",
    )
    .fetch_all(system.pool())
    .await?;
    findings.duplicated_events = rows
        .into_iter()
        .map(|(stream, event_type, n)| format!("{stream}: {n} × {event_type}"))
        .collect();
    Ok(())
}

/// Stock is conserved: every SKU's on_hand is its initial level less the units of the
/// orders that kept them, nothing stays reserved, and no scarce SKU sold more than it had.
async fn check_stock(
    system: &System,
    initial: &BTreeMap<&'static str, i64>,
    orders: &[Planned],
    final_status: &BTreeMap<Uuid, String>,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let mut sold: BTreeMap<&str, i64> = BTreeMap::new();
    for planned in orders {
        if final_status
            .get(&planned.id)
            .is_some_and(|s| KEPT.contains(&s.as_str()))
        {
            for (sku, quantity, _) in &planned.lines {
                *sold.entry(sku).or_default() += quantity;
            }
        }
    }
    let expected: BTreeMap<&str, (i64, i64)> = initial
        .iter()
        .map(|(sku, level)| (*sku, (level - sold.get(sku).copied().unwrap_or(0), 0)))
        .collect();
    // The projector may still be applying the last releases: wait a little for them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let levels = loop {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT sku, on_hand, reserved FROM stock_levels")
                .fetch_all(system.pool())
                .await?;
        let levels: BTreeMap<String, (i64, i64)> =
            rows.into_iter().map(|(s, o, r)| (s, (o, r))).collect();
        let matches = expected
            .iter()
            .all(|(sku, want)| levels.get(*sku) == Some(want));
        if matches || Instant::now() > deadline {
            break levels;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for (on_hand, _) in levels.values() {
        findings.oversold_units += (-on_hand).max(0);
    }
    for (sku, level) in initial {
        findings.oversold_units += (sold.get(sku).copied().unwrap_or(0) - level).max(0);
        let want = expected.get(sku).copied().unwrap_or_default();
        let have = levels.get(*sku).copied();
        if have != Some(want) {
            findings.stock_mismatches.push(format!(
                "{sku}: (on_hand, reserved) is {have:?}, expected {want:?} ({} sold of {level})",
                sold.get(sku).copied().unwrap_or(0)
            ));
        }
    }
    Ok(())
}

/// `orderflow audit` must pass; it may name only orders that hit a known product bug
/// (already counted). Retried for a while: the read models may still catch up.
async fn audit(system: &System, findings: &Findings) -> anyhow::Result<String> {
    let known: BTreeSet<String> = findings
        .known_bugs
        .values()
        .flatten()
        .map(Uuid::to_string)
        .collect();
    let started = Instant::now();
    loop {
        let out = system.cli(&["audit"]).await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok("ok".into());
        }
        let offending: Vec<&str> = text
            .lines()
            .find_map(|l| l.split_once("offending: ").map(|(_, ids)| ids))
            .map(|ids| ids.split_whitespace().collect())
            .unwrap_or_default();
        if !offending.is_empty() && offending.iter().all(|id| known.contains(*id)) {
            return Ok(format!("ok_but_known_bugs({})", offending.len()));
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("orderflow audit failed ({}):\n{text}", out.status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the whole chaos scenario and returns its one-line report.
pub async fn run(config: &Config) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(config.seed);
    eprintln!("chaos: {config:?}");
    let system = System::start(&TIMERS).await?;
    let mut initial: BTreeMap<&'static str, i64> = BTreeMap::new();
    for sku in PLENTIFUL {
        initial.insert(sku, PLENTY);
    }
    for sku in SCARCE {
        initial.insert(sku, (config.orders as i64 / 60).max(4));
    }
    for (sku, level) in &initial {
        system.set_stock(sku, *level).await?;
    }
    open_tap(&system).await?;
    // `System::start` ran everything in one process; from here on, one per worker.
    let mut system = system;
    system.kill_worker().await?;
    let layout = layout(&system, config).await?;
    let process_count = layout.len();
    let mut fleet = Fleet::new(
        worker_env(&system, &TIMERS),
        &format!("{}-chaos", system.db.name),
        layout,
    )?;
    fleet.spawn_all()?;
    eprintln!("chaos: {}", fleet.log_hint());

    let orders = plan(config, &mut rng);
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    let mut publisher = Publisher::new(&system.vhost.url);
    let window = Duration::from_secs_f64(config.orders as f64 / config.rate);
    let (published, injected) = tokio::join!(
        publish_all(&mut publisher, &orders, config.rate),
        inject_faults(&mut fleet, &system, config, window, &mut rng),
    );
    let (cancels, publish_time, published_at) = published?;
    let injected = injected?;
    ensure!(
        injected.failures.is_empty(),
        "some faults could not be injected: {:?}",
        injected.failures
    );

    let quiescence = wait_quiescence(&mut fleet, &system, &ids, config.quiescence_deadline)
        .await
        .with_context(|| fleet.log_hint())?;
    // Time to quiescence: from the last command published to every order terminal.
    let after_publish = quiescence.saturating_duration_since(published_at);

    let mut findings = Findings::default();
    let final_status = statuses(&system, &ids).await?;
    findings.lost = unsettled(&ids, &final_status);
    check_money(&system, &ids, config.strict, &mut findings).await?;
    check_duplicates(&system, &mut findings).await?;
    check_stock(&system, &initial, &orders, &final_status, &mut findings).await?;
    let audit = audit(&system, &findings).await;
    let dead_letters = system
        .queue_depth(DEAD_LETTER_QUEUE)
        .await
        .unwrap_or(u64::MAX);

    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for status in final_status.values() {
        *by_status.entry(status.as_str()).or_default() += 1;
    }
    let mut by_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    for planned in &orders {
        *by_kind.entry(planned.kind).or_default() += 1;
    }
    let count = |fault| injected.per_kind.get(&fault).copied().unwrap_or(0);
    let unexpected: BTreeSet<String> = fleet
        .unexpected_exits
        .iter()
        .map(|(w, s)| format!("{w} ({s})"))
        .collect();
    let report = format!(
        "chaos report: orders={} cancels_sent={} statuses={:?} | worker_processes={} \
         faults: worker_kills={} \
         broker_connection_closes={} db_backend_kills={} (backends terminated: {}) \
         broker_restarts={} | self_exited_workers={} client_reconnects={} republished={} dead_letters={} | \
         lost={} double_charges={} money_mismatches={} duplicated_events={} oversold={} \
         stock_mismatches={} audit={} known_bugs={:?} | publishing={:.1}s time_to_quiescence={:.1}s \
         total={:.1}s seed={}",
        orders.len(),
        cancels,
        by_status,
        process_count,
        count(Fault::WorkerKill),
        count(Fault::ConnectionClose),
        count(Fault::DbKill),
        injected.db_backends_terminated,
        count(Fault::BrokerRestart),
        fleet.unexpected_exits.len(),
        publisher.reconnects,
        publisher.republished,
        dead_letters,
        findings.lost.len(),
        findings.double_charges.len(),
        findings.money_mismatches.len(),
        findings.duplicated_events.len(),
        findings.oversold_units,
        findings.stock_mismatches.len(),
        match &audit {
            Ok(verdict) => verdict.as_str(),
            Err(_) => "FAILED",
        },
        findings
            .known_bugs
            .iter()
            .map(|(bug, orders)| (*bug, orders.len()))
            .collect::<BTreeMap<_, _>>(),
        publish_time.as_secs_f64(),
        after_publish.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        config.seed,
    );
    println!("{report}");
    eprintln!(
        "chaos: mix {by_kind:?}; killed {:?}; self-exited {unexpected:?}",
        injected.killed_processes
    );
    ensure!(
        findings.is_clean(),
        "{report}\n{findings:#?}\n{}",
        fleet.log_hint()
    );
    audit.with_context(|| report.clone())?;
    Ok(report)
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_survive_killed_workers_dropped_broker_connections_and_killed_db_connections(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let config = Config::from_env()?;
    ensure!(
        config.broker_restarts == 0 || std::env::var_os("CHAOS_ALLOW_BROKER_RESTART").is_some(),
        "CHAOS_BROKER_RESTARTS restarts the shared broker: run it through scripts/chaos"
    );
    run(&config).await.map(drop)
}
