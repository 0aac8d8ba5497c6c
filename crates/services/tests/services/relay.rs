use bus::Bus;
use domain::events::StockSet;
use domain::{streams, DomainEvent};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use testkit::{TestDb, TestVhost};

use crate::support::*;

const QUEUE: &str = "test.every-event";

/// A database and a vhost of the test's own, and a bus on that vhost.
async fn isolated() -> anyhow::Result<(TestDb, TestVhost, Bus)> {
    let db = TestDb::new().await?;
    let vhost = TestVhost::new().await?;
    let bus = Bus::connect(&vhost.url).await?;
    Ok((db, vhost, bus))
}

/// A `StockSet` of `sku` to `quantity`.
fn stock_set(sku: &str, quantity: i64) -> Vec<DomainEvent> {
    vec![DomainEvent::StockSet(StockSet {
        sku: sku.into(),
        quantity,
    })]
}

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

/// Waits until every append so far is readable, then until the relay has saved that
/// end of the log as its checkpoint.
async fn relay_catches_up(db: &TestDb) -> anyhow::Result<()> {
    let end = testkit::wait_readable(&db.store, DEADLINE).await?;
    checkpoint_reaches(db, end).await
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
    let (db, _vhost, bus) = isolated().await?;
    let channel = tap(&bus).await?;

    append(&db.store, &streams::stock("A"), &stock_set("A", 5)).await?;
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
    append(&db.store, &streams::stock("A"), &stock_set("A", 9)).await?;
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
    let (db, _vhost, bus) = isolated().await?;
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
    relay_catches_up(&db).await?;
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
    let (db, _vhost, bus) = isolated().await?;
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
    let (db, _vhost, bus) = isolated().await?;
    let set = |quantity| stock_set("L", quantity);
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
    relay_catches_up(&db).await?;
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

/// A service of the relay's process, as the bus sees it: records the ids of the events
/// it handles, one order after another, and holds each until `open` is true.
struct Service {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    open: tokio::sync::watch::Receiver<bool>,
}

impl bus::Handler for Service {
    fn ordering_key(&self, msg: &bus::Incoming) -> Option<String> {
        msg.correlation_id.clone()
    }

    fn handle(&self, msg: bus::Incoming) -> futures::future::BoxFuture<'static, bus::Outcome> {
        let (seen, mut open) = (self.seen.clone(), self.open.clone());
        Box::pin(async move {
            let _ = open.wait_for(|open| *open).await;
            let id = msg.message_id.unwrap_or_default();
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(id);
            bus::Outcome::Ack
        })
    }
}

/// A running [`Service`] on `queue`: what it handled, what releases it, what stops it.
struct Running {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    open: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), bus::BusError>>,
}

