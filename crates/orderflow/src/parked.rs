//! Operator repair, per order: `orderflow parked`, `orderflow resume` and
//! `orderflow order timeline` (docs/OPERATIONS.md, "Repairing").
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use eventstore::EventStore;
use uuid::Uuid;

/// How often `resume --wait` looks again.
const WAIT_POLL: Duration = Duration::from_millis(200);

pub async fn list(store: &EventStore) -> anyhow::Result<ExitCode> {
    let parked = services::parking::list(store.pool())
        .await
        .context("cannot read parked_orders")?;
    if parked.is_empty() {
        println!("no parked orders");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<38}  {:<24}  {:>7}  {:<24}  error",
        "order", "queue (worker)", "parked since", "waiting", "next replay"
    );
    for p in parked {
        let next = p.retry_at.map_or_else(|| "on resume".to_owned(), time);
        println!(
            "{:<36}  {:<38}  {:<24}  {:>7}  {:<24}  {} (after {} attempts)",
            p.order_id,
            format!("{} ({})", p.queue, p.worker),
            time(p.parked_at),
            p.waiting,
            next,
            one_line(&p.error),
            p.attempts
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn resume(
    store: &EventStore,
    order_id: Uuid,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let pool = store.pool();
    let since: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .context("cannot read the database's clock")?;
    let queues = services::parking::resume(pool, order_id)
        .await
        .context("cannot update parked_orders")?;
    if queues == 0 {
        anyhow::bail!("order {order_id} is not parked");
    }
    println!("order {order_id}: replay of its parked messages requested on {queues} queue(s)");
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    loop {
        let state: Option<(String, bool)> = sqlx::query_as(
            "SELECT error, updated_at > $2
               FROM parked_orders WHERE order_id = $1 ORDER BY updated_at DESC LIMIT 1",
        )
        .bind(order_id)
        .bind(since)
        .fetch_optional(pool)
        .await
        .context("cannot read parked_orders")?;
        match state {
            None => {
                println!("order {order_id}: resumed (its parked messages were handled)");
                return Ok(ExitCode::SUCCESS);
            }
            Some((error, true)) => {
                anyhow::bail!("order {order_id} failed again and stays parked: {error}")
            }
            Some((error, false)) if started.elapsed() >= timeout => {
                anyhow::bail!("order {order_id} still parked after {timeout:?}: {error}")
            }
            Some(_) => tokio::time::sleep(WAIT_POLL).await,
        }
    }
}

/// One line of the timeline.
#[derive(Debug, Clone)]
struct Entry {
    at: DateTime<Utc>,
    kind: &'static str,
    what: String,
    /// What later entries name as their cause (event id, message id, timer id).
    id: Option<String>,
    /// The causation id, as recorded.
    cause: Option<String>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    global_position: i64,
    stream_name: String,
    stream_version: i64,
    event_id: Uuid,
    event_type: String,
    causation_id: Option<String>,
    recorded_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct ParkedRow {
    queue: String,
    message_id: String,
    routing_key: String,
    error: String,
    attempts: i32,
    parked_at: DateTime<Utc>,
    replayed_at: Option<DateTime<Utc>>,
}

pub async fn timeline(store: &EventStore, order_id: Uuid) -> anyhow::Result<ExitCode> {
    let pool = store.pool();
    let mut entries = events(pool, order_id).await?;
    if entries.is_empty() {
        // A parked order.place leaves no event yet: still show what is known.
        let parked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM parked_messages WHERE order_id = $1")
                .bind(order_id)
                .fetch_one(pool)
                .await
                .context("cannot read parked_messages")?;
        if parked == 0 {
            anyhow::bail!("nothing is known of order {order_id}");
        }
    }
    entries.extend(parked_messages(pool, order_id).await?);
    entries.extend(timers(pool, order_id).await?);
    entries.extend(notifications(pool, order_id).await?);
    entries.sort_by_key(|e| e.at);
    print_timeline(order_id, &entries);
    for p in services::parking::list(pool)
        .await
        .context("cannot read parked_orders")?
        .into_iter()
        .filter(|p| p.order_id == order_id)
    {
        println!(
            "\nPARKED on {} ({}) since {}: {} message(s) waiting; {}",
            p.queue,
            p.worker,
            time(p.parked_at),
            p.waiting,
            one_line(&p.error)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The order's own streams, and the stock events it caused.
async fn events(pool: &sqlx::PgPool, order_id: Uuid) -> anyhow::Result<Vec<Entry>> {
    let streams = [
        domain::streams::order(order_id),
        domain::streams::payment(order_id),
        domain::streams::shipment(order_id),
    ];
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT global_position, stream_name, stream_version, event_id, event_type,
                metadata->>'causation_id' AS causation_id, recorded_at
           FROM events
          WHERE stream_name = ANY($1)
             OR (stream_name LIKE 'stock-%' AND payload->>'order_id' = $2)
          ORDER BY global_position",
    )
    .bind(&streams[..])
    .bind(order_id.to_string())
    .fetch_all(pool)
    .await
    .context("cannot read the order's events")?;
    Ok(rows
        .into_iter()
        .map(|r| Entry {
            at: r.recorded_at,
            kind: "event",
            what: format!(
                "{} on {}@{} (position {})",
                r.event_type, r.stream_name, r.stream_version, r.global_position
            ),
            id: Some(r.event_id.to_string()),
            cause: r.causation_id,
        })
        .collect())
}

/// Parked messages (with their attempts and error) and their replays.
async fn parked_messages(pool: &sqlx::PgPool, order_id: Uuid) -> anyhow::Result<Vec<Entry>> {
    let rows: Vec<ParkedRow> = sqlx::query_as(
        "SELECT queue, message_id, routing_key, error, attempts, parked_at, replayed_at
           FROM parked_messages WHERE order_id = $1 ORDER BY seq",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
    .context("cannot read parked_messages")?;
    let mut entries = Vec::new();
    for r in rows {
        // A relayed event's message id is the event's id: the link to the event.
        entries.push(Entry {
            at: r.parked_at,
            kind: "parked",
            what: format!(
                "message {} ({}) on {} after {} attempt(s): {}",
                r.message_id,
                r.routing_key,
                r.queue,
                r.attempts,
                one_line(&r.error)
            ),
            id: Some(r.message_id.clone()),
            cause: Some(r.message_id.clone()),
        });
        if let Some(at) = r.replayed_at {
            entries.push(Entry {
                at,
                kind: "replayed",
                what: format!(
                    "message {} ({}) on {}",
                    r.message_id, r.routing_key, r.queue
                ),
                id: None,
                cause: Some(r.message_id),
            });
        }
    }
    Ok(entries)
}

/// Open timers of the order (the timers read model keeps those not yet fired).
async fn timers(pool: &sqlx::PgPool, order_id: Uuid) -> anyhow::Result<Vec<Entry>> {
    let rows: Vec<(Uuid, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT timer_id, kind, due_at, scheduled_at FROM timers WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
    .context("cannot read timers")?;
    Ok(rows
        .into_iter()
        .map(|(timer_id, kind, due_at, scheduled_at)| Entry {
            at: scheduled_at,
            kind: "timer",
            what: format!("{kind} due {} (open)", time(due_at)),
            id: Some(timer_id.to_string()),
            cause: Some(timer_id.to_string()),
        })
        .collect())
}

async fn notifications(pool: &sqlx::PgPool, order_id: Uuid) -> anyhow::Result<Vec<Entry>> {
    let rows: Vec<(Uuid, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_id, kind, message, created_at FROM notifications
          WHERE order_id = $1 ORDER BY created_at",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
    .context("cannot read notifications")?;
    Ok(rows
        .into_iter()
        .map(|(event_id, kind, message, created_at)| Entry {
            at: created_at,
            kind: "notified",
            what: format!("{kind}: {}", one_line(&message)),
            id: None,
            cause: Some(event_id.to_string()),
        })
        .collect())
}

/// `#n` of the entry a cause names (the first with that id, if it is not the entry
/// itself), else the raw id.
fn caused_by(entries: &[Entry], index: usize, first: &HashMap<&str, usize>) -> String {
    let Some(cause) = entries.get(index).and_then(|e| e.cause.as_deref()) else {
        return String::new();
    };
    match first.get(cause) {
        Some(&n) if n != index => format!("#{}", n + 1),
        _ => format!("message {cause}"),
    }
}

fn print_timeline(order_id: Uuid, entries: &[Entry]) {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (n, e) in entries.iter().enumerate() {
        if let Some(id) = e.id.as_deref() {
            first.entry(id).or_insert(n);
        }
    }
    println!("timeline of order {order_id}");
    println!(
        "{:>3}  {:<24}  {:<8}  {:<44}  what",
        "#", "time", "kind", "caused by"
    );
    for (n, e) in entries.iter().enumerate() {
        println!(
            "{:>3}  {:<24}  {:<8}  {:<44}  {}",
            n + 1,
            time(e.at),
            e.kind,
            caused_by(entries, n, &first),
            e.what
        );
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: Option<&str>, cause: Option<&str>) -> Entry {
        Entry {
            at: Utc::now(),
            kind: "event",
            what: String::new(),
            id: id.map(ToOwned::to_owned),
            cause: cause.map(ToOwned::to_owned),
        }
    }

    #[test]
    fn causes_link_to_earlier_entries_or_name_the_message() {
        let entries = vec![
            entry(Some("e1"), Some("cmd")),
            entry(Some("e2"), Some("e1")),
            entry(None, Some("e2")),
        ];
        let first: HashMap<&str, usize> = [("e1", 0), ("e2", 1)].into_iter().collect();
        assert_eq!(caused_by(&entries, 0, &first), "message cmd");
        assert_eq!(caused_by(&entries, 1, &first), "#1");
        assert_eq!(caused_by(&entries, 2, &first), "#2");
    }
}
