use domain::commands::CancelOrder;
use domain::{EventEnvelope, OrderInput};
use futures::future::BoxFuture;
use projector::{Projection, ProjectorError};
use sqlx::PgConnection;
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

/// Several orders in different states, and stock.
async fn mixed_log(store: &eventstore::EventStore) -> anyhow::Result<()> {
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
    Ok(())
}

#[tokio::test]
async fn replay_gives_the_rows_incremental_projection_gives() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    mixed_log(store).await?;
    catch_up_all(store).await?;
    let live = all_rows(store).await?;
    assert_eq!(live.0.len(), 4);
    assert!(!live.2.is_empty(), "the log leaves timers to compare");

    let total = store.count().await?;
    for projection in projector::all_projections() {
        let mut progress = Vec::new();
        let applied = projector::replay(store, projection.clone(), |n| progress.push(n)).await?;
        assert_eq!(i64::try_from(applied)?, total, "{}", projection.name());
        assert_eq!(progress.last().copied(), Some(applied));
    }
    assert_eq!(all_rows(store).await?, live);

    // the replay left the checkpoint at the end: nothing is applied a second time
    for projection in projector::all_projections() {
        assert_eq!(projector::run_once(store, projection.as_ref()).await?, 0);
        assert_eq!(behind(store, projection.as_ref()).await?, 0);
    }
    assert_eq!(all_rows(store).await?, live);
    Ok(())
}

/// A row of `order_status` that the log knows nothing of.
async fn insert_ghost_order(db: &TestDb) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO order_status (order_id, customer_id, status, total_cents, currency, item_count,
                                   placed_at, updated_at, last_global_position)
         VALUES ($1, 'ghost', 'pending', 1, 'EUR', 1, now(), now(), 1)",
    )
    .bind(Uuid::new_v4())
    .execute(db.pool())
    .await?;
    Ok(())
}

#[tokio::test]
async fn replay_over_existing_rows_replaces_them() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    mixed_log(store).await?;
    catch_up_all(store).await?;
    let live = all_rows(store).await?;

    // damage every read model: changed rows, and rows the log knows nothing of
    sqlx::query("UPDATE order_status SET status = 'bogus', item_count = 99")
        .execute(db.pool())
        .await?;
    insert_ghost_order(&db).await?;
    sqlx::query("UPDATE stock_levels SET on_hand = on_hand + 1000")
        .execute(db.pool())
        .await?;
    sqlx::query("INSERT INTO stock_levels (sku, on_hand, reserved) VALUES ('ghost', 1, 1)")
        .execute(db.pool())
        .await?;
    sqlx::query("DELETE FROM timers").execute(db.pool()).await?;
    sqlx::query(
        "INSERT INTO timers (timer_id, kind, order_id, due_at, scheduled_at)
         VALUES ($1, 'delivery', $2, now(), now())",
    )
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .execute(db.pool())
    .await?;
    assert_ne!(all_rows(store).await?, live);

    replay_all(store).await?;
    assert_eq!(all_rows(store).await?, live);
    Ok(())
}

#[tokio::test]
async fn replay_of_an_empty_log_empties_the_read_models() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    sqlx::query("INSERT INTO stock_levels (sku, on_hand, reserved) VALUES ('ghost', 1, 1)")
        .execute(db.pool())
        .await?;
    let applied = projector::replay(
        store,
        std::sync::Arc::new(projector::stock_levels::StockLevelsProjection),
        |_| {},
    )
    .await?;
    assert_eq!(applied, 0);
    assert!(stock_rows(store).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn an_unknown_projection_name_is_an_error_naming_the_known_ones() -> anyhow::Result<()> {
    let known: Vec<&str> = projector::all_projections()
        .iter()
        .map(|p| p.name())
        .collect();
    for name in ["order_status", "stock_levels", "timers"] {
        assert!(known.contains(&name), "{name} missing from {known:?}");
    }
    for name in known {
        assert_eq!(projector::by_name(name).map(|p| p.name()).ok(), Some(name));
    }
    match projector::by_name("orders") {
        Err(e @ ProjectorError::UnknownProjection(_)) => {
            let message = e.to_string();
            assert!(message.contains("'orders'"), "{message}");
            for name in projector::all_projections().iter().map(|p| p.name()) {
                assert!(message.contains(name), "{message} does not name {name}");
            }
        }
        Err(other) => anyhow::bail!("unexpected error {other}"),
        Ok(p) => anyhow::bail!("'orders' resolved to {}", p.name()),
    }
    Ok(())
}

#[tokio::test]
async fn readers_see_the_old_rows_while_a_rebuild_runs_and_the_new_ones_after() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let store = &db.store;
    let live =
        stock_projected_then_damaged(&db, "UPDATE stock_levels SET on_hand = on_hand + 1000")
            .await?;
    let damaged = stock_rows(store).await?;
    assert_ne!(damaged, live);

    let held = std::sync::Arc::new(Interrupted::new(
        projector::by_name("stock_levels")?,
        1,
        Stop::Hold,
    ));
    let replay = {
        let (store, held) = (store.clone(), held.clone());
        tokio::spawn(async move { projector::replay(&store, held, |_| {}).await })
    };
    tokio::time::timeout(DEADLINE, held.reached.notified()).await?;
    // The rebuild has applied its page to its own copy; the live rows are as they were,
    // and reading them does not wait for it.
    let during = tokio::time::timeout(DEADLINE, stock_rows(store)).await??;
    assert_eq!(during, damaged);

    held.release.notify_one();
    replay.await??;
    assert_eq!(stock_rows(store).await?, live);
    Ok(())
}

