//! Data protection (issue 7): the customer's address and free text are sealed in the
//! log with a key of their own; `orderflow forget-customer` destroys the key, and then
//! no reader shows the data while the log, replays and the audit keep working.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{order, order_stream, shipment_stream, System, DEADLINE};

const ADDRESS: &str = "77 Hidden Alley, Quietown";
const CANCEL_TEXT: &str = "my cat ordered this";

fn order_of(customer: &str, id: Uuid, price: i64, address: &str) -> Value {
    let mut body = order(id, &[("LAMP", 1, price)], "tok_ok", Some("express"));
    body["customer_id"] = json!(customer);
    body["shipping"]["address"] = json!(address);
    body
}

/// `orderflow <args>`: (exit success, stdout, stderr).
async fn run(system: &System, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = system.cli(args).await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// What `orderflow events <stream>` prints, in both formats.
async fn shown_events(system: &System, stream: &str) -> anyhow::Result<String> {
    let (ok, table, err) = run(system, &["events", stream]).await?;
    anyhow::ensure!(ok, "orderflow events {stream} failed: {err}");
    let (ok, lines, err) = run(system, &["events", stream, "--json"]).await?;
    anyhow::ensure!(ok, "orderflow events {stream} --json failed: {err}");
    Ok(format!("{table}\n{lines}"))
}

/// Every row of every table but the log and the key table, as text: the read models,
/// timers, notifications, the services' tables.
async fn all_rows_but_the_log(system: &System) -> anyhow::Result<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
            AND table_name NOT IN ('events', 'customer_keys', '_sqlx_migrations')",
    )
    .fetch_all(system.pool())
    .await?;
    anyhow::ensure!(tables.iter().any(|t| t == "notifications"));
    let mut text = String::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
            .fetch_all(system.pool())
            .await?;
        text.push_str(&rows.join("\n"));
    }
    Ok(text)
}

async fn log_text(system: &System) -> anyhow::Result<String> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT payload::text FROM events")
        .fetch_all(system.pool())
        .await?;
    Ok(rows.join("\n"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forgotten_customers_address_and_reason_are_gone_from_every_reader_and_the_log_replays(
) -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("LAMP", 10).await?;
    let customer = format!("customer-{}", Uuid::new_v4().simple());

    // A shipped order (the sealed address travels through the saga and shipping) and
    // one under review that the customer cancels with words of their own.
    let shipped = Uuid::new_v4();
    system
        .place(order_of(&customer, shipped, 1500, ADDRESS))
        .await?;
    let cancelled = Uuid::new_v4();
    system
        .place(order_of(&customer, cancelled, 150_000, ADDRESS))
        .await?;
    system
        .wait_status(cancelled, "under_review", DEADLINE)
        .await?;
    system
        .send(
            "order.cancel",
            json!({"order_id": cancelled, "reason": CANCEL_TEXT}),
        )
        .await?;
    assert_eq!(
        system.wait_status(shipped, "delivered", DEADLINE).await?,
        None
    );
    assert_eq!(
        system.wait_status(cancelled, "cancelled", DEADLINE).await?,
        Some("customer_cancelled".to_owned())
    );

    // Before: sealed at rest, readable through orderflow.
    let log = log_text(&system).await?;
    assert!(!log.contains("Hidden Alley") && !log.contains(CANCEL_TEXT));
    assert!(shown_events(&system, &order_stream(shipped))
        .await?
        .contains(ADDRESS));
    assert!(shown_events(&system, &shipment_stream(shipped))
        .await?
        .contains(ADDRESS));
    assert!(shown_events(&system, &order_stream(cancelled))
        .await?
        .contains(CANCEL_TEXT));
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(system.pool())
        .await?;

    let (ok, out, err) = run(&system, &["forget-customer", &customer]).await?;
    assert!(ok, "forget-customer failed: {err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(&format!("forgot customer {customer}")),
        "{out}"
    );

    // After: no reader shows the data; the events are all there and still decode.
    for stream in [
        order_stream(shipped),
        shipment_stream(shipped),
        order_stream(cancelled),
    ] {
        let shown = shown_events(&system, &stream).await?;
        assert!(!shown.contains("Hidden Alley"), "{shown}");
        assert!(!shown.contains(CANCEL_TEXT), "{shown}");
        assert!(shown.contains("[forgotten]"), "{shown}");
    }
    let (ok, _, err) = run(&system, &["replay"]).await?;
    assert!(ok, "replay failed: {err}");
    let rows = all_rows_but_the_log(&system).await?;
    assert!(!rows.contains("Hidden Alley") && !rows.contains(CANCEL_TEXT));
    assert_eq!(
        system.status(shipped).await?,
        Some(("delivered".to_owned(), None))
    );
    let events_after: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(system.pool())
        .await?;
    assert_eq!(events_after, events_before, "the log was rewritten");
    system.audit().await?;

    // Forgetting again is a no-op that says so; an unknown id is an error.
    let (ok, out, _) = run(&system, &["forget-customer", &customer]).await?;
    assert!(ok && out.contains("already forgotten"), "{out}");
    let (ok, _, err) = run(&system, &["forget-customer", "nobody-ever"]).await?;
    assert!(!ok && err.contains("unknown customer"), "{err}");

    // The customer comes back: a new key seals the new address, the old stays gone.
    let again = Uuid::new_v4();
    system
        .place(order_of(&customer, again, 1500, "5 Fresh Street"))
        .await?;
    system.wait_status(again, "delivered", DEADLINE).await?;
    assert!(shown_events(&system, &order_stream(again))
        .await?
        .contains("5 Fresh Street"));
    assert!(!shown_events(&system, &order_stream(shipped))
        .await?
        .contains("Hidden Alley"));
    system.audit().await
}
