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
