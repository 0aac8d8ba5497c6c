//! Commands that read: the read model and the log.
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use domain::DomainEvent;
use eventstore::EventStore;
use uuid::Uuid;

#[derive(Debug, sqlx::FromRow)]
struct OrderRow {
    order_id: Uuid,
    customer_id: String,
    status: String,
    cancel_reason: Option<String>,
    total_cents: i64,
    currency: String,
    item_count: i32,
    placed_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_global_position: i64,
}

const ORDER_COLUMNS: &str =
    "order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                             placed_at, updated_at, last_global_position";

fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!(
        "{sign}{}.{:02} {currency}",
        cents.abs() / 100,
        cents.abs() % 100
    )
}

pub async fn status(store: &EventStore, order_id: Uuid) -> anyhow::Result<ExitCode> {
    let row: Option<OrderRow> = sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM order_status WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(store.pool())
    .await
    .context("cannot read order_status")?;
    let Some(o) = row else {
        anyhow::bail!("no order {order_id} in the read model (unknown, or not projected yet)");
    };
    println!("order        {}", o.order_id);
    println!("customer     {}", o.customer_id);
    match &o.cancel_reason {
        Some(reason) => println!("status       {} ({reason})", o.status),
        None => println!("status       {}", o.status),
    }
    println!(
        "total        {} ({} items)",
        money(o.total_cents, &o.currency),
        o.item_count
    );
    println!("placed       {}", o.placed_at.to_rfc3339());
    println!("updated      {}", o.updated_at.to_rfc3339());
    println!("position     {}", o.last_global_position);
    plan(store, order_id).await?;
    milestones(store, order_id).await?;
    Ok(ExitCode::SUCCESS)
}

