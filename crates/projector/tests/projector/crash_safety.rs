use std::sync::Arc;

use projector::Projection;
use testkit::TestDb;

use crate::support::*;

#[tokio::test]
async fn a_page_that_fails_mid_transaction_is_applied_once_after_the_restart() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let store = &db.store;
    let expected_stock = big_log(store).await?;
    let total = store.count().await?;
    assert!(
        total > 2 * projector::PAGE_SIZE,
        "the log spans more than two pages"
    );
    wait_readable(store).await?;

    for projection in projector::all_projections() {
        let failing = Interrupted::new(projection.clone(), 2, Stop::Fail);
        // the first page commits
        let first = projector::run_once(store, &failing).await?;
        assert_eq!(i64::try_from(first)?, projector::PAGE_SIZE);
        let after_first = behind(store, projection.as_ref()).await?;
        assert_eq!(after_first, total - projector::PAGE_SIZE);
        // the second page is written, then its transaction fails
        let failed = projector::run_once(store, &failing).await;
        assert!(failed.is_err(), "the injected failure surfaces");
        assert_eq!(
            behind(store, projection.as_ref()).await?,
            after_first,
            "a failed page leaves the checkpoint where it was"
        );
    }
    // restart: the plain projections from their checkpoints
    catch_up_all(store).await?;
    let live = all_rows(store).await?;
    assert_eq!(live.1, expected_stock, "no reservation counted twice");
    replay_all(store).await?;
    assert_eq!(
        all_rows(store).await?,
        live,
        "a one-shot replay gives the same rows"
    );
    Ok(())
}

#[tokio::test]
async fn a_projector_killed_in_the_middle_of_a_page_resumes_from_its_checkpoint(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let expected_stock = big_log(store).await?;
    let total = store.count().await?;

    wait_readable(store).await?;

    let held: Vec<Arc<Interrupted>> = projector::all_projections()
        .into_iter()
        .map(|p| Arc::new(Interrupted::new(p, 2, Stop::Hold)))
        .collect();
    let running = tokio::spawn(projector::run(
        store.clone(),
        held.iter()
            .map(|p| p.clone() as Arc<dyn Projection>)
            .collect(),
        std::future::pending(),
    ));
    // The projections apply a page together, in the order given: once the first is in
    // the middle of page 2, all of them have committed page 1. Crash there.
    let first = held
        .first()
        .ok_or_else(|| anyhow::anyhow!("no projections"))?;
    tokio::time::timeout(DEADLINE, first.reached.notified()).await?;
    running.abort();
    assert!(running.await.is_err_and(|e| e.is_cancelled()));

    for p in &held {
        assert_eq!(
            behind(store, p.as_ref()).await?,
            total - projector::PAGE_SIZE,
            "{}: exactly the first page is committed",
            p.name()
        );
    }
    catch_up_all(store).await?;
    let live = all_rows(store).await?;
    assert_eq!(live.1, expected_stock, "no reservation counted twice");
    replay_all(store).await?;
    assert_eq!(
        all_rows(store).await?,
        live,
        "a one-shot replay gives the same rows"
    );
    Ok(())
}
