use eventstore::ExpectedVersion;
use testkit::TestDb;

use crate::support::events;

/// The test connects as `postgres`, a superuser: privileges would not stop it.
async fn refused(db: &TestDb, statement: &str) -> anyhow::Result<bool> {
    let is_superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(db.pool())
            .await?;
    assert!(is_superuser, "this test must run as a superuser");
    Ok(sqlx::query(statement).execute(db.pool()).await.is_err())
}

#[tokio::test]
async fn update_delete_and_truncate_are_refused_even_for_a_superuser() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(2))
        .await?;
    assert!(refused(&db, "UPDATE events SET event_type = 'Tampered'").await?);
    assert!(refused(&db, "DELETE FROM events").await?);
    assert!(refused(&db, "TRUNCATE events").await?);
    // Also when replication mode would skip ordinary triggers.
    let mut tx = eventstore::begin(db.pool()).await?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    assert!(sqlx::query("DELETE FROM events")
        .execute(&mut *tx)
        .await
        .is_err());
    tx.rollback().await?;

    let stored = db.store.read_stream("order-1", 0).await?;
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|e| e.event_type == "Happened"));
    Ok(())
}
