use bus::Bus;
use domain::events::StockSet;
use domain::{streams, DomainEvent};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use testkit::{TestDb, TestVhost};

use crate::support::*;

const QUEUE: &str = "test.every-event";

/// A queue that sees every event the relay publishes.
async fn tap(bus: &Bus) -> anyhow::Result<Channel> {
    let channel = bus.open_channel().await?;
    bind_queue(&channel, QUEUE, "#").await?;
    Ok(channel)
}

/// Declares `queue` and binds it to `orderflow.events` with `key`.
async fn bind_queue(channel: &Channel, queue: &str, key: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(bus::EVENTS_EXCHANGE),
            ShortString::from(key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// (message_id, routing_key) of every message in the tap, in queue order.
async fn drain(channel: &Channel) -> anyhow::Result<Vec<(String, String)>> {
    drain_queue(channel, QUEUE).await
}

/// (message_id, routing_key) of every message in `queue`, in queue order.
async fn drain_queue(channel: &Channel, queue: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut got = Vec::new();
    while let Some(m) = channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
        .await?
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        got.push((id, m.delivery.routing_key.to_string()));
    }
    Ok(got)
}

/// The running relay, and what stops it.
fn start_relay(
    db: &TestDb,
    bus: &Bus,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), services::ServiceError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(services::relay::run(
        db.store.clone(),
        bus.clone(),
        db.url.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, relay)
}

/// Waits until the relay has saved `end` as its checkpoint.
async fn checkpoint_reaches(db: &TestDb, end: eventstore::LogPosition) -> anyhow::Result<()> {
    testkit::wait_until("the relay to save the end of the log", DEADLINE, || async {
        let saved = db
            .store
            .load_checkpoint(services::relay::CHECKPOINT)
            .await?;
        Ok((saved == end).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_relay_publishes_each_committed_event_once_and_moves_its_checkpoint(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let vhost = TestVhost::new().await?;
    let bus = Bus::connect(&vhost.url).await?;
    let channel = tap(&bus).await?;

    append(
        &db.store,
        &streams::stock("A"),
        &[DomainEvent::StockSet(StockSet {
            sku: "A".into(),
            quantity: 5,
        })],
    )
    .await?;
    place(&db.store, "tok_ok", vec![line("A", 1, 100)]).await?;

    let published = relay_all(&db.store, &bus).await?;
    let log = db
        .store
        .read_all(eventstore::LogPosition::START, 100)
        .await?;
    assert_eq!(published, 3);
    assert_eq!(
        db.store
            .load_checkpoint(services::relay::CHECKPOINT)
            .await?,
        log.last().map(|r| r.log_position()).unwrap_or_default()
    );

    let expected: Vec<(String, String)> = db
        .store
        .read_all(eventstore::LogPosition::START, 100)
        .await?
        .iter()
        .map(|r| {
            (
                r.event_id.to_string(),
                format!("{}.{}", streams::category(&r.stream_name), r.event_type),
            )
        })
        .collect();
    assert_eq!(
        expected
            .iter()
            .map(|(_, key)| key.as_str())
            .collect::<Vec<_>>(),
        ["stock.StockSet", "order.OrderPlaced", "order.OrderAccepted"]
    );
    // publishes are confirmed, so the messages are queued by now
    let got = drain(&channel).await?;
    assert_eq!(
        got, expected,
        "message_id = event_id, key = <category>.<EventType>, log order"
    );

    // caught up: nothing more is published
    assert_eq!(services::relay::relay_page(&db.store, &bus).await?, 0);
    assert!(drain(&channel).await?.is_empty());

    // a later event is published alone
    append(
        &db.store,
        &streams::stock("A"),
        &[DomainEvent::StockSet(StockSet {
            sku: "A".into(),
            quantity: 9,
        })],
    )
    .await?;
    assert_eq!(relay_all(&db.store, &bus).await?, 1);
    let later = drain(&channel).await?;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].1, "stock.StockSet");
    Ok(())
}

/// The running relay saves its checkpoint at most every so often, and soon after it
/// has nothing left to publish: a caught-up relay's checkpoint is the end of the log,
/// and every event was published (at least) once.
#[tokio::test]
async fn the_running_relay_checkpoints_the_end_of_the_log_once_idle() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let vhost = TestVhost::new().await?;
    let bus = Bus::connect(&vhost.url).await?;
    let channel = tap(&bus).await?;
    let (stop, relay) = start_relay(&db, &bus);
    const SETS: i64 = 300;
    for quantity in 0..SETS {
        append(
            &db.store,
            &streams::stock(&format!("S{}", quantity % 7)),
            &[DomainEvent::StockSet(StockSet {
                sku: format!("S{}", quantity % 7),
                quantity,
            })],
        )
        .await?;
    }
    // The end of the log, once every append is visible: other tests' transactions
    // hold the gap-safe horizon back, and a relay idling at an early horizon would
    // otherwise already be "at the end".
    let end = testkit::wait_readable(&db.store, DEADLINE).await?;
    checkpoint_reaches(&db, end).await?;
    let mut published = std::collections::BTreeSet::new();
    for (id, _) in drain(&channel).await? {
        published.insert(id);
    }
    assert_eq!(
        published.len(),
        usize::try_from(SETS)?,
        "every event published"
    );
    let _ = stop.send(());
    relay.await??;
    Ok(())
}

/// A log of several pages: the running relay sends the next page while the broker
/// still confirms the ones before it, and the events still reach the broker once
/// each and in log order, and the checkpoint the end of the log.
#[tokio::test]
async fn pages_sent_before_the_last_is_confirmed_arrive_once_and_in_log_order() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let vhost = TestVhost::new().await?;
    let bus = Bus::connect(&vhost.url).await?;
    let channel = tap(&bus).await?;
    for sku in 0..9 {
        let sets: Vec<DomainEvent> = (0..500)
            .map(|quantity| {
                DomainEvent::StockSet(StockSet {
                    sku: format!("P{sku}"),
                    quantity,
                })
            })
            .collect();
        append(&db.store, &streams::stock(&format!("P{sku}")), &sets).await?;
    }
    let end = testkit::wait_readable(&db.store, DEADLINE).await?;
    let (stop, relay) = start_relay(&db, &bus);
    checkpoint_reaches(&db, end).await?;
    let expected: Vec<String> = db
        .store
        .read_all(eventstore::LogPosition::START, 10_000)
        .await?
        .iter()
        .map(|r| r.event_id.to_string())
        .collect();
    assert_eq!(expected.len(), 4_500);
    let got: Vec<String> = drain(&channel)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got.len(), expected.len(), "each event once");
    assert!(got == expected, "in log order");
    let _ = stop.send(());
    relay.await??;
    Ok(())
}

