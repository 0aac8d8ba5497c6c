//! The stream cache (`services::exec::StreamCache`) against a real PostgreSQL
//! (`TestDb`): it folds only the events after the version it holds, never lets a
//! decision on a stale state through (it decides on the cached state without reading;
//! another writer's events make the append a conflict, and the decision is made again
//! on the stream), and queues the decisions on one hot stream in-process so they do not
//! race into conflicts.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use domain::events::{StockReserved, StockSet};
use domain::{stock, streams, DomainEvent, StockInput, StockState};
use eventstore::EventStore;
use services::exec::{
    decide_on_cached, decide_together_on_cached, load, load_cached, Cause, Decided, StreamCache,
};
use testkit::fixtures::append;
use testkit::TestDb;
use uuid::Uuid;

const SKU: &str = "A";

fn cause() -> Cause {
    Cause::new(Uuid::new_v4(), Uuid::new_v4(), "inventory.reserve.0")
}

fn set(quantity: i64) -> DomainEvent {
    DomainEvent::StockSet(StockSet {
        sku: SKU.to_owned(),
        quantity,
    })
}

fn reserve(order_id: Uuid, quantity: i64) -> StockInput {
    StockInput::Reserve {
        sku: SKU.to_owned(),
        order_id,
        line: 0,
        quantity,
    }
}

/// Reserves through the cache, counting how often the decision is asked (once per
/// attempt: a conflict means a second ask).
async fn reserve_cached(
    store: &EventStore,
    cache: &StreamCache<StockState>,
    order_id: Uuid,
    quantity: i64,
    asked: &AtomicUsize,
) -> anyhow::Result<Decided<StockState>> {
    let input = reserve(order_id, quantity);
    Ok(
        decide_on_cached(store, cache, &streams::stock(SKU), &cause(), |s| {
            asked.fetch_add(1, Ordering::SeqCst);
            stock::decide(s, input.clone())
        })
        .await?,
    )
}

async fn event_types(store: &EventStore, stream: &str) -> anyhow::Result<Vec<String>> {
    Ok(store
        .read_stream(stream, 0)
        .await?
        .into_iter()
        .map(|r| r.event_type)
        .collect())
}

#[tokio::test]
async fn the_stream_cache_folds_only_new_events_and_never_decides_on_a_stale_state(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let stream = streams::stock(SKU);
    append(store, &stream, &[set(10)]).await?;
    let cache = StreamCache::<StockState>::new(16);
    let asked = AtomicUsize::new(0);

    let first_order = Uuid::new_v4();
    let first = reserve_cached(store, &cache, first_order, 3, &asked).await?;
    assert_eq!(
        first.events(),
        [DomainEvent::StockReserved(StockReserved {
            sku: SKU.to_owned(),
            order_id: first_order,
            line: 0,
            quantity: 3,
        })]
    );
    assert_eq!(first.state().on_hand, 7);

    // Another writer (a second process) sets the stock behind the cache's back.
    let other = db.second_store().await?;
    append(&other, &stream, &[set(50)]).await?;

    // 40 units fit only if the decision sees the new level; a stale 7 would refuse.
    let second_order = Uuid::new_v4();
    let second = reserve_cached(store, &cache, second_order, 40, &asked).await?;
    assert_eq!(
        second.events(),
        [DomainEvent::StockReserved(StockReserved {
            sku: SKU.to_owned(),
            order_id: second_order,
            line: 0,
            quantity: 40,
        })],
        "the decision saw the other writer's StockSet"
    );
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "asked on the cached state (a stale 7: refused on append), then on the stream"
    );

    let fresh = load::<StockState>(store, &stream).await?;
    assert_eq!(second.state(), &fresh.state, "decided on the log's state");
    assert_eq!(fresh.state.on_hand, 10);
    assert_eq!(fresh.state.reserved, 43);
    assert_eq!(fresh.version, Some(3));
    // Folding again from the cache reads only what came after its version: folding an
    // event twice would count it twice (`StockState::version` counts folded events).
    let cached = load_cached(store, &cache, &stream).await?;
    assert_eq!(cached.state, fresh.state);
    assert_eq!(cached.version, fresh.version);
    assert_eq!(cached.state.version, Some(3));
    assert_eq!(
        event_types(store, &stream).await?,
        ["StockSet", "StockReserved", "StockSet", "StockReserved"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_stream_is_decided_one_at_a_time_in_process_without_conflicts() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let stream = streams::stock(SKU);
    append(&db.store, &stream, &[set(20)]).await?;
    let cache = Arc::new(StreamCache::<StockState>::new(16));
    let asked = Arc::new(AtomicUsize::new(0));

    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let (store, cache, asked) = (db.store.clone(), cache.clone(), asked.clone());
            tokio::spawn(
                async move { reserve_cached(&store, &cache, Uuid::new_v4(), 1, &asked).await },
            )
        })
        .collect();
    for task in tasks {
        let decided = task.await??;
        assert_eq!(decided.events().len(), 1, "{decided:?}");
    }

    let types = event_types(&db.store, &stream).await?;
    let count = |t: &str| types.iter().filter(|x| *x == t).count();
    assert_eq!(count("StockReserved"), 20, "{types:?}");
    assert_eq!(count("StockReservationFailed"), 10, "{types:?}");
    let fresh = load::<StockState>(&db.store, &stream).await?;
    assert_eq!(fresh.state.on_hand, 0, "no oversell");
    assert_eq!(fresh.state.reserved, 20);
    assert_eq!(fresh.version, Some(30));
    assert_eq!(
        asked.load(Ordering::SeqCst),
        30,
        "one decision per reservation: none lost a race and decided again"
    );
    Ok(())
}

