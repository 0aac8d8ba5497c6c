//! Safe upgrades (issue 7 item 5) on real PostgreSQL: `projector::check` reads every
//! stored event with the current code and the domain's guards, and
//! `projector::verify` rebuilds read models beside the live ones, reports the
//! differences, and replaces the live rows only when asked.

#[allow(dead_code)]
#[path = "projector/support.rs"]
mod support;

use domain::commands::CancelOrder;
use domain::events::{ShipmentDelivered, StockSet};
use domain::{DomainEvent, OrderInput};
use eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent};
use projector::verify::{verify, DiffKind, SHADOW_SCHEMA};
use projector::{all_projections, by_name, Projection};
use serde_json::json;
use testkit::TestDb;
use uuid::Uuid;

use support::*;

/// Orders delivered, cancelled, pending and under review, and stock; returns the
/// delivered order's id.
async fn healthy_log(store: &EventStore) -> anyhow::Result<Uuid> {
    set_stock(store, "A", 50).await?;
    set_stock(store, "B", 5).await?;
    let mut delivered = OrderScript::new(store);
    delivered
        .place(vec![line("A", 2, 700), line("B", 1, 50)], true)
        .await?;
    delivered.reserve_all().await?;
    delivered.capture(1_450).await?;
    delivered.ship(chrono::Utc::now()).await?;
    delivered.deliver().await?;

    let mut cancelled = OrderScript::new(store);
    cancelled.place(vec![line("A", 1, 100)], true).await?;
    cancelled
        .order(OrderInput::Cancel(CancelOrder {
            order_id: cancelled.order_id,
            reason: "no".to_owned(),
        }))
        .await?;

    let mut pending = OrderScript::new(store);
    pending.place(vec![line("A", 3, 100)], false).await?;
    pending.capture(300).await?;

    let mut review = OrderScript::new(store);
    review.place(vec![line("B", 1, 250_000)], true).await?;
    Ok(delivered.order_id)
}

/// Appends one raw stored event, as an older or newer build might have written it.
async fn append_raw(
    store: &EventStore,
    stream: &str,
    event_type: &str,
    schema_version: i32,
    payload: serde_json::Value,
) -> anyhow::Result<()> {
    let event = NewEvent {
        event_id: Uuid::new_v4(),
        event_type: event_type.to_owned(),
        schema_version,
        payload,
        metadata: Metadata {
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
        },
    };
    store
        .append(stream, ExpectedVersion::Any, vec![event])
        .await?;
    Ok(())
}

async fn shadow_schema_exists(store: &EventStore) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(SHADOW_SCHEMA)
            .fetch_one(store.pool())
            .await?,
    )
}

async fn checkpoints(store: &EventStore) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT name, transaction_id, global_position FROM checkpoints ORDER BY name",
    )
    .fetch_all(store.pool())
    .await?)
}

fn refs(projections: &[std::sync::Arc<dyn Projection>]) -> Vec<&dyn Projection> {
    projections.iter().map(|p| p.as_ref()).collect()
}

#[tokio::test]
async fn check_passes_on_a_healthy_log() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    healthy_log(&db.store).await?;
    let report = projector::check::check(&db.store).await?;
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.events, u64::try_from(db.store.count().await?)?);
    // order-, payment-, shipment- for the delivered one, order- for three more, two SKUs
    assert!(report.streams >= 8, "{report}");
    assert!(
        report
            .types
            .contains_key(&("ShipmentDelivered".to_owned(), 1)),
        "{report}"
    );
    Ok(())
}

#[tokio::test]
async fn check_reports_an_unknown_type_and_an_unknown_schema_version() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    healthy_log(store).await?;
    let order = Uuid::new_v4();
    append_raw(
        store,
        &format!("order-{order}"),
        "OrderTeleported",
        1,
        json!({"order_id": order}),
    )
    .await?;
    append_raw(
        store,
        "stock-C",
        "StockSet",
        99,
        json!({"sku": "C", "quantity": 1}),
    )
    .await?;

    let report = projector::check::check(store).await?;
    assert!(!report.is_clean());
    assert_eq!(report.failure_count, 2, "{report}");
    let teleported = report
        .failures
        .iter()
        .find(|f| f.event_type == "OrderTeleported")
        .ok_or_else(|| anyhow::anyhow!("no failure for the unknown type:\n{report}"))?;
    assert_eq!(teleported.stream_name, format!("order-{order}"));
    assert!(
        teleported.reason.contains("unknown event type"),
        "{}",
        teleported.reason
    );
    let future = report
        .failures
        .iter()
        .find(|f| f.event_type == "StockSet")
        .ok_or_else(|| anyhow::anyhow!("no failure for StockSet v99:\n{report}"))?;
    assert_eq!(future.schema_version, 99);
    assert!(
        future.reason.contains("schema version 99"),
        "{}",
        future.reason
    );
    let summary = &report.types[&("StockSet".to_owned(), 99)];
    assert_eq!((summary.events, summary.failed), (1, 1));
    let printed = report.to_string();
    assert!(
        printed.contains("OrderTeleported") && printed.contains("check FAILED"),
        "{printed}"
    );
    Ok(())
}

