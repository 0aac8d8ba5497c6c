//! The `orderflow` binary as a user runs it: exit codes, one-line errors, and the
//! commands that read the log and the read models (contract section 6).
//!
//! Its presence also makes `cargo test --workspace` build the binary that the
//! end-to-end tests (`tests/e2e`) start.

use std::process::Output;

use anyhow::Context;
use eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent};
use serde_json::{json, Value};
use testkit::TestDb;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// Runs the binary with `args` and `env` (on top of the test's environment).
async fn orderflow(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .output()
        .await
        .with_context(|| format!("cannot run {BIN}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Non-zero exit, exactly one `error:` line, and no panic.
fn assert_failed_with_one_error_line(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "{what}: expected failure, got {:?}",
        out.status
    );
    assert!(
        !err.contains("panicked"),
        "{what}: the program panicked:\n{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{what}: expected one error line, stderr:\n{err}"
    );
    errors[0].to_owned()
}

#[tokio::test]
async fn an_unknown_subcommand_fails_with_an_error_line() -> anyhow::Result<()> {
    let out = orderflow(&["frobnicate"], &[]).await?;
    let line = assert_failed_with_one_error_line(&out, "orderflow frobnicate");
    assert!(line.contains("frobnicate"), "{line}");
    Ok(())
}

#[tokio::test]
async fn an_order_id_that_is_not_a_uuid_is_refused_by_the_parser() -> anyhow::Result<()> {
    let out = orderflow(&["status", "not-a-uuid"], &[]).await?;
    let line = assert_failed_with_one_error_line(&out, "orderflow status not-a-uuid");
    assert!(line.contains("not-a-uuid"), "{line}");
    Ok(())
}

#[tokio::test]
async fn a_bad_setting_stops_the_program_naming_the_setting() -> anyhow::Result<()> {
    let out = orderflow(&["orders"], &[("ORDERFLOW_PAYMENT_TIMEOUT", "soon")]).await?;
    let line = assert_failed_with_one_error_line(&out, "ORDERFLOW_PAYMENT_TIMEOUT=soon");
    assert!(line.contains("ORDERFLOW_PAYMENT_TIMEOUT"), "{line}");
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn an_unreachable_database_fails_in_one_line_without_the_password() -> anyhow::Result<()> {
    let out = orderflow(
        &["orders"],
        &[("DATABASE_URL", "postgres://postgres:hunter2@127.0.0.1:1/x")],
    )
    .await?;
    let err = stderr(&out);
    assert_failed_with_one_error_line(&out, "unreachable database");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("hunter2"), "the password was printed: {err}");
    assert!(!stdout(&out).contains("hunter2"));
    Ok(())
}

#[tokio::test]
async fn status_of_an_unknown_order_fails() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let id = Uuid::new_v4().to_string();
    let out = orderflow(&["status", &id], &[("DATABASE_URL", db.url())]).await?;
    let line = assert_failed_with_one_error_line(&out, "status of an unknown order");
    assert!(line.contains(&id), "{line}");
    Ok(())
}

/// An event as stored at schema version 1 (the stored format is a boundary that old
/// data crosses: version 1 stays readable whatever the current version is).
fn v1(event_type: &str, payload: Value, correlation_id: Uuid) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload,
        metadata: Metadata {
            correlation_id,
            causation_id: correlation_id,
        },
    }
}

async fn append(
    store: &EventStore,
    stream: &str,
    events: Vec<(&str, Value)>,
) -> anyhow::Result<()> {
    let correlation = Uuid::new_v4();
    let events = events
        .into_iter()
        .map(|(event_type, payload)| v1(event_type, payload, correlation))
        .collect();
    store.append(stream, ExpectedVersion::Any, events).await?;
    Ok(())
}

#[tokio::test]
async fn events_prints_a_stream_oldest_first_and_as_json_lines() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = "stock-CLI-SKU".to_owned();
    let sets = [5, 7, 3]
        .into_iter()
        .map(|quantity| ("StockSet", json!({"sku": "CLI-SKU", "quantity": quantity})))
        .collect();
    append(&db.store, &stream, sets).await?;

    let out = orderflow(&["events", &stream], &[("DATABASE_URL", db.url())]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<&str> = text.lines().filter(|l| l.contains("StockSet")).collect();
    assert_eq!(rows.len(), 3, "{text}");
    for (row, quantity) in rows.iter().zip(["5", "7", "3"]) {
        assert!(row.contains(&format!("\"quantity\":{quantity}")), "{row}");
    }

    let out = orderflow(
        &["events", &stream, "--json"],
        &[("DATABASE_URL", db.url())],
    )
    .await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("every line of --json output is a JSON object")?;
    assert_eq!(lines.len(), 3);
    for (i, (line, quantity)) in lines.iter().zip([5, 7, 3]).enumerate() {
        assert!(line.is_object());
        assert_eq!(line["stream_name"], stream.as_str());
        assert_eq!(line["stream_version"], i);
        assert_eq!(line["event_type"], "StockSet");
        assert_eq!(line["payload"]["quantity"], quantity);
    }
    Ok(())
}