#[tokio::test]
async fn a_reader_holding_a_table_open_does_not_stall_the_rebuild_of_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let live = stock_projected_then_damaged(&db, "UPDATE stock_levels SET reserved = 0").await?;

    // A reader in a long transaction keeps the table's share lock until it ends, so the
    // rebuild cannot truncate the table: it deletes the rows instead.
    let mut reader = eventstore::begin(db.pool()).await?;
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM stock_levels")
        .fetch_one(&mut *reader)
        .await?;
    assert_eq!(usize::try_from(seen)?, live.len());
    let replay = projector::replay(store, projector::by_name("stock_levels")?, |_| {});
    tokio::time::timeout(DEADLINE, replay).await??;
    assert_eq!(stock_rows(store).await?, live);
    reader.commit().await?;
    Ok(())
}

/// The mixed log projected live; returns its stock rows, then damages them with
/// `damage`, so that only a rebuild brings them back.
async fn stock_projected_then_damaged(
    db: &TestDb,
    damage: &str,
) -> anyhow::Result<Vec<(String, i64, i64)>> {
    mixed_log(&db.store).await?;
    catch_up_all(&db.store).await?;
    let live = stock_rows(&db.store).await?;
    sqlx::query(damage).execute(db.pool()).await?;
    Ok(live)
}

/// Orders per status as `order_status_counts` keeps them (zeros left out), and as
/// counting `order_status` gives them.
async fn counts(db: &TestDb) -> anyhow::Result<(Vec<(String, i64)>, Vec<(String, i64)>)> {
    let kept = sqlx::query_as(
        "SELECT status, orders FROM order_status_counts WHERE orders <> 0 ORDER BY status",
    )
    .fetch_all(db.pool())
    .await?;
    let counted =
        sqlx::query_as("SELECT status, count(*) FROM order_status GROUP BY status ORDER BY status")
            .fetch_all(db.pool())
            .await?;
    Ok((kept, counted))
}

/// The counts per status follow every write of `order_status`: the projector's pages,
/// rows changed and added and deleted by hand, a rebuild (TRUNCATE, then INSERT).
#[tokio::test]
async fn the_orders_per_status_follow_every_write_of_order_status() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    mixed_log(store).await?;
    catch_up_all(store).await?;
    let (kept, counted) = counts(&db).await?;
    assert_eq!(kept, counted);
    assert_eq!(counted.iter().map(|(_, n)| n).sum::<i64>(), 4);

    sqlx::query("UPDATE order_status SET status = 'bogus' WHERE status = 'cancelled'")
        .execute(db.pool())
        .await?;
    insert_ghost_order(&db).await?;
    sqlx::query("DELETE FROM order_status WHERE status = 'delivered'")
        .execute(db.pool())
        .await?;
    let (kept, counted) = counts(&db).await?;
    assert_eq!(kept, counted);
    assert!(kept.iter().any(|(status, _)| status == "bogus"));

    replay_all(store).await?;
    let (kept, counted) = counts(&db).await?;
    assert_eq!(kept, counted, "after a rebuild");
    assert_eq!(counted.iter().map(|(_, n)| n).sum::<i64>(), 4);
    Ok(())
}

/// A projection whose table keeps, for each stream, the first row added for it
/// (`first_wins_tables`): its first event, whatever the pages. Each row's `rank` falls
/// as the log goes on, so the row that must win has the greatest rank of its key: the
/// order rows arrive in decides, not the order of a column.
struct FirstAdded;

impl Projection for FirstAdded {
    fn name(&self) -> &'static str {
        "first_added"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["first_added"]
    }

    fn first_wins_tables(&self) -> &'static [&'static str] {
        &["first_added"]
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>> {
        Box::pin(async move {
            for env in events {
                sqlx::query(
                    "INSERT INTO first_added (stream_name, rank) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                )
                .bind(&env.stream_name)
                .bind(-env.global_position)
                .execute(&mut *conn)
                .await?;
            }
            Ok(())
        })
    }
}

async fn first_added_rows(store: &eventstore::EventStore) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT stream_name, rank FROM first_added ORDER BY stream_name")
            .fetch_all(store.pool())
            .await?,
    )
}

#[tokio::test]
async fn a_rebuild_keeps_the_first_row_added_for_each_key_of_a_first_wins_table(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    sqlx::query("CREATE TABLE first_added (stream_name text PRIMARY KEY, rank bigint NOT NULL)")
        .execute(db.pool())
        .await?;
    mixed_log(store).await?;
    let projection = std::sync::Arc::new(FirstAdded);
    catch_up(store, projection.as_ref()).await?;
    let live = first_added_rows(store).await?;
    // A stream's events are in the log in the order of their positions.
    let first_of_each: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream_name, -min(global_position) FROM events GROUP BY stream_name ORDER BY stream_name",
    )
    .fetch_all(db.pool())
    .await?;
    assert_eq!(
        live, first_of_each,
        "the live projection keeps the first row added"
    );
    let longer: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events GROUP BY stream_name HAVING count(*) > 1) s",
    )
    .fetch_one(db.pool())
    .await?;
    assert!(longer > 0, "some stream has several events to choose from");

    sqlx::query("UPDATE first_added SET rank = 1")
        .execute(db.pool())
        .await?;
    sqlx::query("INSERT INTO first_added VALUES ('ghost', 1)")
        .execute(db.pool())
        .await?;
    projector::replay(store, projection, |_| {}).await?;
    assert_eq!(first_added_rows(store).await?, live);
    Ok(())
}
