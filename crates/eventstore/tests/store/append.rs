use std::collections::HashSet;

use eventstore::{ExpectedVersion, StoreError, StreamAppend};
use testkit::TestDb;

use crate::support::{event, events};

#[tokio::test]
async fn versions_start_at_zero_and_follow_the_expected_version() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let first = db
        .store
        .append("order-1", ExpectedVersion::NoStream, events(2))
        .await?;
    assert_eq!(first.next_expected_version, 1);
    let second = db
        .store
        .append("order-1", ExpectedVersion::Exact(1), events(1))
        .await?;
    assert_eq!(second.next_expected_version, 2);
    assert!(second.last_global_position > first.last_global_position);
    assert_eq!(db.store.stream_version("order-1").await?, Some(2));
    Ok(())
}

#[tokio::test]
async fn two_writers_with_the_same_expected_version_one_conflicts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    let (a, b) = tokio::join!(
        db.store
            .append("order-1", ExpectedVersion::Exact(0), events(1)),
        db.store
            .append("order-1", ExpectedVersion::Exact(0), events(1)),
    );
    let results = [a, b];
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    let conflict = results.into_iter().find_map(Result::err);
    assert!(
        matches!(
            &conflict,
            Some(StoreError::Conflict { stream, expected: Some(0), actual: Some(1) })
                if stream == "order-1"
        ),
        "{conflict:?}"
    );
    assert_eq!(db.store.stream_version("order-1").await?, Some(1));
    Ok(())
}

#[tokio::test]
async fn exact_version_beyond_the_stream_conflicts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    let result = db
        .store
        .append("order-1", ExpectedVersion::Exact(5), events(1))
        .await;
    assert!(
        matches!(
            result,
            Err(StoreError::Conflict {
                expected: Some(5),
                actual: Some(0),
                ..
            })
        ),
        "{result:?}"
    );
    let missing = db
        .store
        .append("order-2", ExpectedVersion::Exact(0), events(1))
        .await;
    assert!(
        matches!(missing, Err(StoreError::Conflict { actual: None, .. })),
        "{missing:?}"
    );
    Ok(())
}

