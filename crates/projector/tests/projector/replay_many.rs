//! `replay_many`: one reader, each projection rebuilt in its own transaction on its own
//! task. Together they give the rows each gives alone; a projection that fails leaves
//! every projection as it was; the live projector neither skips nor applies twice the
//! events appended while a rebuild runs.
use std::sync::Arc;

use domain::commands::CancelOrder;
use domain::events::StockReserved;
use domain::{streams, DomainEvent, OrderInput};
use eventstore::EventStore;
use projector::stock_levels::StockLevelsProjection;
use projector::{Projection, ProjectorError, REPLAY_PAGE_SIZE};
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

/// Reservations in bulk on a stock stream no order uses (`count` events, one append).
async fn bulk(store: &EventStore, count: i64) -> anyhow::Result<()> {
    let events: Vec<DomainEvent> = (0..count)
        .map(|_| {
            DomainEvent::StockReserved(StockReserved {
                sku: "F".to_owned(),
                order_id: Uuid::new_v4(),
                line: 0,
                quantity: 1,
            })
        })
        .collect();
    append(store, &streams::stock("F"), &events).await
}

/// A log of more than two replay pages: between bulk reservations, orders placed,
/// reserved, paid, shipped and delivered a round apart (so their events span pages),
/// some cancelled, some sent for review, some left waiting (timers).
async fn long_log(store: &EventStore) -> anyhow::Result<()> {
    const ROUNDS: usize = 7;
    set_stock(store, "A", 10_000).await?;
    set_stock(store, "B", 10_000).await?;
    set_stock(store, "F", 1_000_000).await?;
    let mut orders: Vec<OrderScript> = Vec::new();
    for round in 0..ROUNDS {
        bulk(store, REPLAY_PAGE_SIZE * 2 / 5).await?;
        for (age, order) in orders.iter_mut().rev().enumerate() {
            match age {
                0 => order.reserve_all().await?,
                1 => order.capture(1_450).await?,
                2 => order.ship(chrono::Utc::now()).await?,
                3 => order.deliver().await?,
                _ => {}
            }
        }
        let mut order = OrderScript::new(store);
        order
            .place(vec![line("A", 2, 700), line("B", 1, 50)], true)
            .await?;
        orders.push(order);
        let mut cancelled = OrderScript::new(store);
        cancelled.place(vec![line("A", 1, 100)], true).await?;
        if round % 2 == 0 {
            cancelled
                .order(OrderInput::Cancel(CancelOrder {
                    order_id: cancelled.order_id,
                    reason: "changed my mind".to_owned(),
                }))
                .await?;
        }
        let mut review = OrderScript::new(store);
        review.place(vec![line("B", 1, 250_000)], true).await?;
    }
    Ok(())
}

/// Every projection, the one named `name` replaced by `with`.
fn all_but(name: &str, with: Arc<dyn Projection>) -> Vec<Arc<dyn Projection>> {
    projector::all_projections()
        .into_iter()
        .map(|p| if p.name() == name { with.clone() } else { p })
        .collect()
}

#[tokio::test]
async fn replaying_all_four_together_gives_the_rows_and_checkpoints_each_gives_alone(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    long_log(store).await?;
    wait_readable(store).await?;
    let total = store.count().await?;
    assert!(total > 2 * REPLAY_PAGE_SIZE, "{total} events: three pages");

    replay_all(store).await?;
    let alone = every_row(store).await?;
    let alone_at = checkpoints(store).await?;
    let ((orders, stock, timers), milestones, progress_rows) = &alone;
    assert!(
        orders.len() > 20 && stock.len() == 3,
        "{orders:?} {stock:?}"
    );
    assert!(!timers.is_empty() && !milestones.is_empty() && !progress_rows.is_empty());
    assert_eq!(alone_at.len(), 4);

    // damage every read model, so that the rebuild has to write every row again
    for damage in [
        "UPDATE stock_levels SET reserved = 0",
        "UPDATE order_status SET status = 'bogus'",
        "DELETE FROM order_milestones WHERE milestone = 'paid'",
        "DELETE FROM timers",
        "DELETE FROM order_milestone_progress",
    ] {
        sqlx::query(damage).execute(db.pool()).await?;
    }
    assert_ne!(every_row(store).await?, alone);

    let mut progress = Vec::new();
    let applied =
        projector::replay_many(store, &projector::all_projections(), |n| progress.push(n)).await?;
    assert_eq!(i64::try_from(applied)?, total);
    assert_eq!(progress.last().copied(), Some(applied));
    assert!(
        progress.windows(2).all(|w| w[0] < w[1]),
        "progress only grows: {progress:?}"
    );
    assert_eq!(every_row(store).await?, alone);
    assert_eq!(checkpoints(store).await?, alone_at);
    Ok(())
}