#[tokio::test]
async fn check_reports_a_history_the_domain_would_not_have_written() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let order_id = Uuid::new_v4();
    // Delivered without ever being shipped; and stock set negative.
    append(
        store,
        &format!("shipment-{order_id}"),
        &[DomainEvent::ShipmentDelivered(ShipmentDelivered {
            order_id,
        })],
    )
    .await?;
    append(
        store,
        "stock-N",
        &[DomainEvent::StockSet(StockSet {
            sku: "N".into(),
            quantity: -3,
        })],
    )
    .await?;
    let report = projector::check::check(store).await?;
    let reasons: Vec<(&str, &str)> = report
        .failures
        .iter()
        .map(|f| (f.stream_name.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(report.failure_count, 2, "{report}");
    assert!(
        reasons
            .iter()
            .any(|(s, r)| s.starts_with("shipment-") && r.contains("nothing was shipped")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(s, r)| *s == "stock-N" && r.contains("negative")),
        "{reasons:?}"
    );
    Ok(())
}

#[tokio::test]
async fn verify_names_a_corrupted_row_and_leaves_the_live_tables_as_they_are() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let store = &db.store;
    let order_id = healthy_log(store).await?;
    catch_up_all(store).await?;
    sqlx::query("UPDATE order_status SET status = 'shipped' WHERE order_id = $1")
        .bind(order_id)
        .execute(store.pool())
        .await?;
    let before = (all_rows(store).await?, checkpoints(store).await?);

    let projections = all_projections();
    let report = verify(store, &refs(&projections), false).await?;

    assert_eq!(report.differences(), 1, "{report}");
    assert!(!report.swapped);
    let table = report
        .tables
        .iter()
        .find(|t| t.table == "order_status")
        .ok_or_else(|| anyhow::anyhow!("no order_status diff:\n{report}"))?;
    assert_eq!(table.rows.len(), 1, "{report}");
    assert!(
        table.rows[0].key.contains(&order_id.to_string()),
        "{report}"
    );
    let DiffKind::Differs { columns } = &table.rows[0].kind else {
        panic!("expected a differing row:\n{report}");
    };
    assert_eq!(
        columns,
        &["status: live 'shipped', rebuilt 'delivered'"],
        "{report}"
    );
    assert_eq!((all_rows(store).await?, checkpoints(store).await?), before);
    assert!(!shadow_schema_exists(store).await?);
    Ok(())
}

#[tokio::test]
async fn verify_with_swap_makes_the_live_rows_the_rebuilt_ones() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let order_id = healthy_log(store).await?;
    catch_up_all(store).await?;
    let healthy = all_rows(store).await?;
    sqlx::query("UPDATE order_status SET status = 'shipped', item_count = 99 WHERE order_id = $1")
        .bind(order_id)
        .execute(store.pool())
        .await?;
    sqlx::query("DELETE FROM stock_levels WHERE sku = 'A'")
        .execute(store.pool())
        .await?;
    sqlx::query("INSERT INTO stock_levels (sku, on_hand, reserved) VALUES ('GHOST', 1, 0)")
        .execute(store.pool())
        .await?;
    let positions = checkpoints(store).await?;

    let projections = all_projections();
    let report = verify(store, &refs(&projections), true).await?;
    assert!(report.swapped, "{report}");
    assert_eq!(report.differences(), 3, "{report}");
    let stock = report.tables.iter().find(|t| t.table == "stock_levels");
    let kinds: Vec<&DiffKind> = stock
        .iter()
        .flat_map(|t| &t.rows)
        .map(|r| &r.kind)
        .collect();
    assert_eq!(
        kinds,
        [&DiffKind::MissingFromLive, &DiffKind::OnlyInLive],
        "{report}"
    );

    assert_eq!(all_rows(store).await?, healthy);
    assert_eq!(
        checkpoints(store).await?,
        positions,
        "the checkpoints stay where the rows are"
    );
    assert!(!shadow_schema_exists(store).await?);
    let again = verify(store, &refs(&projections), false).await?;
    assert_eq!(again.differences(), 0, "{again}");

    // The live projector continues after the swap: applies what came since, once.
    let mut later = OrderScript::new(store);
    later.place(vec![line("B", 1, 10)], false).await?;
    catch_up_all(store).await?;
    let live = all_rows(store).await?;
    replay_all(store).await?;
    assert_eq!(live, all_rows(store).await?);
    Ok(())
}

