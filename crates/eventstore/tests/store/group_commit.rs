//! Group commit (`EventStore::with_group_commit`): appends made while every slot is busy
//! go to PostgreSQL in one statement, and each keeps the outcome it would have had alone.
//!
//! The tests hold the only slot deterministically: a transaction of the test's own
//! inserts version 0 of a stream without committing, and the store's append of that
//! stream waits on the unique key. Appends made meanwhile queue; when the test rolls
//! back, the held append goes through and the queued ones form one batch.

use eventstore::{AppendResult, EventStore, ExpectedVersion, NewEvent, StoreError};
use sqlx::{Connection, PgConnection};
use testkit::TestDb;
use tokio::task::JoinHandle;

use crate::support::{event, events, DEADLINE};

type Outcome = Result<AppendResult, StoreError>;

/// The only slot, held until [`Held::release`].
struct Held {
    blocker: PgConnection,
    append: JoinHandle<Outcome>,
}

impl Held {
    async fn take(db: &TestDb, store: &EventStore) -> anyhow::Result<Held> {
        let mut blocker = PgConnection::connect(db.url()).await?;
        sqlx::query("BEGIN").execute(&mut blocker).await?;
        sqlx::query(
            "INSERT INTO events (stream_name, stream_version, event_id, event_type, \
                                 schema_version, payload, metadata) \
             VALUES ('held', 0, gen_random_uuid(), 'Held', 1, '{}', \
                     '{\"correlation_id\": \"00000000-0000-0000-0000-000000000000\", \
                       \"causation_id\": \"00000000-0000-0000-0000-000000000000\"}')",
        )
        .execute(&mut blocker)
        .await?;
        let append = spawn_append(store, "held", ExpectedVersion::NoStream, events(1));
        testkit::wait_until("the held append to wait on the lock", DEADLINE, || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(db.pool())
            .await?;
            Ok((waiting > 0).then_some(()))
        })
        .await?;
        Ok(Held { blocker, append })
    }

    /// Rolls the test's insert back: the held append is written, the slot is free.
    async fn release(mut self) -> anyhow::Result<()> {
        sqlx::query("ROLLBACK").execute(&mut self.blocker).await?;
        let held = self.append.await?;
        anyhow::ensure!(held.is_ok(), "the held append failed: {held:?}");
        Ok(())
    }
}

fn spawn_append(
    store: &EventStore,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> JoinHandle<Outcome> {
    let store = store.clone();
    let stream = stream.to_owned();
    tokio::spawn(async move { store.append(&stream, expected, events).await })
}

/// Queues `appends` behind the held slot, releases it, and returns their outcomes.
async fn queued_behind_a_held_slot(
    db: &TestDb,
    appends: Vec<(&str, ExpectedVersion, Vec<NewEvent>)>,
) -> anyhow::Result<Vec<Outcome>> {
    let store = db.store.clone().with_group_commit(1);
    let held = Held::take(db, &store).await?;
    let count = appends.len();
    let mut tasks = Vec::new();
    for (stream, expected, events) in appends {
        tasks.push(spawn_append(&store, stream, expected, events));
        // In order: each one queued before the next is made.
        let want = tasks.len();
        testkit::wait_until("the append to queue", DEADLINE, || async {
            Ok((store.appends_waiting() == want).then_some(()))
        })
        .await?;
    }
    assert_eq!(store.appends_waiting(), count);
    held.release().await?;
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await?);
    }
    Ok(outcomes)
}

/// The stream's version after a successful append.
fn version_after(outcome: &Outcome) -> Option<i64> {
    outcome.as_ref().ok().map(|r| r.next_expected_version)
}

async fn transactions_of(db: &TestDb, streams: &[&str]) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT transaction_id) FROM events WHERE stream_name = ANY($1)",
    )
    .bind(streams)
    .fetch_one(db.pool())
    .await?)
}

