use domain::{stock, streams, DomainEvent, StockInput, StockState};
use services::exec::{decide_on, decide_on_cached, load, Cause, Decided, StreamCache};
use testkit::TestDb;
use uuid::Uuid;

fn set(quantity: i64) -> impl Fn(&StockState) -> Vec<DomainEvent> {
    move |s| {
        stock::decide(
            s,
            StockInput::Set {
                sku: "A".into(),
                quantity,
            },
        )
    }
}

fn reserve(order_id: Uuid, quantity: i64) -> impl Fn(&StockState) -> Vec<DomainEvent> {
    move |s| {
        stock::decide(
            s,
            StockInput::Reserve {
                sku: "A".into(),
                order_id,
                line: 0,
                quantity,
            },
        )
    }
}

fn cause(handler: &str) -> Cause {
    Cause::new(Uuid::new_v4(), Uuid::new_v4(), handler)
}

#[tokio::test]
async fn concurrent_reservations_on_one_sku_are_serialised_and_never_oversell() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    decide_on(&db.store, &stream, &cause("stock.set"), set(10)).await?;

    const BUYERS: usize = 16;
    let mut buyers = tokio::task::JoinSet::new();
    for _ in 0..BUYERS {
        let (store, stream) = (db.store.clone(), stream.clone());
        buyers.spawn(async move {
            decide_on(
                &store,
                &stream,
                &cause("inventory.reserve.0"),
                reserve(Uuid::new_v4(), 1),
            )
            .await
        });
    }
    let (mut reserved, mut failed) = (0, 0);
    while let Some(result) = buyers.join_next().await {
        match result??.events() {
            [DomainEvent::StockReserved(_)] => reserved += 1,
            [DomainEvent::StockReservationFailed(_)] => failed += 1,
            other => anyhow::bail!("unexpected decision {other:?}"),
        }
    }
    assert_eq!(
        (reserved, failed),
        (10, BUYERS - 10),
        "total reserved is min(demand, stock)"
    );

    let loaded = load::<StockState>(&db.store, &stream).await?;
    assert_eq!((loaded.state.on_hand, loaded.state.reserved), (0, 10));
    let log = db.store.read_stream(&stream, 0).await?;
    assert_eq!(
        log.len(),
        1 + BUYERS,
        "one event per decision, none lost or doubled"
    );
    let versions: Vec<i64> = log.iter().map(|r| r.stream_version).collect();
    assert_eq!(versions, (0..=i64::try_from(BUYERS)?).collect::<Vec<_>>());
    // on_hand never went below zero at any point of the stream
    let mut state = StockState::default();
    for rec in &log {
        let event = DomainEvent::decode(&rec.event_type, rec.schema_version, &rec.payload)?;
        domain::Evolve::apply(&mut state, &event);
        assert!(
            state.on_hand >= 0,
            "on_hand {} at version {}",
            state.on_hand,
            rec.stream_version
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_same_cause_handled_twice_appends_once_even_after_other_writers() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let first_set = cause("stock.set");
    let decided = decide_on(&db.store, &stream, &first_set, set(10)).await?;
    assert!(matches!(decided, Decided::Appended { .. }));

    // another writer moves the stream on, then the first message is redelivered
    decide_on(&db.store, &stream, &cause("stock.set"), set(7)).await?;
    let again = decide_on(&db.store, &stream, &first_set, set(10)).await?;
    match again {
        Decided::Nothing { state } => assert_eq!(state.on_hand, 7, "the state as the log has it"),
        Decided::Appended { events, .. } => anyhow::bail!("appended again: {events:?}"),
    }
    assert_eq!(db.store.read_stream(&stream, 0).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_redelivered_reservation_reserves_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    decide_on(&db.store, &stream, &cause("stock.set"), set(10)).await?;
    let order_id = Uuid::new_v4();
    let accepted = cause("inventory.reserve.0");
    let first = decide_on(&db.store, &stream, &accepted, reserve(order_id, 4)).await?;
    assert_eq!(first.events().len(), 1);
    let second = decide_on(&db.store, &stream, &accepted, reserve(order_id, 4)).await?;
    assert!(matches!(second, Decided::Nothing { .. }));
    assert_eq!((second.state().on_hand, second.state().reserved), (6, 4));
    Ok(())
}

#[tokio::test]
async fn events_of_a_decision_carry_ids_derived_from_the_cause() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let c = cause("stock.set");
    decide_on(&db.store, &stream, &c, set(3)).await?;
    let rec = &db.store.read_stream(&stream, 0).await?[0];
    assert_eq!(
        rec.event_id,
        domain::derive_event_id(c.causation_id, "stock.set", 0)
    );
    assert_eq!(rec.metadata.causation_id, c.causation_id);
    assert_eq!(rec.metadata.correlation_id, c.correlation_id);
    Ok(())
}

#[tokio::test]
async fn concurrent_first_writers_of_a_new_stream_all_get_their_turn() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let mut writers = tokio::task::JoinSet::new();
    for quantity in 0..8 {
        let (store, stream) = (db.store.clone(), stream.clone());
        writers.spawn(async move {
            decide_on(&store, &stream, &cause("stock.set"), set(quantity)).await
        });
    }
    while let Some(result) = writers.join_next().await {
        assert_eq!(result??.events().len(), 1);
    }
    let versions: Vec<i64> = db
        .store
        .read_stream(&stream, 0)
        .await?
        .iter()
        .map(|r| r.stream_version)
        .collect();
    assert_eq!(versions, (0..8).collect::<Vec<_>>());
    Ok(())
}

