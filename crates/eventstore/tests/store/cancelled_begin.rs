//! A transaction whose start is cancelled half-way must not leave the pooled connection
//! inside a transaction: later single-statement writes on it would never commit.
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use testkit::TestDb;

const ROUNDS: u64 = 300;

#[tokio::test]
async fn writes_after_a_cancelled_begin_are_committed() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    sqlx::query("CREATE TABLE written (n bigint PRIMARY KEY)")
        .execute(db.pool())
        .await?;
    // One connection, so every write reuses the connection the cancelled begin had.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(db.url())
        .await?;
    for n in 0..ROUNDS {
        // Cancelled after a varying delay: before, during and after `BEGIN` is answered.
        let cut_after = Duration::from_micros(n % 60 * 10);
        let _ = tokio::time::timeout(cut_after, eventstore::begin(&pool)).await;
        sqlx::query("INSERT INTO written (n) VALUES ($1)")
            .bind(i64::try_from(n)?)
            .execute(&pool)
            .await?;
    }
    // Closing the pool ends whatever its connection still had open.
    pool.close().await;
    let mut observer = PgConnection::connect(db.url()).await?;
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM written")
        .fetch_one(&mut observer)
        .await?;
    assert_eq!(
        committed,
        i64::try_from(ROUNDS)?,
        "writes made after a cancelled begin were lost"
    );
    Ok(())
}