#[tokio::test]
async fn no_stream_on_an_existing_stream_conflicts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await?;
    let result = db
        .store
        .append("order-1", ExpectedVersion::NoStream, events(1))
        .await;
    assert!(
        matches!(
            result,
            Err(StoreError::Conflict {
                actual: Some(0),
                ..
            })
        ),
        "{result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn many_concurrent_writers_never_produce_duplicate_versions() -> anyhow::Result<()> {
    const WRITERS: usize = 8;
    const APPENDS_EACH: usize = 10;
    let db = TestDb::new().await?;
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            while written < APPENDS_EACH {
                // Half the writers use optimistic concurrency and retry on conflict,
                // the other half append with `Any`.
                let expected = if writer % 2 == 0 {
                    match store.stream_version("stock-sku").await? {
                        Some(v) => ExpectedVersion::Exact(v),
                        None => ExpectedVersion::NoStream,
                    }
                } else {
                    ExpectedVersion::Any
                };
                match store.append("stock-sku", expected, events(1)).await {
                    Ok(_) => written += 1,
                    Err(StoreError::Conflict { .. }) => {}
                    Err(other) => return Err(anyhow::Error::from(other)),
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let stream = db.store.read_stream("stock-sku", 0).await?;
    let versions: Vec<i64> = stream.iter().map(|e| e.stream_version).collect();
    let expected: Vec<i64> = (0..(WRITERS * APPENDS_EACH) as i64).collect();
    assert_eq!(versions, expected);
    Ok(())
}

#[tokio::test]
async fn an_event_id_already_in_the_log_is_a_duplicate() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let placed = event("OrderPlaced");
    db.store
        .append("order-1", ExpectedVersion::NoStream, vec![placed.clone()])
        .await?;

    // A redelivery decides again from the same state: same expected version, same id.
    let again = db
        .store
        .append("order-1", ExpectedVersion::NoStream, vec![placed.clone()])
        .await;
    assert!(
        matches!(again, Err(StoreError::Duplicate { event_id }) if event_id == placed.event_id),
        "{again:?}"
    );
    // The same id on another stream, at a correct version, is still a duplicate.
    let elsewhere = db
        .store
        .append("order-2", ExpectedVersion::NoStream, vec![placed.clone()])
        .await;
    assert!(
        matches!(elsewhere, Err(StoreError::Duplicate { event_id }) if event_id == placed.event_id),
        "{elsewhere:?}"
    );
    assert_eq!(db.store.count().await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_batch_with_one_conflicting_stream_appends_nothing() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(2))
        .await?;
    let result = db
        .store
        .append_batch(vec![
            StreamAppend {
                stream_name: "shipment-1".into(),
                expected_version: ExpectedVersion::NoStream,
                events: events(1),
            },
            StreamAppend {
                stream_name: "order-1".into(),
                expected_version: ExpectedVersion::Exact(0),
                events: events(1),
            },
        ])
        .await;
    assert!(
        matches!(&result, Err(StoreError::Conflict { stream, .. }) if stream == "order-1"),
        "{result:?}"
    );
    assert_eq!(db.store.stream_version("shipment-1").await?, None);
    assert_eq!(db.store.stream_version("order-1").await?, Some(1));
    Ok(())
}

#[tokio::test]
async fn a_batch_appends_to_every_stream_in_one_go() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let result = db
        .store
        .append_batch(vec![
            StreamAppend {
                stream_name: "shipment-1".into(),
                expected_version: ExpectedVersion::NoStream,
                events: events(1),
            },
            StreamAppend {
                stream_name: "order-1".into(),
                expected_version: ExpectedVersion::Any,
                events: events(2),
            },
        ])
        .await?;
    assert_eq!(result.next_expected_version, 1);
    let shipment = db.store.read_stream("shipment-1", 0).await?;
    let order = db.store.read_stream("order-1", 0).await?;
    assert_eq!(shipment.len(), 1);
    assert_eq!(order.len(), 2);
    // One transaction, and positions in the order given.
    assert_eq!(shipment[0].transaction_id, order[0].transaction_id);
    assert!(shipment[0].global_position < order[0].global_position);
    assert_eq!(order[1].global_position, result.last_global_position);
    let ids: HashSet<_> = order.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 2);
    Ok(())
}

/// Known versions go in one statement (no `Any` lock); the outcome is the same as the
/// transactional way's, and a repeat of the same events is a duplicate.
#[tokio::test]
async fn a_batch_on_known_versions_appends_in_one_go_and_its_repeat_is_a_duplicate(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(2))
        .await?;
    let batch = vec![
        StreamAppend {
            stream_name: "order-1".into(),
            expected_version: ExpectedVersion::Exact(1),
            events: events(2),
        },
        StreamAppend {
            stream_name: "shipment-1".into(),
            expected_version: ExpectedVersion::NoStream,
            events: events(1),
        },
    ];
    let result = db.store.append_batch(batch.clone()).await?;
    assert_eq!(result.next_expected_version, 0, "the last stream's version");
    let order = db.store.read_stream("order-1", 0).await?;
    let shipment = db.store.read_stream("shipment-1", 0).await?;
    let versions: Vec<i64> = order.iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, [0, 1, 2, 3]);
    assert_eq!(shipment.len(), 1);
    assert_eq!(order[2].transaction_id, shipment[0].transaction_id);
    assert!(order[3].global_position < shipment[0].global_position);
    assert_eq!(shipment[0].global_position, result.last_global_position);

    let repeat = db.store.append_batch(batch).await;
    assert!(
        matches!(&repeat, Err(StoreError::Duplicate { event_id }) if *event_id == order[2].event_id),
        "{repeat:?}"
    );
    assert_eq!(db.store.count().await?, 5);
    Ok(())
}