#[tokio::test]
async fn a_projection_failing_mid_replay_leaves_every_projection_its_old_rows_and_checkpoint(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    long_log(store).await?;
    wait_readable(store).await?;
    catch_up_all(store).await?;
    // events no projection has applied yet: a rebuild that committed would show them
    let mut late = OrderScript::new(store);
    late.place(vec![line("A", 1, 100)], true).await?;
    late.reserve_all().await?;
    wait_readable(store).await?;
    let before = every_row(store).await?;
    let before_at = checkpoints(store).await?;
    assert!(!before.0 .0.is_empty() && !before.1.is_empty());
    assert_eq!(before_at.len(), 4);
    let pages = usize::try_from(store.count().await?)?.div_ceil(usize::try_from(REPLAY_PAGE_SIZE)?);
    assert!(pages >= 3);

    // in the middle of the log, and on its last page (after the reader has finished)
    for (failing, at) in [("timers", 2), ("order_status", pages)] {
        let interrupted = Arc::new(Interrupted::new(
            projector::by_name(failing)?,
            at,
            Stop::Fail,
        ));
        let outcome =
            projector::replay_many(store, &all_but(failing, interrupted.clone()), |_| {}).await;
        match outcome {
            Err(ProjectorError::Rebuild { projection, source }) => {
                assert_eq!(projection, failing);
                assert!(source.to_string().contains("injected failure"), "{source}");
            }
            Err(other) => anyhow::bail!("unexpected error {other}"),
            Ok(applied) => anyhow::bail!("the replay succeeded ({applied} events)"),
        }
        assert_eq!(
            interrupted.pages.load(std::sync::atomic::Ordering::SeqCst),
            at,
            "{failing} stopped at page {at}"
        );
        assert_eq!(every_row(store).await?, before, "{failing} failed at {at}");
        assert_eq!(checkpoints(store).await?, before_at);
    }

    // nothing was left locked or open: the next replay rebuilds every projection
    let applied = projector::replay_many(store, &projector::all_projections(), |_| {}).await?;
    assert_eq!(i64::try_from(applied)?, store.count().await?);
    for projection in projector::all_projections() {
        assert_eq!(behind(store, projection.as_ref()).await?, 0);
    }
    assert!(order_row(store, late.order_id).await?.is_some());
    Ok(())
}

