use std::sync::Arc;

use projector::stock_levels::StockLevelsProjection;
use testkit::TestDb;

use crate::support::*;

#[tokio::test]
async fn a_second_instance_waits_for_the_first_and_does_not_apply_its_page_again(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    seven_of_a_hundred_reserved(store).await?;
    let total = store.count().await?;
    wait_readable(store).await?;

    let first = Arc::new(Interrupted::new(
        Arc::new(StockLevelsProjection),
        1,
        Stop::Hold,
    ));
    let first_run = {
        let (store, first) = (store.clone(), first.clone());
        tokio::spawn(async move { projector::run_once(&store, first.as_ref()).await })
    };
    tokio::time::timeout(DEADLINE, first.reached.notified()).await?;

    // another process, same projection, while the first is mid-page
    let other = db.second_store().await?;
    let second_run =
        tokio::spawn(async move { projector::run_once(&other, &StockLevelsProjection).await });
    testkit::wait_until(
        "the second instance to wait on the checkpoint lock",
        DEADLINE,
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(store.pool())
            .await?;
            Ok((waiting > 0).then_some(()))
        },
    )
    .await?;
    assert!(!second_run.is_finished());

    first.release.notify_one();
    let applied_first = first_run.await??;
    let applied_second = second_run.await??;
    assert_eq!(i64::try_from(applied_first)?, total);
    assert_eq!(
        applied_second, 0,
        "the second instance starts after the first one's page"
    );
    assert_eq!(stock_rows(store).await?, vec![("A".to_owned(), 93, 7)]);
    Ok(())
}

#[tokio::test]
async fn two_instances_following_together_apply_every_page_exactly_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let expected = big_log(store).await?;
    let total = store.count().await?;
    let applied = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let mut runners = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let store = db.second_store().await?;
        let applied = applied.clone();
        runners.spawn(async move {
            let p = StockLevelsProjection;
            testkit::wait_until("caught up", DEADLINE, || async {
                let n = projector::run_once(&store, &p).await?;
                applied.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                Ok((behind(&store, &p).await? == 0).then_some(()))
            })
            .await
        });
    }
    while let Some(result) = runners.join_next().await {
        result??;
    }
    assert_eq!(
        i64::try_from(applied.load(std::sync::atomic::Ordering::SeqCst))?,
        total,
        "pages read by both instances add up to the log, none twice"
    );
    assert_eq!(stock_rows(store).await?, expected);
    Ok(())
}

#[tokio::test]
async fn the_live_projector_follows_new_events_and_survives_replays() -> anyhow::Result<()> {
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

    let mut reserved = 0;
    set_stock(store, "A", 1_000).await?;
    for round in 0..5 {
        let mut order = OrderScript::new(store);
        order.place(vec![line("A", 3, 10)], true).await?;
        order.reserve_all().await?;
        reserved += 3;
        // a rebuild while the live projector is running: each projection alone, or
        // all four together
        if round % 2 == 0 {
            replay_all(store).await?;
        } else {
            projector::replay_many(store, &projector::all_projections(), |_| {}).await?;
        }
    }
    let want = vec![("A".to_owned(), 1_000 - reserved, reserved)];
    testkit::wait_until("the live projector to catch up", DEADLINE, || async {
        let mut caught_up = true;
        for p in projector::all_projections() {
            caught_up &= behind(store, p.as_ref()).await? == 0;
        }
        Ok((caught_up && stock_rows(store).await? == want).then_some(()))
    })
    .await?;
    assert_eq!(order_rows(store).await?.len(), 5);
    let _ = stop.send(());
    live.await??;
    Ok(())
}

#[tokio::test]
async fn an_event_this_version_cannot_decode_is_skipped_not_fatal() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 5).await?;
    store
        .append(
            "stock-A",
            eventstore::ExpectedVersion::Any,
            vec![eventstore::NewEvent {
                event_id: uuid::Uuid::new_v4(),
                event_type: "StockTeleported".to_owned(),
                schema_version: 1,
                payload: serde_json::json!({ "sku": "A" }),
                metadata: eventstore::Metadata {
                    correlation_id: uuid::Uuid::new_v4(),
                    causation_id: uuid::Uuid::new_v4(),
                },
            }],
        )
        .await?;
    set_stock(store, "A", 8).await?;
    catch_up(store, &StockLevelsProjection).await?;
    assert_eq!(stock_rows(store).await?, vec![("A".to_owned(), 8, 0)]);
    Ok(())
}