impl Running {
    async fn start(bus: &Bus, queue: &'static str, open: bool) -> anyhow::Result<Running> {
        let (open, opened) = tokio::sync::watch::channel(open);
        let seen = std::sync::Arc::default();
        let handler = std::sync::Arc::new(Service {
            seen: std::sync::Arc::clone(&seen),
            open: opened,
        });
        let options = bus::ConsumeOptions {
            local_hand_off: true,
            handler_timeout: DEADLINE * 4,
            ..bus::ConsumeOptions::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let consumer = bus.clone();
        let task = tokio::spawn(async move {
            bus::consume(&consumer, queue, options, handler, async {
                let _ = stopped.await;
            })
            .await
        });
        testkit::wait_until("the queue drained by this process", DEADLINE, || async {
            Ok(bus.hands_over_to(queue).then_some(()))
        })
        .await?;
        Ok(Running {
            seen,
            open,
            stop,
            task,
        })
    }

    async fn has_seen(&self, id: &str) -> anyhow::Result<()> {
        testkit::wait_until(&format!("event {id} handled"), DEADLINE, || async {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            Ok(seen.iter().any(|seen| seen == id).then_some(()))
        })
        .await
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.open.send(true);
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// Places an order; returns the id of its `OrderAccepted` and of its `OrderPlaced`,
/// once the log shows them to readers (a transaction still open elsewhere on the
/// server holds the gap-safe horizon back, and tests run side by side).
async fn accepted_order(db: &TestDb) -> anyhow::Result<(String, String)> {
    let from = testkit::wait_readable(&db.store, DEADLINE).await?;
    place(&db.store, "tok_ok", vec![line("A", 1, 100)]).await?;
    testkit::wait_until("the order's events readable", DEADLINE, || async {
        let log = db.store.read_all(from, 100).await?;
        let id_of = |event_type: &str| {
            log.iter()
                .find(|r| r.event_type == event_type)
                .map(|r| r.event_id.to_string())
        };
        Ok(id_of("OrderAccepted").zip(id_of("OrderPlaced")))
    })
    .await
}

const SPY: &str = "test.service-addresses";
const OUTSIDE: &str = "test.outside-accepted";

/// Events go to the services of the relay's own process without the broker; the
/// broker carries them only to service queues consumed elsewhere (addressed by the
/// queue's name) and to queues outside programs bind to their routing keys.
#[tokio::test]
async fn the_relay_hands_events_to_its_own_processs_services_and_publishes_only_what_others_need(
) -> anyhow::Result<()> {
    use bus::topology::{INVENTORY_QUEUE, NOTIFICATION_QUEUE, PAYMENT_QUEUE};
    let (db, _vhost, bus) = isolated().await?;
    let channel = bus.open_channel().await?;
    // What reaches the inventory's and the payment's queues through the broker.
    bind_queue(&channel, SPY, INVENTORY_QUEUE).await?;
    bind_queue(&channel, SPY, PAYMENT_QUEUE).await?;
    bind_queue(&channel, OUTSIDE, "order.OrderAccepted").await?;
    let inventory = Running::start(&bus, INVENTORY_QUEUE, true).await?;
    let payment = Running::start(&bus, PAYMENT_QUEUE, true).await?;
    let (stop, relay) = start_relay(&db, &bus);

    let (accepted, placed) = accepted_order(&db).await?;
    inventory.has_seen(&accepted).await?;
    payment.has_seen(&accepted).await?;
    relay_catches_up(&db).await?;
    assert_eq!(
        ids(drain_queue(&channel, SPY).await?),
        Vec::<String>::new(),
        "handed over, not published to the services' queues"
    );
    assert_eq!(
        drain_queue(&channel, OUTSIDE).await?,
        vec![(accepted.clone(), "order.OrderAccepted".to_owned())],
        "an outside queue bound to the key receives it"
    );
    assert_eq!(
        drain_queue(&channel, NOTIFICATION_QUEUE).await?,
        vec![(placed, "order.OrderPlaced".to_owned())],
        "a service with no consumer here gets it through its queue"
    );

    // Inventory's consumer stops: its events go through the broker again.
    inventory.stop().await?;
    let (accepted, _) = accepted_order(&db).await?;
    payment.has_seen(&accepted).await?;
    relay_catches_up(&db).await?;
    assert_eq!(
        drain_queue(&channel, SPY).await?,
        vec![(accepted.clone(), "order.OrderAccepted".to_owned())],
        "published once, for the inventory only (the payment's was handed over)"
    );
    assert_eq!(ids(drain_queue(&channel, OUTSIDE).await?), vec![accepted]);
    let _ = stop.send(());
    relay.await??;
    payment.stop().await?;
    Ok(())
}

/// A service of the relay's process that hangs (payment waiting on a gateway that never
/// answers) holds back neither the relay nor the other services, only the checkpoint:
/// a crash then would route its events again.
#[tokio::test]
async fn a_hung_service_holds_back_the_relays_checkpoint_but_not_the_other_services(
) -> anyhow::Result<()> {
    use bus::topology::{INVENTORY_QUEUE, PAYMENT_QUEUE};
    let (db, _vhost, bus) = isolated().await?;
    let inventory = Running::start(&bus, INVENTORY_QUEUE, true).await?;
    let payment = Running::start(&bus, PAYMENT_QUEUE, false).await?;
    append(&db.store, &streams::stock("A"), &stock_set("A", 5)).await?;
    let before = testkit::wait_readable(&db.store, DEADLINE).await?;
    let (stop, relay) = start_relay(&db, &bus);
    checkpoint_reaches(&db, before).await?;

    let (first, _) = accepted_order(&db).await?;
    let (second, _) = accepted_order(&db).await?;
    inventory.has_seen(&first).await?;
    inventory.has_seen(&second).await?;
    // A look at one moment (the relay's unit tests prove the rule itself): the
    // inventory has handled both orders, the checkpoint is still where it was.
    assert_eq!(
        db.store
            .load_checkpoint(services::relay::CHECKPOINT)
            .await?,
        before,
        "not past events the payment has not settled"
    );

    let _ = payment.open.send(true);
    payment.has_seen(&first).await?;
    payment.has_seen(&second).await?;
    relay_catches_up(&db).await?;
    let _ = stop.send(());
    relay.await??;
    inventory.stop().await?;
    payment.stop().await?;
    Ok(())
}

/// Upgrading from a build whose relay used the checkpoint `relay`: this relay starts
/// where that one left off, and keeps that checkpoint with its own while it holds the
/// old relays' lock (none of them can become active meanwhile).
#[tokio::test]
async fn a_relay_starts_where_an_older_builds_relay_left_off_and_keeps_its_checkpoint(
) -> anyhow::Result<()> {
    let (db, _vhost, bus) = isolated().await?;
    let channel = tap(&bus).await?;
    let set = |quantity| stock_set("U", quantity);
    append(&db.store, &streams::stock("U"), &set(1)).await?;
    let published_by_the_old_relay = testkit::wait_readable(&db.store, DEADLINE).await?;
    let mut conn = db.store.pool().acquire().await?;
    db.store
        .save_checkpoint(&mut conn, "relay", published_by_the_old_relay)
        .await?;
    drop(conn);
    append(&db.store, &streams::stock("U"), &set(2)).await?;
    let end = testkit::wait_readable(&db.store, DEADLINE).await?;
    let after: Vec<String> = db
        .store
        .read_all(published_by_the_old_relay, 100)
        .await?
        .iter()
        .map(|r| r.event_id.to_string())
        .collect();

    let (stop, relay) = start_relay(&db, &bus);
    checkpoint_reaches(&db, end).await?;
    testkit::wait_until("the old checkpoint kept too", DEADLINE, || async {
        Ok((db.store.load_checkpoint("relay").await? == end).then_some(()))
    })
    .await?;
    assert_eq!(
        ids(drain(&channel).await?),
        after,
        "only what the old relay had not published"
    );
    let _ = stop.send(());
    relay.await??;
    Ok(())
}