/// A stream longer than the pages `events` reads (1,000 events) is printed whole, in
/// version order, with one header.
#[tokio::test]
async fn events_prints_a_stream_longer_than_its_pages_whole_and_in_order() -> anyhow::Result<()> {
    const LEN: usize = 2_345;
    let db = TestDb::new().await?;
    let stream = "stock-CLI-LONG".to_owned();
    let sets = (0..LEN)
        .map(|quantity| ("StockSet", json!({"sku": "CLI-LONG", "quantity": quantity})))
        .collect();
    append(&db.store, &stream, sets).await?;

    let out = orderflow(&["events", &stream], &[("DATABASE_URL", db.url())]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().filter(|l| l.contains("event_type")).count(), 1);
    let versions: Vec<usize> = text
        .lines()
        .filter(|l| l.contains("StockSet"))
        .map(|row| row.split_whitespace().next().unwrap_or("").parse())
        .collect::<Result<_, _>>()
        .context("every row begins with its version")?;
    assert_eq!(versions, (0..LEN).collect::<Vec<_>>());

    let out = orderflow(
        &["events", &stream, "--json"],
        &[("DATABASE_URL", db.url())],
    )
    .await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let quantities: Vec<Value> = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).map(|e| e["payload"]["quantity"].clone()))
        .collect::<Result<_, _>>()?;
    assert_eq!(quantities, (0..LEN).map(|q| json!(q)).collect::<Vec<_>>());
    Ok(())
}

type OrderRow = (
    Uuid,
    String,
    String,
    Option<String>,
    i64,
    String,
    i32,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
    i64,
);

async fn order_rows(store: &EventStore) -> anyhow::Result<Vec<OrderRow>> {
    Ok(sqlx::query_as(
        "SELECT order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                placed_at, updated_at, last_global_position
           FROM order_status ORDER BY order_id",
    )
    .fetch_all(store.pool())
    .await?)
}

async fn stock_rows(store: &EventStore) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(
        sqlx::query_as("SELECT sku, on_hand, reserved FROM stock_levels ORDER BY sku")
            .fetch_all(store.pool())
            .await?,
    )
}

fn placed(order_id: Uuid, sku: &str, shipping: Value) -> Value {
    let ship = !shipping.is_null();
    json!({
        "order_id": order_id,
        "customer_id": "cli-customer",
        "currency": "EUR",
        "items": [{"sku": sku, "quantity": 2, "unit_price_cents": 1250}],
        "payment_token": "tok_ok",
        "shipping": shipping,
        "total_cents": 2500,
        "item_count": 2,
        "plan": {
            "workflow_version": 1,
            "review": false,
            "ship": ship,
            "review_timeout_ms": 86_400_000,
            "payment_timeout_ms": 30_000,
            "delivery_delay_ms": 2_000
        }
    })
}

fn accepted(order_id: Uuid, sku: &str) -> Value {
    json!({
        "order_id": order_id,
        "customer_id": "cli-customer",
        "currency": "EUR",
        "items": [{"sku": sku, "quantity": 2, "unit_price_cents": 1250}],
        "payment_token": "tok_ok",
        "total_cents": 2500,
        "payment_timeout_ms": 30_000
    })
}