/// The live projector reads each page once for all projections; a projection whose
/// checkpoint someone else holds (the same projection in another process, mid-page)
/// is left behind alone, and catches up once it is free. (The holder began after the
/// events were written: an older open transaction would hold back every reader of the
/// log, see `EventStore::read_all`.)
#[tokio::test]
async fn a_projection_held_elsewhere_does_not_hold_back_the_others() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    seven_of_a_hundred_reserved(store).await?;

    let holder = db.second_store().await?;
    let mut held = eventstore::begin(holder.pool()).await?;
    holder
        .lock_checkpoint(&mut held, "projection:stock_levels")
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(projector::run(
        store.clone(),
        projector::all_projections(),
        async move {
            let _ = stopped.await;
        },
    ));
    let order_status = projector::by_name("order_status")?;
    testkit::wait_until("order_status to catch up", DEADLINE, || async {
        Ok((behind(store, order_status.as_ref()).await? == 0).then_some(()))
    })
    .await?;
    assert!(
        behind(store, &StockLevelsProjection).await? > 0,
        "stock_levels cannot move while its checkpoint is held"
    );
    assert!(stock_rows(store).await?.is_empty());

    held.rollback().await?;
    testkit::wait_until("stock_levels to catch up once free", DEADLINE, || async {
        Ok((stock_rows(store).await? == vec![("A".to_owned(), 93, 7)]).then_some(()))
    })
    .await?;
    assert_eq!(behind(store, &StockLevelsProjection).await?, 0);
    let _ = stop.send(());
    live.await??;
    Ok(())
}

/// Two live projectors (two processes) on one log: every event applied exactly once.
#[tokio::test]
async fn two_live_projectors_apply_every_event_exactly_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let mut stops = Vec::new();
    let mut lives = Vec::new();
    for _ in 0..2 {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        lives.push(tokio::spawn(projector::run(
            db.second_store().await?,
            projector::all_projections(),
            async move {
                let _ = stopped.await;
            },
        )));
    }
    let expected = big_log(store).await?;
    testkit::wait_until("both projectors to catch up", DEADLINE, || async {
        let mut caught_up = true;
        for p in projector::all_projections() {
            caught_up &= behind(store, p.as_ref()).await? == 0;
        }
        Ok(caught_up.then_some(()))
    })
    .await?;
    assert_eq!(stock_rows(store).await?, expected);
    for stop in stops {
        let _ = stop.send(());
    }
    for live in lives {
        live.await??;
    }
    Ok(())
}

/// Runs the live projector with `projections` until `caught_up` holds, then stops it.
async fn project_live_until<F, Fut>(
    store: &eventstore::EventStore,
    projections: Vec<Arc<dyn projector::Projection>>,
    what: &str,
    caught_up: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(projector::run(store.clone(), projections, async move {
        let _ = stopped.await;
    }));
    let waited = testkit::wait_until(what, DEADLINE, || async {
        Ok(caught_up().await?.then_some(()))
    })
    .await;
    let _ = stop.send(());
    live.await??;
    waited
}

/// Projections behind by the same page apply it in one transaction (one lock
/// statement, one checkpoint statement, one commit for all): the last writer of
/// every checkpoint row is the same transaction. Checked on the first page (the
/// checkpoints are created) and on a later one (they are moved).
#[tokio::test]
async fn projections_behind_by_the_same_page_apply_it_in_one_transaction() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    seven_of_a_hundred_reserved(store).await?;
    for expected in [93, 90] {
        if expected == 90 {
            order_reserving(store, 3).await?;
        }
        wait_readable(store).await?;
        project_live_until(
            store,
            projector::all_projections(),
            "every projection to catch up",
            || async {
                let mut caught_up = true;
                for p in projector::all_projections() {
                    caught_up &= behind(store, p.as_ref()).await? == 0;
                }
                Ok(caught_up)
            },
        )
        .await?;
        let (rows, writers): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT xmin::text) FROM checkpoints
              WHERE name LIKE 'projection:%'",
        )
        .fetch_one(store.pool())
        .await?;
        assert_eq!(rows, i64::try_from(projector::all_projections().len())?);
        assert_eq!(writers, 1, "one transaction moved every checkpoint");
        assert_eq!(
            stock_rows(store).await?,
            vec![("A".to_owned(), expected, 100 - expected)]
        );
    }
    Ok(())
}

/// A projection that fails on a page fails the shared transaction; the page is then
/// applied projection by projection, so the others move on and only the failing one
/// stays behind, with none of its rows written.
#[tokio::test]
async fn a_projection_that_keeps_failing_does_not_hold_back_the_others() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    seven_of_a_hundred_reserved(store).await?;
    wait_readable(store).await?;

    let order_status = projector::by_name("order_status")?;
    let failing: Arc<dyn projector::Projection> = Arc::new(Interrupted::new(
        Arc::new(StockLevelsProjection),
        1,
        Stop::FailEvery,
    ));
    project_live_until(
        store,
        vec![failing, order_status.clone()],
        "order_status to catch up",
        || async { Ok(behind(store, order_status.as_ref()).await? == 0) },
    )
    .await?;
    assert!(behind(store, &StockLevelsProjection).await? > 0);
    assert!(
        stock_rows(store).await?.is_empty(),
        "the failing projection's rows were rolled back"
    );
    Ok(())
}

/// Stock of A set to 100, and one order that reserved 7 of it.
async fn seven_of_a_hundred_reserved(store: &eventstore::EventStore) -> anyhow::Result<()> {
    set_stock(store, "A", 100).await?;
    order_reserving(store, 7).await
}

/// An order for `quantity` of A, placed and reserved.
async fn order_reserving(store: &eventstore::EventStore, quantity: i64) -> anyhow::Result<()> {
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", quantity, 10)], true).await?;
    order.reserve_all().await
}
