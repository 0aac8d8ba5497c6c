use std::sync::Arc;

use projector::stock_levels::StockLevelsProjection;
use testkit::TestDb;

use crate::support::*;

#[tokio::test]
async fn a_second_instance_waits_for_the_first_and_does_not_apply_its_page_again(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 100).await?;
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", 7, 10)], true).await?;
    order.reserve_all().await?;
    let total = store.count().await?;
    testkit::wait_until("the log to be readable", DEADLINE, || async {
        let visible = store
            .read_all(eventstore::LogPosition::START, total)
            .await?
            .len();
        Ok((i64::try_from(visible)? == total).then_some(()))
    })
    .await?;

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
