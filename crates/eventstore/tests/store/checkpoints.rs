use eventstore::LogPosition;
use testkit::TestDb;

#[tokio::test]
async fn a_checkpoint_starts_at_start_and_keeps_what_was_saved() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    assert_eq!(
        db.store.load_checkpoint("projector").await?,
        LogPosition::START
    );

    let position = LogPosition {
        transaction_id: 42,
        global_position: 7,
    };
    let mut tx = eventstore::begin(db.pool()).await?;
    db.store
        .save_checkpoint(&mut tx, "projector", position)
        .await?;
    // Not visible before the caller's transaction commits.
    assert_eq!(
        db.store.load_checkpoint("projector").await?,
        LogPosition::START
    );
    tx.commit().await?;
    assert_eq!(db.store.load_checkpoint("projector").await?, position);

    db.store.reset_checkpoint("projector").await?;
    assert_eq!(
        db.store.load_checkpoint("projector").await?,
        LogPosition::START
    );
    Ok(())
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_the_checkpoint_as_it_was() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let saved = LogPosition {
        transaction_id: 1,
        global_position: 1,
    };
    let mut conn = db.pool().acquire().await?;
    db.store.save_checkpoint(&mut conn, "relay", saved).await?;
    drop(conn);

    let mut tx = eventstore::begin(db.pool()).await?;
    assert_eq!(db.store.lock_checkpoint(&mut tx, "relay").await?, saved);
    let later = LogPosition {
        transaction_id: 2,
        global_position: 9,
    };
    db.store.save_checkpoint(&mut tx, "relay", later).await?;
    tx.rollback().await?;
    assert_eq!(db.store.load_checkpoint("relay").await?, saved);
    Ok(())
}

/// Followers take turns on a checkpoint, and holding one's turn gives the transaction
/// no xid: readers of the log wait for the oldest xid, so a follower's reads must not
/// hold them back.
#[tokio::test]
async fn followers_take_turns_on_a_checkpoint_without_holding_back_readers() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut first = eventstore::begin(db.pool()).await?;
    assert_eq!(
        db.store.lock_checkpoint(&mut first, "projector").await?,
        LogPosition::START
    );
    let xid: Option<String> = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned()::text")
        .fetch_one(&mut *first)
        .await?;
    assert_eq!(xid, None, "holding a checkpoint must not take an xid");

    let mut second = eventstore::begin(db.pool()).await?;
    assert!(
        !db.store
            .try_lock_checkpoint(&mut second, "projector")
            .await?,
        "the second follower must wait for its turn"
    );
    second.rollback().await?;

    let saved = LogPosition {
        transaction_id: 3,
        global_position: 5,
    };
    db.store
        .save_checkpoint(&mut first, "projector", saved)
        .await?;
    first.commit().await?;

    let mut second = eventstore::begin(db.pool()).await?;
    assert!(
        db.store
            .try_lock_checkpoint(&mut second, "projector")
            .await?,
        "the turn is free once the first follower committed"
    );
    assert_eq!(db.store.load_checkpoint("projector").await?, saved);
    Ok(())
}

/// A follower that did not read its checkpoint under the lock moves it only from
/// where it left it: a turn taken by another instance, or a reset, in between makes
/// the move refuse, and nothing is saved.
#[tokio::test]
async fn a_checkpoint_advances_only_from_where_the_follower_left_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let at = |n: i64| LogPosition {
        transaction_id: n,
        global_position: n,
    };
    let advance = |from: LogPosition, to: LogPosition| {
        let store = db.store.clone();
        async move {
            let mut tx = eventstore::begin(store.pool()).await?;
            let moved = store
                .advance_checkpoint(&mut tx, "follower", from, to)
                .await?;
            tx.commit().await?;
            anyhow::Ok(moved)
        }
    };

    // from the start, with no row yet: the row is created
    assert!(advance(LogPosition::START, at(2)).await?);
    assert_eq!(db.store.load_checkpoint("follower").await?, at(2));
    // a second instance that also believed it was at the start is refused
    assert!(!advance(LogPosition::START, at(1)).await?);
    // from where it is: moved
    assert!(advance(at(2), at(4)).await?);
    // from a stale position: refused, the checkpoint stays
    assert!(!advance(at(2), at(9)).await?);
    assert_eq!(db.store.load_checkpoint("follower").await?, at(4));

    // after a reset (no row), only a follower starting from the start may move it
    db.store.reset_checkpoint("follower").await?;
    assert!(!advance(at(4), at(6)).await?);
    assert_eq!(
        db.store.load_checkpoint("follower").await?,
        LogPosition::START
    );
    assert!(advance(LogPosition::START, at(1)).await?);
    assert_eq!(db.store.load_checkpoint("follower").await?, at(1));
    Ok(())
}