#[tokio::test]
async fn verify_compares_at_the_checkpoint_so_lag_is_no_difference() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    healthy_log(store).await?;
    catch_up_all(store).await?;
    // Written after the projector's last page: the live tables do not show it yet.
    set_stock(store, "LATE", 7).await?;
    let mut late = OrderScript::new(store);
    late.place(vec![line("A", 1, 100)], false).await?;
    let projections = all_projections();
    let report = verify(store, &refs(&projections), false).await?;
    assert_eq!(report.differences(), 0, "{report}");
    Ok(())
}

#[tokio::test]
async fn verify_of_one_projection_touches_only_its_tables() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let order_id = healthy_log(store).await?;
    catch_up_all(store).await?;
    sqlx::query("UPDATE order_status SET status = 'shipped' WHERE order_id = $1")
        .bind(order_id)
        .execute(store.pool())
        .await?;
    sqlx::query("UPDATE stock_levels SET on_hand = on_hand + 1 WHERE sku = 'B'")
        .execute(store.pool())
        .await?;
    let stock = by_name("stock_levels")?;
    let report = verify(store, &[stock.as_ref()], true).await?;
    assert_eq!(report.tables.len(), 1, "{report}");
    assert_eq!(report.differences(), 1, "{report}");
    let DiffKind::Differs { columns } = &report.tables[0].rows[0].kind else {
        panic!("expected a differing row:\n{report}");
    };
    assert!(columns[0].starts_with("on_hand: live "), "{columns:?}");
    let row = order_row(store, order_id).await?;
    assert_eq!(
        row.map(|r| r.status),
        Some("shipped".to_owned()),
        "order_status untouched"
    );
    let again = verify(store, &[stock.as_ref()], false).await?;
    assert_eq!(again.differences(), 0, "{again}");
    Ok(())
}

#[tokio::test]
async fn a_swap_beside_a_running_projector_applies_nothing_twice_and_skips_nothing(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(projector::run(
        store.clone(),
        all_projections(),
        async move {
            let _ = stopped.await;
        },
    ));
    set_stock(store, "A", 1_000).await?;
    let projections = all_projections();
    let mut reserved = 0;
    for round in 0..6 {
        let mut order = OrderScript::new(store);
        order.place(vec![line("A", 2, 10)], true).await?;
        order.reserve_all().await?;
        reserved += 2;
        // Corrupt what the live projector wrote so far, then verify and swap while it
        // keeps following the log.
        sqlx::query("UPDATE stock_levels SET reserved = reserved + 100")
            .execute(store.pool())
            .await?;
        // Every other round only verifies: the corruption stays until a later swap.
        verify(store, &refs(&projections), round % 2 == 0).await?;
    }
    verify(store, &refs(&projections), true).await?;
    // Had a swap lost or repeated a page, `reserved` would be off by 2 (or by 100 had
    // it left the corruption).
    let want = vec![("A".to_owned(), 1_000 - reserved, reserved)];
    testkit::wait_until("the live projector to catch up", DEADLINE, || async {
        let mut caught_up = true;
        for p in all_projections() {
            caught_up &= behind(store, p.as_ref()).await? == 0;
        }
        Ok((caught_up && stock_rows(store).await? == want).then_some(()))
    })
    .await?;
    let _ = stop.send(());
    live.await??;
    let live_rows = all_rows(store).await?;
    replay_all(store).await?;
    assert_eq!(live_rows, all_rows(store).await?);
    Ok(())
}

#[tokio::test]
async fn check_folds_a_stream_longer_than_a_page_across_pages() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let long = usize::try_from(projector::check::CHECK_PAGE_SIZE)? + 10;
    let sets: Vec<DomainEvent> = (0..long)
        .map(|i| {
            DomainEvent::StockSet(StockSet {
                sku: "LONG".into(),
                quantity: i64::try_from(i).unwrap_or(0),
            })
        })
        .collect();
    append(store, "stock-LONG", &sets).await?;
    set_stock(store, "SHORT", 1).await?;
    let report = projector::check::check(store).await?;
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        (report.events, report.streams),
        (u64::try_from(long)? + 1, 2)
    );

    // Judged on the state folded across the page boundary: the last set left
    // `long - 1` units, so one unit can be reserved and then `long` more cannot.
    let reserve = |line: u32, quantity: usize| {
        DomainEvent::StockReserved(domain::events::StockReserved {
            sku: "LONG".into(),
            order_id: Uuid::from_u128(1),
            line,
            quantity: i64::try_from(quantity).unwrap_or(i64::MAX),
        })
    };
    append(store, "stock-LONG", &[reserve(0, 1), reserve(1, long)]).await?;
    let report = projector::check::check(store).await?;
    assert_eq!(report.failure_count, 1, "{report}");
    assert!(
        report.failures[0]
            .reason
            .contains(&format!("reserves {long} of {} available", long - 2)),
        "{report}"
    );
    assert_eq!(report.failures[0].stream_version, i64::try_from(long + 1)?);
    Ok(())
}