#[tokio::test]
async fn replay_rebuilds_the_same_read_model_rows() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let sku = "REPLAY-SKU";
    append(
        store,
        "stock-REPLAY-SKU",
        vec![("StockSet", json!({"sku": sku, "quantity": 10}))],
    )
    .await?;

    // One order accepted and confirmed, one cancelled by the customer.
    let shipping = json!({"method": "standard", "address": "1 Main Street"});
    let first = Uuid::new_v4();
    append(
        store,
        &format!("order-{first}"),
        vec![
            ("OrderPlaced", placed(first, sku, shipping.clone())),
            ("OrderAccepted", accepted(first, sku)),
            (
                "OrderConfirmed",
                json!({
                    "order_id": first,
                    "items": [{"sku": sku, "quantity": 2, "unit_price_cents": 1250}],
                    "shipping": shipping,
                    "delivery_delay_ms": 2_000
                }),
            ),
        ],
    )
    .await?;
    let second = Uuid::new_v4();
    append(
        store,
        &format!("order-{second}"),
        vec![
            ("OrderPlaced", placed(second, sku, Value::Null)),
            ("OrderAccepted", accepted(second, sku)),
        ],
    )
    .await?;
    append(
        store,
        &format!("order-{second}"),
        vec![
            (
                "OrderCancelled",
                json!({
                    "order_id": second,
                    "reason": "customer_cancelled",
                    "detail": "changed my mind",
                    "by": null
                }),
            ),
            (
                "StockReleaseRequested",
                json!({"order_id": second, "line": 0, "sku": sku, "quantity": 2}),
            ),
        ],
    )
    .await?;

    // Project live, as the projector worker does.
    for projection in projector::all_projections() {
        testkit::wait_until(
            "the projection to catch up",
            std::time::Duration::from_secs(20),
            || async {
                // Caught up: nothing left to read, and no committed event lies beyond its
                // checkpoint (an empty read alone can mean "not visible yet").
                let read = projector::run_once(store, projection.as_ref()).await?;
                let at = store
                    .load_checkpoint(&format!("projection:{}", projection.name()))
                    .await?;
                let beyond: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM events WHERE (transaction_id, global_position) > ($1, $2)",
                )
                .bind(at.transaction_id)
                .bind(at.global_position)
                .fetch_one(store.pool())
                .await?;
                Ok((read == 0 && beyond == 0).then_some(()))
            },
        )
        .await?;
    }
    let orders_before = order_rows(store).await?;
    let stock_before = stock_rows(store).await?;
    assert_eq!(orders_before.len(), 2);
    let statuses: Vec<(&str, Option<&str>)> = orders_before
        .iter()
        .map(|r| (r.2.as_str(), r.3.as_deref()))
        .collect();
    assert!(statuses.contains(&("confirmed", None)), "{statuses:?}");
    assert!(
        statuses.contains(&("cancelled", Some("customer_cancelled"))),
        "{statuses:?}"
    );

    let out = orderflow(&["replay"], &[("DATABASE_URL", db.url())]).await?;
    assert!(out.status.success(), "replay failed: {}", stderr(&out));
    assert_eq!(order_rows(store).await?, orders_before);
    assert_eq!(stock_rows(store).await?, stock_before);

    let out = orderflow(
        &["replay", "--projection", "order_status"],
        &[("DATABASE_URL", db.url())],
    )
    .await?;
    assert!(out.status.success(), "replay failed: {}", stderr(&out));
    assert_eq!(order_rows(store).await?, orders_before);

    let out = orderflow(
        &["replay", "--projection", "no_such_projection"],
        &[("DATABASE_URL", db.url())],
    )
    .await?;
    assert_failed_with_one_error_line(&out, "replay of an unknown projection");
    assert_eq!(order_rows(store).await?, orders_before);
    Ok(())
}

/// Drops the role (and what it was granted) when the test ends, pass or fail: roles
/// are cluster-wide and would outlive the test's database.
struct RoleGuard {
    role: String,
    admin_url: String,
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let (role, url) = (self.role.clone(), self.admin_url.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
                    let _ =
                        sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"))
                            .execute(&mut conn)
                            .await;
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn setup_role_creates_a_worker_role_that_can_append_but_never_change_events(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let role = format!("of_worker_{}", Uuid::new_v4().simple());
    let _guard = RoleGuard {
        role: role.clone(),
        admin_url: db.url().to_owned(),
    };
    let out = orderflow(&["setup-role", &role], &[("DATABASE_URL", db.url())]).await?;
    assert!(out.status.success(), "setup-role failed: {}", stderr(&out));

    // The workers' commands start as that role (nothing to migrate, nothing to create).
    let role_url = db
        .url()
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(
        role_url,
        db.url(),
        "the test expects DATABASE_URL to name the postgres user"
    );
    let out = orderflow(&["orders"], &[("DATABASE_URL", &role_url)]).await?;
    assert!(
        out.status.success(),
        "orders as {role} failed: {}",
        stderr(&out)
    );

    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&role_url).await?;
    sqlx::query(
        "INSERT INTO events (stream_name, stream_version, event_id, event_type, schema_version, payload, metadata)
         VALUES ('stock-ROLE', 0, $1, 'StockSet', 1, '{\"sku\":\"ROLE\",\"quantity\":1}', '{}')",
    )
    .bind(Uuid::new_v4())
    .execute(&mut conn)
    .await
    .context("the worker role may append")?;
    sqlx::query("INSERT INTO stock_levels (sku, on_hand, reserved) VALUES ('ROLE', 1, 0)")
        .execute(&mut conn)
        .await
        .context("the worker role may write read models")?;
    for statement in [
        "UPDATE events SET event_type = 'X'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let refused = sqlx::query(statement).execute(&mut conn).await;
        let code = refused
            .as_ref()
            .err()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code());
        assert_eq!(
            code.as_deref(),
            Some("42501"),
            "{statement} must be refused by privilege: {refused:?}"
        );
    }
    conn.close().await?;
    Ok(())
}