/// `stock.StockSet` is a key no service binds: until a queue is bound to it the relay
/// does not send its events (the broker would drop them), yet it moves past them; a
/// queue bound afterwards receives the key's events once the relay asks again (at
/// most a second later), and from then on every one of them, in log order.
#[tokio::test]
async fn events_no_queue_is_bound_to_are_not_sent_and_a_queue_bound_later_receives_them(
) -> anyhow::Result<()> {
    const LATE: &str = "test.bound-late";
    let db = TestDb::new().await?;
    let vhost = TestVhost::new().await?;
    let bus = Bus::connect(&vhost.url).await?;
    let set = |quantity| {
        vec![DomainEvent::StockSet(StockSet {
            sku: "L".into(),
            quantity,
        })]
    };
    let (stop, relay) = start_relay(&db, &bus);
    append(&db.store, &streams::stock("L"), &set(0)).await?;
    let before = testkit::wait_readable(&db.store, DEADLINE).await?;
    checkpoint_reaches(&db, before).await?;

    let channel = bus.open_channel().await?;
    bind_queue(&channel, LATE, "stock.StockSet").await?;
    let next = std::sync::atomic::AtomicI64::new(1);
    let first = testkit::wait_until("the late queue's first event", DEADLINE, || async {
        let quantity = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        append(&db.store, &streams::stock("L"), &set(quantity)).await?;
        let got = ids(drain_queue(&channel, LATE).await?);
        Ok((!got.is_empty()).then_some(got))
    })
    .await?;
    let log = db.store.read_all(before, 10_000).await?;
    let appended_after_binding: Vec<String> = log.iter().map(|r| r.event_id.to_string()).collect();
    assert!(
        first.iter().all(|id| appended_after_binding.contains(id)),
        "nothing from before the binding: {first:?}"
    );

    let from = testkit::wait_readable(&db.store, DEADLINE).await?;
    for quantity in 1_000..1_003 {
        append(&db.store, &streams::stock("L"), &set(quantity)).await?;
    }
    let end = testkit::wait_readable(&db.store, DEADLINE).await?;
    checkpoint_reaches(&db, end).await?;
    let expected: Vec<String> = db
        .store
        .read_all(from, 100)
        .await?
        .iter()
        .map(|r| r.event_id.to_string())
        .collect();
    assert_eq!(expected.len(), 3);
    let mut got = ids(drain_queue(&channel, LATE).await?);
    // Events the wait appended after the first answer may still have been queued.
    got.retain(|id| expected.contains(id));
    assert_eq!(
        got, expected,
        "once the key is bound, every event, in log order"
    );
    let _ = stop.send(());
    relay.await??;
    Ok(())
}

fn ids(messages: Vec<(String, String)>) -> Vec<String> {
    messages.into_iter().map(|(id, _)| id).collect()
}