/// Two processes' caches of one stock stream: each decides on its cached state without
/// reading first, so the one that did not write last decides on a stale state; its
/// append expects the stale version, is refused, and it reads and decides again.
#[tokio::test]
async fn a_cache_behind_the_stream_is_refused_then_caught_up_and_never_oversells(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let (here, elsewhere) = (StreamCache::new(16), StreamCache::new(16));
    decide_on_cached(&db.store, &here, &stream, &cause("stock.set"), set(2)).await?;
    let first = decide_on_cached(
        &db.store,
        &here,
        &stream,
        &cause("inventory.reserve.0"),
        reserve(Uuid::new_v4(), 1),
    )
    .await?;
    assert!(matches!(first.events(), [DomainEvent::StockReserved(_)]));
    // The other process takes the last unit; `here` still believes one is left.
    let other = decide_on_cached(
        &db.store,
        &elsewhere,
        &stream,
        &cause("inventory.reserve.0"),
        reserve(Uuid::new_v4(), 1),
    )
    .await?;
    assert!(matches!(other.events(), [DomainEvent::StockReserved(_)]));

    let late = decide_on_cached(
        &db.store,
        &here,
        &stream,
        &cause("inventory.reserve.0"),
        reserve(Uuid::new_v4(), 1),
    )
    .await?;
    assert!(
        matches!(late.events(), [DomainEvent::StockReservationFailed(_)]),
        "decided on the stale cache instead of the stream: {:?}",
        late.events()
    );
    let truth = load::<StockState>(&db.store, &stream).await?;
    assert_eq!(
        late.state(),
        &truth.state,
        "the cache caught up with the stream"
    );
    assert_eq!(truth.version, Some(3));
    Ok(())
}

/// A cached state that lacks events written elsewhere may see nothing to do where the
/// stream does: such a "nothing" is checked against the stream before it counts.
#[tokio::test]
async fn nothing_to_do_on_a_stale_cache_is_checked_against_the_stream() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let (here, elsewhere) = (StreamCache::new(16), StreamCache::new(16));
    decide_on_cached(&db.store, &here, &stream, &cause("stock.set"), set(5)).await?;
    let order_id = Uuid::new_v4();
    decide_on_cached(
        &db.store,
        &elsewhere,
        &stream,
        &cause("inventory.reserve.0"),
        reserve(order_id, 2),
    )
    .await?;
    let release = move |s: &StockState| {
        stock::decide(
            s,
            StockInput::Release {
                sku: "A".into(),
                order_id,
                line: 0,
            },
        )
    };
    // `here` never saw the reservation: on its cache alone, there is nothing to release.
    let released = decide_on_cached(
        &db.store,
        &here,
        &stream,
        &cause("inventory.release"),
        release,
    )
    .await?;
    assert!(
        matches!(released.events(), [DomainEvent::StockReleased(_)]),
        "the release was lost on a stale cache: {:?}",
        released.events()
    );
    Ok(())
}

/// A stream assumed new is decided on the empty state without a read; when it exists
/// after all, the append is refused and the decision is made again on the stream.
#[tokio::test]
async fn a_stream_wrongly_assumed_new_is_read_and_decided_again() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let (here, elsewhere) = (StreamCache::new(16), StreamCache::new(16));
    decide_on_cached(&db.store, &elsewhere, &stream, &cause("stock.set"), set(5)).await?;

    here.assume_new(&stream);
    let decided = decide_on_cached(
        &db.store,
        &here,
        &stream,
        &cause("inventory.reserve.0"),
        reserve(Uuid::new_v4(), 3),
    )
    .await?;
    assert!(
        matches!(decided.events(), [DomainEvent::StockReserved(_)]),
        "decided on the assumed empty stream (no stock) instead of the real one: {:?}",
        decided.events()
    );
    let truth = load::<StockState>(&db.store, &stream).await?;
    assert_eq!(truth.version, Some(1));
    assert_eq!(decided.state(), &truth.state);
    Ok(())
}

/// A stream folded from its start is read in pages (of 1,000 events): every event is
/// folded once, across the pages' edges.
#[tokio::test]
async fn a_stream_longer_than_a_page_is_folded_whole() -> anyhow::Result<()> {
    use eventstore::ExpectedVersion;
    const LEN: i64 = 2_500;
    let db = TestDb::new().await?;
    let stream = streams::stock("A");
    let cause = cause("bulk");
    let events: Vec<DomainEvent> = (0..LEN)
        .map(|quantity| {
            DomainEvent::StockSet(domain::events::StockSet {
                sku: "A".into(),
                quantity,
            })
        })
        .collect();
    for (i, chunk) in events.chunks(500).enumerate() {
        let expected = match i {
            0 => ExpectedVersion::NoStream,
            _ => ExpectedVersion::Exact(i64::try_from(i * 500)? - 1),
        };
        db.store
            .append(&stream, expected, cause.new_events(chunk, i * 500))
            .await?;
    }
    let loaded = load::<StockState>(&db.store, &stream).await?;
    assert_eq!(loaded.version, Some(LEN - 1));
    assert_eq!(
        loaded.state.version,
        Some(LEN - 1),
        "every event folded once"
    );
    assert_eq!(loaded.state.on_hand, LEN - 1, "the last set wins");
    Ok(())
}
