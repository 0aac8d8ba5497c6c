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
    assert_eq!(
        db.store
            .try_lock_checkpoint(&mut second, "projector")
            .await?,
        None,
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
    assert_eq!(
        db.store
            .try_lock_checkpoint(&mut second, "projector")
            .await?,
        Some(saved),
        "the next turn starts where the previous one saved"
    );
    Ok(())
}
