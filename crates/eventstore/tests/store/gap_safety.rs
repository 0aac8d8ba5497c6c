//! The reason `read_all` orders by transaction id and stops below the oldest running
//! transaction: positions are handed out before commit, so commits can land out of order.

use eventstore::{ExpectedVersion, LogPosition, StreamAppend};
use testkit::TestDb;

use crate::support::{events, follow_until};

#[tokio::test]
async fn a_late_commit_with_a_lower_position_is_not_skipped() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;

    // The follower is up to date with an earlier event.
    store
        .append("order-0", ExpectedVersion::NoStream, events(1))
        .await?;
    let before = follow_until(store, LogPosition::START, 100, 1).await?;
    let checkpoint = before[0].log_position();

    // A takes a position and stays open.
    let mut tx_a = eventstore::begin(store.pool()).await?;
    let a = store
        .append_batch_in(
            &mut tx_a,
            &[StreamAppend {
                stream_name: "order-a".into(),
                expected_version: ExpectedVersion::NoStream,
                events: events(1),
            }],
        )
        .await?;
    // B takes a higher position and commits first.
    let b = store
        .append("order-b", ExpectedVersion::NoStream, events(1))
        .await?;
    assert!(a.last_global_position < b.last_global_position);

    // B is committed but must not be handed out yet: a follower would checkpoint past it
    // and never see A.
    let early = store.read_all(checkpoint, 100).await?;
    assert!(
        early.is_empty(),
        "read_all returned {:?} while A was open",
        early.iter().map(|e| &e.stream_name).collect::<Vec<_>>()
    );

    tx_a.commit().await?;
    store.notify_appended();

    let after = follow_until(store, checkpoint, 100, 2).await?;
    let streams: Vec<&str> = after.iter().map(|e| e.stream_name.as_str()).collect();
    assert_eq!(streams, vec!["order-a", "order-b"]);
    Ok(())
}