#[tokio::test]
async fn appends_queued_while_the_slot_is_busy_are_written_in_one_transaction() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    db.store
        .append("order-b", ExpectedVersion::NoStream, events(2))
        .await?;
    let outcomes = queued_behind_a_held_slot(
        &db,
        vec![
            ("order-a", ExpectedVersion::NoStream, events(3)),
            ("order-b", ExpectedVersion::Exact(1), events(1)),
            ("order-c", ExpectedVersion::NoStream, events(1)),
        ],
    )
    .await?;
    let versions: Vec<_> = outcomes.iter().map(version_after).collect();
    assert_eq!(versions, vec![Some(2), Some(2), Some(0)], "{outcomes:?}");
    assert_eq!(
        transactions_of(&db, &["order-a", "order-b", "order-c"]).await?,
        2
    );
    // The batch's events follow the order the appends were made in.
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT stream_name FROM events WHERE stream_name IN ('order-a', 'order-c') \
            OR (stream_name = 'order-b' AND stream_version = 2) ORDER BY global_position",
    )
    .fetch_all(db.pool())
    .await?;
    assert_eq!(
        order,
        ["order-a", "order-a", "order-a", "order-b", "order-c"]
    );
    let positions: Vec<i64> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().map(|r| r.last_global_position))
        .collect();
    let last: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(positions.iter().max(), Some(&last));
    Ok(())
}

#[tokio::test]
async fn in_a_batch_a_stale_expectation_conflicts_and_a_repeat_is_a_duplicate_alone(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("stock-stale", ExpectedVersion::NoStream, events(1))
        .await?;
    let handled_before = vec![event("Reserved")];
    db.store
        .append(
            "stock-again",
            ExpectedVersion::NoStream,
            handled_before.clone(),
        )
        .await?;
    let outcomes = queued_behind_a_held_slot(
        &db,
        vec![
            ("stock-fresh", ExpectedVersion::NoStream, events(1)),
            ("stock-stale", ExpectedVersion::NoStream, events(1)),
            (
                "stock-again",
                ExpectedVersion::NoStream,
                handled_before.clone(),
            ),
        ],
    )
    .await?;
    assert_eq!(version_after(&outcomes[0]), Some(0), "{outcomes:?}");
    assert!(
        matches!(&outcomes[1], Err(StoreError::Conflict { stream, expected: None, actual: Some(0) }) if stream == "stock-stale"),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[2], Err(StoreError::Duplicate { event_id }) if *event_id == handled_before[0].event_id),
        "{outcomes:?}"
    );
    assert_eq!(db.store.stream_version("stock-stale").await?, Some(0));
    assert_eq!(db.store.stream_version("stock-again").await?, Some(0));
    Ok(())
}

#[tokio::test]
async fn two_appends_to_one_stream_in_the_queue_one_conflicts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let outcomes = queued_behind_a_held_slot(
        &db,
        vec![
            ("order-1", ExpectedVersion::NoStream, events(1)),
            ("order-2", ExpectedVersion::NoStream, events(1)),
            ("order-1", ExpectedVersion::NoStream, events(2)),
        ],
    )
    .await?;
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
    assert!(
        matches!(&outcomes[2], Err(StoreError::Conflict { stream, expected: None, actual: Some(0) }) if stream == "order-1"),
        "{outcomes:?}"
    );
    assert_eq!(db.store.stream_version("order-1").await?, Some(0));
    Ok(())
}

#[tokio::test]
async fn a_batch_refused_as_a_whole_is_sent_again_append_by_append() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // An event id already used on another stream: the version check passes, the unique
    // key on event_id fails the whole statement.
    let used = event("Placed");
    db.store
        .append(
            "order-elsewhere",
            ExpectedVersion::NoStream,
            vec![used.clone()],
        )
        .await?;
    let outcomes = queued_behind_a_held_slot(
        &db,
        vec![
            ("order-x", ExpectedVersion::NoStream, events(1)),
            ("order-y", ExpectedVersion::NoStream, vec![used.clone()]),
            ("order-z", ExpectedVersion::NoStream, events(2)),
        ],
    )
    .await?;
    assert_eq!(version_after(&outcomes[0]), Some(0), "{outcomes:?}");
    assert!(
        matches!(&outcomes[1], Err(StoreError::Duplicate { event_id }) if *event_id == used.event_id),
        "{outcomes:?}"
    );
    assert_eq!(version_after(&outcomes[2]), Some(1), "{outcomes:?}");
    assert_eq!(db.store.stream_version("order-y").await?, None);
    Ok(())
}