/// The workflow the order follows, as recorded when it was placed, and why it was
/// sent to review, if it was.
async fn plan(store: &EventStore, order_id: Uuid) -> anyhow::Result<()> {
    let records = store
        .read_stream(&domain::streams::order(order_id), 0)
        .await
        .context("cannot read the order's stream")?;
    for rec in &records {
        match DomainEvent::decode(&rec.event_type, rec.schema_version, &rec.payload) {
            Ok(DomainEvent::OrderPlaced(placed)) => {
                let checks = if placed.plan.checks.is_empty() {
                    "no checks".to_owned()
                } else {
                    format!("checks: {}", placed.plan.checks.join(", "))
                };
                println!("workflow     v{} ({checks})", placed.plan.workflow_version);
            }
            Ok(DomainEvent::OrderSentForReview(review)) => {
                let detail = if review.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", review.detail)
                };
                println!("review       {}{detail}", review.rule);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The order's milestones (the `order_milestones` read model), in the order reached.
async fn milestones(store: &EventStore, order_id: Uuid) -> anyhow::Result<()> {
    let mut conn = store
        .pool()
        .acquire()
        .await
        .context("cannot reach the database")?;
    let rows = projector::milestones::of_order(&mut conn, order_id)
        .await
        .context("cannot read order_milestones")?;
    println!("milestones");
    for row in rows {
        println!(
            "  {}  {:<10} (position {})",
            row.reached_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            row.milestone,
            row.global_position
        );
    }
    Ok(())
}

pub async fn orders(
    store: &EventStore,
    status: Option<&str>,
    limit: i64,
) -> anyhow::Result<ExitCode> {
    let rows: Vec<OrderRow> = sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM order_status
          WHERE $1::text IS NULL OR status = $1
          ORDER BY placed_at DESC, order_id LIMIT $2"
    ))
    .bind(status)
    .bind(limit.max(0))
    .fetch_all(store.pool())
    .await
    .context("cannot read order_status")?;
    println!(
        "{:<36}  {:<12}  {:<18}  {:>14}  {:>5}  {:<16}  placed",
        "order_id", "status", "cancel_reason", "total", "items", "customer"
    );
    for o in &rows {
        println!(
            "{:<36}  {:<12}  {:<18}  {:>14}  {:>5}  {:<16}  {}",
            o.order_id,
            o.status,
            o.cancel_reason.as_deref().unwrap_or("-"),
            money(o.total_cents, &o.currency),
            o.item_count,
            o.customer_id,
            o.placed_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    println!("({} orders)", rows.len());
    Ok(ExitCode::SUCCESS)
}

/// Events `orderflow events` reads and prints at a time: a stream of any length is
/// printed in constant memory.
const EVENTS_PAGE: i64 = 1_000;

pub async fn events(store: &EventStore, stream_name: &str, json: bool) -> anyhow::Result<ExitCode> {
    // Personal data is shown in clear while the customer's key exists, else as
    // [forgotten] (docs/adr/0004-crypto-shredding.md).
    let vault = services::vault::Vault::new(store.pool().clone());
    let mut pages = store.stream_pages(stream_name, 0, EVENTS_PAGE);
    let mut printed = false;
    while let Some(mut page) = pages
        .next()
        .await
        .with_context(|| format!("cannot read stream {stream_name}"))?
    {
        for e in &mut page {
            vault
                .open_payload(&e.event_type, &mut e.payload)
                .await
                .context("cannot open the events' personal data")?;
        }
        if !printed && !json {
            println!(
                "{:>7}  {:>8}  {:<23}  {:<24}  payload",
                "version", "position", "recorded_at", "event_type"
            );
        }
        printed = true;
        for e in &page {
            print_event(e, json);
        }
    }
    if !printed && !json {
        anyhow::bail!("stream {stream_name} has no events");
    }
    Ok(ExitCode::SUCCESS)
}

/// One event: a JSON object per line with `json`, else a row of the table.
fn print_event(e: &eventstore::RecordedEvent, json: bool) {
    if json {
        let line = serde_json::json!({
            "global_position": e.global_position,
            "stream_name": e.stream_name,
            "stream_version": e.stream_version,
            "event_id": e.event_id,
            "event_type": e.event_type,
            "schema_version": e.schema_version,
            "payload": e.payload,
            "metadata": e.metadata,
            "recorded_at": e.recorded_at,
        });
        println!("{line}");
    } else {
        println!(
            "{:>7}  {:>8}  {:<23}  {:<24}  {}",
            e.stream_version,
            e.global_position,
            e.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            e.event_type,
            e.payload
        );
    }
}

pub async fn replay(store: &EventStore, projection: Option<&str>) -> anyhow::Result<ExitCode> {
    let projections = match projection {
        Some(name) => vec![projector::by_name(name)?],
        None => projector::all_projections(),
    };
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    let started = std::time::Instant::now();
    let mut last_report = std::time::Instant::now();
    // One pass over the log, each projection in a transaction of its own, committed
    // only when every one of them has applied the whole log: readers see the old rows
    // until the new ones are committed.
    let applied = projector::replay_many(store, &projections, |n| {
        if last_report.elapsed().as_secs() >= 1 {
            eprintln!("  {n} events applied");
            last_report = std::time::Instant::now();
        }
    })
    .await
    .with_context(|| {
        format!(
            "replay of {} failed; the old rows are untouched",
            names.join(", ")
        )
    })?;
    let elapsed = started.elapsed();
    let rate = applied as f64 / elapsed.as_secs_f64().max(f64::EPSILON);
    println!(
        "replayed {} from {applied} events in {elapsed:.2?} ({rate:.0} events/s)",
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(store: &EventStore) -> anyhow::Result<ExitCode> {
    let report = services::audit::audit(store)
        .await
        .context("audit could not read the log")?;
    print!("{report}");
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `orderflow workers`: the processes in the registry, live ones first.
pub async fn workers(store: &EventStore) -> anyhow::Result<ExitCode> {
    let processes = services::registry::list(store.pool())
        .await
        .context("cannot read the workers table")?;
    println!(
        "{:<5}  {:<36}  {:<16}  {:>7}  {:<8}  {:<19}  {:>9}  {:<21}  workers",
        "state", "id", "host", "pid", "version", "started", "silent", "http"
    );
    for p in &processes {
        println!(
            "{:<5}  {:<36}  {:<16}  {:>7}  {:<8}  {:<19}  {:>8.1}s  {:<21}  {}",
            if p.gone { "gone" } else { "live" },
            p.id,
            p.host,
            p.pid,
            p.version,
            p.started_at.format("%Y-%m-%d %H:%M:%S"),
            p.silent_seconds,
            p.http_addr.as_deref().unwrap_or("-"),
            p.workers.join(",")
        );
    }
    let gone = processes.iter().filter(|p| p.gone).count();
    println!(
        "({} live, {gone} gone: silent for more than {} heartbeats)",
        processes.len() - gone,
        services::registry::GONE_AFTER_HEARTBEATS
    );
    Ok(ExitCode::SUCCESS)
}

/// The checkpoint of the read model `--wait` waits for.
const ORDER_STATUS_CHECKPOINT: &str = "projection:order_status";

/// Statuses `--wait-final` stops at: final, or waiting for a person.
const SETTLED: [&str; 5] = [
    "delivered",
    "completed",
    "cancelled",
    "rejected",
    "under_review",
];

/// Read-your-writes: waits until the read model has applied what the command
/// `message_id` caused (and, with `--wait-final`, until the order settles), then prints
/// the order's status line. Fails naming what it was waiting for at the deadline.
pub async fn wait_and_print(
    store: &EventStore,
    message_id: Uuid,
    order_id: Uuid,
    wait: crate::cli::WaitArgs,
) -> anyhow::Result<ExitCode> {
    let deadline = std::time::Instant::now() + wait.timeout;
    wait_applied(store, message_id, order_id, deadline)
        .await
        .with_context(|| format!("--wait gave up after {:?}", wait.timeout))?;
    let row = if wait.wait_final {
        poll(deadline, || async {
            let row = order_row(store, order_id).await?;
            Ok(row.filter(|o| SETTLED.contains(&o.status.as_str())))
        })
        .await
        .with_context(|| {
            format!(
                "--wait-final gave up after {:?}: order {order_id} has not settled",
                wait.timeout
            )
        })?
    } else {
        order_row(store, order_id)
            .await?
            .with_context(|| format!("no order {order_id} in the read model"))?
    };
    println!("{}", status_line(&row));
    Ok(ExitCode::SUCCESS)
}

/// `<order_id> <status>`, and ` (<cancel_reason>)` when there is one.
fn status_line(o: &OrderRow) -> String {
    match &o.cancel_reason {
        Some(reason) => format!("{} {} ({reason})", o.order_id, o.status),
        None => format!("{} {}", o.order_id, o.status),
    }
}

async fn order_row(store: &EventStore, order_id: Uuid) -> anyhow::Result<Option<OrderRow>> {
    sqlx::query_as(&format!(
        "SELECT {ORDER_COLUMNS} FROM order_status WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(store.pool())
    .await
    .context("cannot read order_status")
}

/// The token: the events of the order's stream whose metadata names `message_id` as
/// their cause (an order command writes only there); waits until one is in the log,
/// then until the `order_status` checkpoint has passed the last of them in the
/// followers' order (transaction id, then global position).
async fn wait_applied(
    store: &EventStore,
    message_id: Uuid,
    order_id: Uuid,
    deadline: std::time::Instant,
) -> anyhow::Result<eventstore::LogPosition> {
    let (transaction_id, global_position): (i64, i64) = poll(deadline, || async {
        sqlx::query_as(
            "SELECT transaction_id, global_position FROM events
              WHERE stream_name = $2 AND metadata->>'causation_id' = $1
              ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
        )
        .bind(message_id.to_string())
        .bind(domain::streams::order(order_id))
        .fetch_optional(store.pool())
        .await
        .context("cannot read the log")
    })
    .await
    .with_context(|| {
        format!(
            "no event caused by command {message_id} is in the log (not handled yet, \
             dead-lettered — see `orderflow dlq list` — or no commands worker running)"
        )
    })?;
    poll(deadline, || async {
        let passed: Option<bool> = sqlx::query_scalar(
            "SELECT (transaction_id, global_position) >= ($2, $3) FROM checkpoints WHERE name = $1",
        )
        .bind(ORDER_STATUS_CHECKPOINT)
        .bind(transaction_id)
        .bind(global_position)
        .fetch_optional(store.pool())
        .await
        .context("cannot read the projector's checkpoint")?;
        Ok(passed.unwrap_or(false).then_some(()))
    })
    .await
    .with_context(|| {
        format!(
            "the command's events (up to position {global_position}) are in the log, but \
             order_status has not applied them (is a projector running?)"
        )
    })?;
    Ok(eventstore::LogPosition {
        transaction_id,
        global_position,
    })
}

/// Polls `check` until it returns `Some` or the deadline passes.
async fn poll<T, F, Fut>(deadline: std::time::Instant, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            anyhow::bail!("timed out");
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(100));
    }
}