#[tokio::test]
async fn events_appended_during_a_replay_of_all_four_are_applied_once_by_the_live_projector(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(projector::run(
        store.clone(),
        projector::all_projections(),
        async move {
            let _ = stopped.await;
        },
    ));
    let caught_up = || async {
        let mut caught_up = true;
        for p in projector::all_projections() {
            caught_up &= behind(store, p.as_ref()).await? == 0;
        }
        anyhow::Ok(caught_up)
    };

    set_stock(store, "A", 1_000).await?;
    let mut reserved = 0;
    for _ in 0..3 {
        let mut order = OrderScript::new(store);
        order.place(vec![line("A", 3, 10)], true).await?;
        order.reserve_all().await?;
        reserved += 3;
    }
    testkit::wait_until("the live projector to catch up", DEADLINE, || async {
        Ok(caught_up().await?.then_some(()))
    })
    .await?;
    let before_replay = store.count().await?;

    // a replay of all four, held in the middle of stock_levels' rebuild: every
    // projection's transaction is open and holds its checkpoint lock
    let held = Arc::new(Interrupted::new(
        projector::by_name("stock_levels")?,
        1,
        Stop::Hold,
    ));
    let replay = {
        let (store, projections) = (store.clone(), all_but("stock_levels", held.clone()));
        tokio::spawn(async move { projector::replay_many(&store, &projections, |_| {}).await })
    };
    tokio::time::timeout(DEADLINE, held.reached.notified()).await?;

    for _ in 0..3 {
        let mut order = OrderScript::new(store);
        order.place(vec![line("A", 2, 10)], true).await?;
        order.reserve_all().await?;
        reserved += 2;
    }
    // The live projector cannot apply them yet: the replay's open transactions hold
    // back what the log lets followers read, and they hold the checkpoint locks.
    assert!(
        behind(store, &StockLevelsProjection).await? > 0,
        "nothing of the new orders is applied while the replay holds"
    );
    assert!(!replay.is_finished());

    held.release.notify_one();
    let applied = replay.await??;
    assert_eq!(
        i64::try_from(applied)?,
        before_replay,
        "the replay rebuilt what was there when it began; the rest is the live projector's"
    );

    let want = vec![("A".to_owned(), 1_000 - reserved, reserved)];
    testkit::wait_until("the live projector to catch up again", DEADLINE, || async {
        Ok((caught_up().await? && stock_rows(store).await? == want).then_some(()))
    })
    .await?;
    assert_eq!(order_rows(store).await?.len(), 6);
    let live_rows = every_row(store).await?;

    // what the live projector added on top of the rebuild is what a rebuild gives
    replay_all(store).await?;
    assert_eq!(every_row(store).await?, live_rows);
    let _ = stop.send(());
    live.await??;
    Ok(())
}

#[tokio::test]
async fn a_pool_too_small_for_every_projection_and_the_reader_is_refused_before_anything_changes(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 5).await?;
    catch_up_all(store).await?;
    let at = checkpoints(store).await?;
    let small = eventstore::connect_with(db.url(), 4).await?;
    match projector::replay_many(&small, &projector::all_projections(), |_| {}).await {
        Err(ProjectorError::PoolTooSmall {
            needed: 5,
            pool_size: 4,
        }) => {}
        other => anyhow::bail!("unexpected outcome {other:?}"),
    }
    assert_eq!(stock_rows(store).await?, vec![("A".to_owned(), 5, 0)]);
    assert_eq!(checkpoints(store).await?, at);
    // one projection and the reader fit
    let applied = projector::replay(&small, projector::by_name("stock_levels")?, |_| {}).await?;
    assert_eq!(applied, 1);
    assert_eq!(stock_rows(store).await?, vec![("A".to_owned(), 5, 0)]);
    Ok(())
}

#[tokio::test]
async fn a_rebuild_on_a_connection_that_projected_live_before_writes_only_its_own_copy(
) -> anyhow::Result<()> {
    // Two connections: every rebuild and every live page reuses them, so statements
    // the live projector prepared against the live tables are cached on the very
    // connection a later rebuild shadows those tables on.
    let db = TestDb::new().await?;
    let small = eventstore::connect_with(db.url(), 2).await?;
    let projection = projector::by_name("stock_levels")?;
    let mut want = Vec::new();
    for round in 0..4i64 {
        let sku = format!("S{round}");
        set_stock(&db.store, &sku, round + 1).await?;
        want.push((sku, round + 1, 0));
        wait_readable(&small).await?;
        catch_up(&small, projection.as_ref()).await?;
        assert_eq!(stock_rows(&small).await?, want, "live, round {round}");
        projector::replay(&small, projection.clone(), |_| {}).await?;
        assert_eq!(stock_rows(&small).await?, want, "rebuilt, round {round}");
    }
    Ok(())
}