/// Decisions that queue for a hot stream's turn are appended together by the next
/// holder: fewer commits than decisions, each decision with the event ids of its own
/// cause, and the stock never oversold. A redelivered decision is decided alone (its
/// decision on the state that holds it is nothing, confirmed on a read) and appends
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_queued_for_a_hot_stream_are_appended_together_and_never_oversell(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let stream = streams::stock(SKU);
    append(&db.store, &stream, &[set(30)]).await?;
    let cache = Arc::new(StreamCache::<StockState>::new(16));
    // A first reservation caches the stream's state.
    let asked = AtomicUsize::new(0);
    reserve_cached(&db.store, &cache, Uuid::new_v4(), 1, &asked).await?;

    let causes: Vec<(Cause, Uuid)> = (0..40).map(|_| (cause(), Uuid::new_v4())).collect();
    let tasks: Vec<_> = causes
        .iter()
        .cloned()
        .map(|(cause, order_id)| {
            let (store, cache) = (db.store.clone(), cache.clone());
            tokio::spawn(async move {
                let input = reserve(order_id, 1);
                decide_together_on_cached(&store, &cache, &streams::stock(SKU), &cause, move |s| {
                    stock::decide(s, input.clone())
                })
                .await
            })
        })
        .collect();
    for task in tasks {
        let decided = task.await??;
        assert_eq!(decided.events().len(), 1, "{decided:?}");
    }

    let recorded = db.store.read_stream(&stream, 0).await?;
    let types: Vec<&str> = recorded.iter().map(|r| r.event_type.as_str()).collect();
    let count = |t: &str| types.iter().filter(|x| **x == t).count();
    assert_eq!(count("StockReserved"), 30, "{types:?}");
    assert_eq!(count("StockReservationFailed"), 11, "{types:?}");
    let fresh = load::<StockState>(&db.store, &stream).await?;
    assert_eq!(
        (fresh.state.on_hand, fresh.state.reserved),
        (0, 30),
        "no oversell"
    );
    let transactions: std::collections::BTreeSet<i64> =
        recorded.iter().skip(2).map(|r| r.transaction_id).collect();
    assert!(
        transactions.len() <= 20,
        "40 decisions queued on one stream took {} commits",
        transactions.len()
    );
    for (cause, _) in &causes {
        let id = domain::derive_event_id(cause.causation_id, &cause.handler, 0);
        assert!(
            recorded.iter().any(|r| r.event_id == id),
            "each decision keeps the event id of its own cause"
        );
    }

    // The same decision again (a redelivery) appends nothing.
    let (cause, order_id) = &causes[0];
    let input = reserve(*order_id, 1);
    let again = decide_together_on_cached(&db.store, &cache, &stream, cause, move |s| {
        stock::decide(s, input.clone())
    })
    .await?;
    assert!(matches!(again, Decided::Nothing { .. }), "{again:?}");
    assert_eq!(
        db.store.read_stream(&stream, 0).await?.len(),
        recorded.len()
    );
    Ok(())
}
