use std::time::Duration;

use eventstore::{ExpectedVersion, Wake};
use testkit::TestDb;

use crate::support::events;

/// Far longer than the test's deadline: a wake-up before it is not the fallback.
const FALLBACK: Duration = Duration::from_secs(30);
const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn an_append_in_this_process_wakes_a_waiting_follower() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut wakeups = db.store.follow().await?;
    let waiter = tokio::spawn(async move { wakeups.wait(FALLBACK).await });
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    let wake = tokio::time::timeout(DEADLINE, waiter).await??;
    assert_eq!(wake, Wake::Signalled);
    Ok(())
}

#[tokio::test]
async fn an_append_in_another_process_wakes_a_follower_by_notify() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // A store of its own, as another process would have: no in-process signal reaches it.
    let other = db.second_store().await?;
    let mut wakeups = other.follow().await?;
    let waiter = tokio::spawn(async move { wakeups.wait(FALLBACK).await });
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    let wake = tokio::time::timeout(DEADLINE, waiter).await??;
    assert_eq!(wake, Wake::Signalled);
    Ok(())
}

#[tokio::test]
async fn without_appends_the_follower_wakes_after_the_fallback_interval() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut wakeups = db.store.follow().await?;
    let wake = tokio::time::timeout(DEADLINE, wakeups.wait(Duration::from_millis(50))).await?;
    assert_eq!(wake, Wake::TimedOut);
    Ok(())
}

#[tokio::test]
async fn a_follower_is_not_woken_again_by_its_own_stores_notification() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut ours = db.store.follow().await?;
    // Another process's follower: woken by the notification alone, so once it wakes,
    // the notification has been sent and ours has had it too.
    let other = db.second_store().await?;
    let mut theirs = other.follow().await?;
    let remote = tokio::spawn(async move { theirs.wait(FALLBACK).await });
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    assert_eq!(
        tokio::time::timeout(DEADLINE, ours.wait(FALLBACK)).await?,
        Wake::Signalled,
        "woken in process by the append"
    );
    assert_eq!(
        tokio::time::timeout(DEADLINE, remote).await??,
        Wake::Signalled
    );
    // The echo of that append would wake ours a second time for nothing.
    assert_eq!(
        ours.wait(Duration::from_millis(300)).await,
        Wake::TimedOut,
        "woken again by its own store's notification"
    );
    // Another store's appends still wake it.
    other
        .append("order-2", ExpectedVersion::NoStream, events(1))
        .await?;
    assert_eq!(
        tokio::time::timeout(DEADLINE, ours.wait(FALLBACK)).await?,
        Wake::Signalled
    );
    Ok(())
}

#[tokio::test]
async fn a_follower_of_projections_wakes_on_a_projected_page_not_on_an_append() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let mut projections = db.store.follow_projections().await?;
    let mut log = db.store.follow().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    assert_eq!(
        tokio::time::timeout(DEADLINE, log.wait(FALLBACK)).await?,
        Wake::Signalled
    );
    assert_eq!(
        projections.wait(Duration::from_millis(300)).await,
        Wake::TimedOut,
        "woken by an append"
    );
    db.store.notify_projected();
    assert_eq!(
        tokio::time::timeout(DEADLINE, projections.wait(FALLBACK)).await?,
        Wake::Signalled
    );
    // Followers of the log are woken by it too.
    assert_eq!(
        tokio::time::timeout(DEADLINE, log.wait(FALLBACK)).await?,
        Wake::Signalled
    );
    Ok(())
}

#[tokio::test]
async fn followers_of_one_store_share_one_listen_and_each_is_woken_from_elsewhere(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut log = db.store.follow().await?;
    let mut again = db.store.follow().await?;
    let mut projections = db.store.follow_projections().await?;
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
          WHERE datname = current_database() AND query ILIKE 'LISTEN %'",
    )
    .fetch_one(db.pool())
    .await?;
    assert_eq!(
        listening, 1,
        "LISTEN connections of three followers of one store"
    );
    // Another process's append reaches this one by the notification alone.
    let other = db.second_store().await?;
    other
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    for (name, follower) in [
        ("log", &mut log),
        ("again", &mut again),
        ("projections", &mut projections),
    ] {
        assert_eq!(
            tokio::time::timeout(DEADLINE, follower.wait(FALLBACK)).await?,
            Wake::Signalled,
            "{name}"
        );
    }
    Ok(())
}
