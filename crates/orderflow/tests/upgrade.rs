//! `orderflow check` and `orderflow replay --verify` as a user runs them: what they
//! print and their exit codes (no broker needed: both read PostgreSQL only).

use std::process::Output;

use anyhow::Context;
use domain::events::StockSet;
use domain::DomainEvent;
use eventstore::{ExpectedVersion, Metadata, NewEvent};
use serde_json::json;
use testkit::fixtures::{append, line, placement};
use testkit::TestDb;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

async fn orderflow(db: &TestDb, args: &[&str]) -> anyhow::Result<Output> {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", db.url())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {BIN}"))
}

fn shown(out: &Output) -> String {
    format!(
        "exit {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stock, and an order placed and accepted.
async fn small_log(db: &TestDb) -> anyhow::Result<Uuid> {
    let set = DomainEvent::StockSet(StockSet {
        sku: "CLI-A".into(),
        quantity: 4,
    });
    append(&db.store, "stock-CLI-A", &[set]).await?;
    let order_id = Uuid::new_v4();
    let placed = placement(
        order_id,
        "tok_ok",
        &[line("CLI-A", 1, 100)],
        true,
        chrono::Utc::now(),
    )?;
    append(&db.store, &format!("order-{order_id}"), &placed).await?;
    Ok(order_id)
}

#[tokio::test]
async fn check_prints_a_table_per_stored_version_and_fails_on_an_unknown_version(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    small_log(&db).await?;
    let ok = orderflow(&db, &["check"]).await?;
    assert!(ok.status.success(), "{}", shown(&ok));
    let text = shown(&ok);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["StockSet", "1", "1", "1", "0"]),
        "{text}"
    );
    assert!(
        text.contains("check ok: 3 events in 2 streams, 0 failures"),
        "{text}"
    );

    let future = NewEvent {
        event_id: Uuid::new_v4(),
        event_type: "StockSet".into(),
        schema_version: 7,
        payload: json!({"sku": "CLI-A", "quantity": 1, "bin": "7"}),
        metadata: Metadata {
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
        },
    };
    db.store
        .append("stock-CLI-A", ExpectedVersion::Any, vec![future])
        .await?;
    let failed = orderflow(&db, &["check"]).await?;
    assert_eq!(failed.status.code(), Some(1), "{}", shown(&failed));
    let text = shown(&failed);
    assert!(
        text.contains("FAIL position") && text.contains("stock-CLI-A@1 StockSet v7: event type 'StockSet' has no decoder for schema version 7"),
        "{text}"
    );
    assert!(text.contains("check FAILED"), "{text}");
    Ok(())
}

#[tokio::test]
async fn replay_verify_fails_on_a_difference_and_swap_needs_verify() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let order_id = small_log(&db).await?;
    let replayed = orderflow(&db, &["replay"]).await?;
    assert!(replayed.status.success(), "{}", shown(&replayed));
    let clean = orderflow(&db, &["replay", "--verify"]).await?;
    assert!(clean.status.success(), "{}", shown(&clean));

    sqlx::query("UPDATE order_status SET cancel_reason = 'out_of_stock' WHERE order_id = $1")
        .bind(order_id)
        .execute(db.pool())
        .await?;
    let found = orderflow(&db, &["replay", "--verify", "--projection", "order_status"]).await?;
    assert_eq!(found.status.code(), Some(1), "{}", shown(&found));
    let text = shown(&found);
    assert!(
        text.contains(&format!(
            "order_status order_id={order_id}: cancel_reason: live 'out_of_stock', rebuilt NULL"
        )),
        "{text}"
    );
    assert!(text.contains("use --swap"), "{text}");

    let refused = orderflow(&db, &["replay", "--swap"]).await?;
    assert!(!refused.status.success(), "{}", shown(&refused));
    assert!(shown(&refused).contains("--verify"), "{}", shown(&refused));
    let unknown = orderflow(&db, &["replay", "--verify", "--projection", "nope"]).await?;
    assert!(!unknown.status.success(), "{}", shown(&unknown));
    assert!(
        shown(&unknown).contains("unknown projection 'nope'"),
        "{}",
        shown(&unknown)
    );
    Ok(())
}
