//! Snapshots of stock streams: a cache that starts a stream from its snapshot folds
//! only the events after it, a snapshot of another format or of another history is
//! ignored, and deciding on a long stream leaves snapshots as it goes.
use domain::{stock, streams, DomainEvent, Evolve, StockInput, StockState};
use eventstore::EventStore;
use services::exec::{decide_on_cached, load_cached, Cause, StreamCache};
use services::snapshots::{decode_stock, encode_stock, Snapshots, STOCK_FORMAT};
use testkit::TestDb;
use uuid::Uuid;

/// Snapshots every `every` events.
fn snapshots(every: i64) -> Snapshots<StockState> {
    Snapshots::new(STOCK_FORMAT, every, encode_stock, decode_stock)
}

/// A `stock.set` of 1,000 units on `stream`, then `reservations` reservations of one
/// unit, each decided on `cache`.
async fn reserve_many(
    store: &EventStore,
    cache: &StreamCache<StockState>,
    stream: &str,
    reservations: usize,
) -> anyhow::Result<()> {
    let set = StockInput::Set {
        sku: "A".into(),
        quantity: 1_000,
    };
    let cause = Cause::new(Uuid::new_v4(), Uuid::new_v4(), "stock.set");
    decide_on_cached(store, cache, stream, &cause, move |s| {
        stock::decide(s, set.clone())
    })
    .await?;
    for _ in 0..reservations {
        let input = StockInput::Reserve {
            sku: "A".into(),
            order_id: Uuid::new_v4(),
            line: 0,
            quantity: 1,
        };
        let cause = Cause::new(Uuid::new_v4(), Uuid::new_v4(), "inventory.reserve.0");
        decide_on_cached(store, cache, stream, &cause, move |s| {
            stock::decide(s, input.clone())
        })
        .await?;
    }
    Ok(())
}

/// The stream folded from its start up to `version` (inclusive).
async fn fold_to(store: &EventStore, stream: &str, version: i64) -> anyhow::Result<StockState> {
    let mut state = StockState::default();
    for record in store.read_stream(stream, 0).await? {
        if record.stream_version > version {
            break;
        }
        let event =
            DomainEvent::decode(&record.event_type, record.schema_version, &record.payload)?;
        state.apply(&event);
    }
    Ok(state)
}

/// Writes a snapshot of `state` at `version` as the event at that version, or as
/// `event_id` when given.
async fn write_snapshot(
    db: &TestDb,
    stream: &str,
    format: &str,
    (version, event_id): (i64, Option<Uuid>),
    state: &StockState,
) -> anyhow::Result<()> {
    let written = sqlx::query(
        "INSERT INTO stream_snapshots (stream_name, format, version, event_id, state)
         SELECT $1, $2, $3, coalesce($4, e.event_id), $5 FROM events e
          WHERE e.stream_name = $1 AND e.stream_version = $3",
    )
    .bind(stream)
    .bind(format)
    .bind(version)
    .bind(event_id)
    .bind(encode_stock(state)?)
    .execute(db.pool())
    .await?;
    anyhow::ensure!(
        written.rows_affected() == 1,
        "{stream} has no version {version}"
    );
    Ok(())
}

async fn snapshot_row(
    db: &TestDb,
    stream: &str,
) -> anyhow::Result<Option<(String, i64, serde_json::Value)>> {
    Ok(
        sqlx::query_as(
            "SELECT format, version, state FROM stream_snapshots WHERE stream_name = $1",
        )
        .bind(stream)
        .fetch_optional(db.pool())
        .await?,
    )
}

#[tokio::test]
async fn deciding_on_a_long_stream_leaves_a_snapshot_every_so_many_events() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let cache = StreamCache::with_snapshots(16, snapshots(10));
    // Versions 0 (the set) to 25: snapshots are due at 9 and at 19, not yet at 25.
    reserve_many(&db.store, &cache, &stream, 25).await?;

    let Some((format, version, state)) = snapshot_row(&db, &stream).await? else {
        anyhow::bail!("no snapshot of {stream} after 26 events");
    };
    assert_eq!(format, STOCK_FORMAT);
    assert_eq!(version, 19);
    assert_eq!(
        decode_stock(state, version),
        Some(fold_to(&db.store, &stream, 19).await?),
        "the snapshot is the stream folded to its version"
    );
    Ok(())
}

/// Stock stream `A` of 30 events (versions 0 to 29), decided without snapshots.
async fn thirty_events(db: &TestDb) -> anyhow::Result<String> {
    let stream = streams::stock("A");
    reserve_many(&db.store, &StreamCache::new(16), &stream, 29).await?;
    Ok(stream)
}

/// A snapshot of the stream at `at` (version, and the event id it names: the log's
/// when `None`) that says 5,000 units were on hand, which no fold of the stream says.
async fn marked_snapshot(
    db: &TestDb,
    stream: &str,
    format: &str,
    at: (i64, Option<Uuid>),
) -> anyhow::Result<()> {
    let mut marked = fold_to(&db.store, stream, at.0).await?;
    marked.on_hand = 5_000;
    write_snapshot(db, stream, format, at, &marked).await
}

/// A cache that meets the stream's snapshot ignores it: it folds the stream from its
/// start, and replaces the snapshot with its own (due: it snapshots every 10 events).
async fn ignored_and_replaced(db: &TestDb, stream: &str) -> anyhow::Result<()> {
    let fresh = StreamCache::with_snapshots(16, snapshots(10));
    let loaded = load_cached(&db.store, &fresh, stream).await?;
    let truth = fold_to(&db.store, stream, 29).await?;
    assert_eq!(loaded.state, truth, "folded from the stream's start");

    let Some((format, version, state)) = snapshot_row(db, stream).await? else {
        anyhow::bail!("the snapshot of {stream} is gone");
    };
    assert_eq!((format.as_str(), version), (STOCK_FORMAT, 29), "replaced");
    assert_eq!(decode_stock(state, version), Some(truth));
    Ok(())
}

#[tokio::test]
async fn a_stream_not_cached_starts_from_its_snapshot_and_folds_only_what_follows(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = thirty_events(&db).await?;
    // At version 19; a fold from the stream's start would say 971 units on hand.
    marked_snapshot(&db, &stream, STOCK_FORMAT, (19, None)).await?;

    let fresh = StreamCache::with_snapshots(16, snapshots(1_000));
    let loaded = load_cached(&db.store, &fresh, &stream).await?;
    assert_eq!(loaded.version, Some(29));
    // The ten reservations after the snapshot, one unit each.
    assert_eq!(loaded.state.on_hand, 5_000 - 10);
    let truth = fold_to(&db.store, &stream, 29).await?;
    assert_eq!(loaded.state.reservations, truth.reservations);
    assert_eq!(loaded.state.reserved, truth.reserved);
    Ok(())
}

#[tokio::test]
async fn a_snapshot_of_another_format_is_ignored_and_replaced() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = thirty_events(&db).await?;
    marked_snapshot(&db, &stream, "stock/0", (19, None)).await?;
    ignored_and_replaced(&db, &stream).await
}

/// A snapshot whose event at its version is another than the log's (the log was
/// restored to an earlier point, and the stream went on differently) folds another
/// history: it is ignored and replaced.
#[tokio::test]
async fn a_snapshot_of_another_history_is_ignored_and_replaced() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = thirty_events(&db).await?;
    // At the stream's last version: only its event tells it from the log's.
    marked_snapshot(&db, &stream, STOCK_FORMAT, (29, Some(Uuid::new_v4()))).await?;
    ignored_and_replaced(&db, &stream).await
}
