use eventstore::{ExpectedVersion, LogPosition, StoreError, StreamAppend};
use testkit::TestDb;

use crate::support::{event, events, follow_until, DEADLINE};

#[tokio::test]
async fn read_all_pages_return_every_event_exactly_once_in_order() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    for i in 0..5 {
        db.store
            .append_batch(vec![
                StreamAppend {
                    stream_name: format!("order-{i}"),
                    expected_version: ExpectedVersion::NoStream,
                    events: events(3),
                },
                StreamAppend {
                    stream_name: "stock-sku".into(),
                    expected_version: ExpectedVersion::Any,
                    events: events(1),
                },
            ])
            .await?;
    }
    let seen = follow_until(&db.store, LogPosition::START, 3, 20).await?;
    assert_eq!(seen.len(), 20);
    let positions: Vec<_> = seen.iter().map(|e| e.log_position()).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(positions, sorted, "strictly increasing, no repeats");
    let versions: Vec<i64> = seen
        .iter()
        .filter(|e| e.stream_name == "stock-sku")
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, vec![0, 1, 2, 3, 4]);
    assert_eq!(db.store.head().await?, seen[19].global_position);
    Ok(())
}

#[tokio::test]
async fn read_stream_starts_at_the_given_version() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let appended = events(5);
    db.store
        .append("order-1", ExpectedVersion::NoStream, appended.clone())
        .await?;
    db.store
        .append("order-2", ExpectedVersion::NoStream, events(1))
        .await?;
    let tail = db.store.read_stream("order-1", 3).await?;
    let versions: Vec<i64> = tail.iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, vec![3, 4]);
    assert_eq!(tail[0].event_id, appended[3].event_id);
    assert_eq!(tail[0].payload, appended[3].payload);
    assert_eq!(tail[0].metadata, appended[3].metadata);
    assert!(db.store.read_stream("order-3", 0).await?.is_empty());
    assert_eq!(db.store.stream_version("order-3").await?, None);
    Ok(())
}

#[tokio::test]
async fn read_stream_page_reads_at_most_its_limit_from_the_given_version() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append("order-1", ExpectedVersion::NoStream, events(7))
        .await?;
    let versions = |page: Vec<eventstore::RecordedEvent>| -> Vec<i64> {
        page.iter().map(|e| e.stream_version).collect()
    };
    assert_eq!(
        versions(db.store.read_stream_page("order-1", 0, 3).await?),
        [0, 1, 2]
    );
    assert_eq!(
        versions(db.store.read_stream_page("order-1", 3, 3).await?),
        [3, 4, 5]
    );
    assert_eq!(
        versions(db.store.read_stream_page("order-1", 6, 3).await?),
        [6]
    );
    assert!(db.store.read_stream_page("order-1", 7, 3).await?.is_empty());
    assert!(db.store.read_stream_page("order-1", 0, 0).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn stream_has_event_type_tells_whether_a_type_was_ever_recorded() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.store
        .append(
            "stock-apple",
            ExpectedVersion::NoStream,
            vec![event("StockSet")],
        )
        .await?;
    assert!(
        db.store
            .stream_has_event_type("stock-apple", "StockSet")
            .await?
    );
    assert!(
        !db.store
            .stream_has_event_type("stock-apple", "StockReserved")
            .await?
    );
    assert!(
        !db.store
            .stream_has_event_type("stock-pear", "StockSet")
            .await?
    );
    let set = db
        .store
        .streams_with_event_type(&["stock-apple".into(), "stock-pear".into()], "StockSet")
        .await?;
    assert_eq!(set, vec!["stock-apple".to_string()]);
    Ok(())
}

#[tokio::test]
async fn read_all_text_returns_the_same_events_with_the_payload_as_json_text() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let mut appended = events(3);
    appended[1].payload = serde_json::json!({ "text": "a \"quoted\" ü", "list": [1, 2.5, null] });
    db.store
        .append("order-1", ExpectedVersion::NoStream, appended)
        .await?;
    let values = follow_until(&db.store, LogPosition::START, 10, 3).await?;
    let texts = db.store.read_all_text(LogPosition::START, 10).await?;
    assert_eq!(texts.len(), 3);
    for (value, text) in values.iter().zip(&texts) {
        let parsed: serde_json::Value = serde_json::from_str(&text.payload)?;
        assert_eq!(parsed, value.payload);
        assert_eq!(text.log_position(), value.log_position());
        assert_eq!(
            (
                text.event_id,
                &text.stream_name,
                text.stream_version,
                text.metadata
            ),
            (
                value.event_id,
                &value.stream_name,
                value.stream_version,
                value.metadata
            )
        );
        assert_eq!(text.recorded_at, value.recorded_at);
    }
    // pages continue from a position as read_all's do
    let rest = db.store.read_all_text(texts[0].log_position(), 10).await?;
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].event_id, texts[1].event_id);
    Ok(())
}

/// A row whose metadata lacks an id or holds a bad one is reported with its position,
/// by both readers alike.
#[tokio::test]
async fn malformed_metadata_is_reported_with_the_event_s_position() -> anyhow::Result<()> {
    for metadata in [
        r#"{"correlation_id": "00000000-0000-0000-0000-000000000000"}"#,
        r#"{"correlation_id": "not a uuid", "causation_id": "00000000-0000-0000-0000-000000000000"}"#,
    ] {
        let db = TestDb::new().await?;
        let position: i64 = sqlx::query_scalar(
            "INSERT INTO events (stream_name, stream_version, event_id, event_type, \
                                 schema_version, payload, metadata) \
             VALUES ('odd', 0, gen_random_uuid(), 'Odd', 1, '{}', $1::jsonb) \
             RETURNING global_position",
        )
        .bind(metadata)
        .fetch_one(db.pool())
        .await?;
        // Both readers see the row only once no older transaction on the server (any
        // test's) is still open: wait until neither reads nothing.
        let outcomes = testkit::wait_until("the odd row to be readable", DEADLINE, || async {
            let outcomes = [
                db.store
                    .read_all_text(LogPosition::START, 10)
                    .await
                    .map(|page| page.len()),
                db.store
                    .read_all(LogPosition::START, 10)
                    .await
                    .map(|page| page.len()),
            ];
            let read_nothing = outcomes.iter().any(|outcome| matches!(outcome, Ok(0)));
            Ok((!read_nothing).then_some(outcomes))
        })
        .await?;
        for outcome in outcomes {
            match outcome {
                Err(StoreError::Malformed {
                    global_position, ..
                }) => assert_eq!(global_position, position, "{metadata}"),
                other => panic!("expected Malformed for {metadata}, got {other:?}"),
            }
        }
    }
    Ok(())
}
