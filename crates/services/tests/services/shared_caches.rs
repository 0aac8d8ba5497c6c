//! The folded streams one process's workers share (`services::exec::SharedCaches`): each
//! worker goes on from the state the one before it left, without reading the stream,
//! and a state that another writer made stale is still refused and read.
use std::sync::Arc;

use domain::commands::{CancelOrder, Command, PlaceOrder, SetStock, Shipping, ShippingMethod};
use domain::{streams, EventEnvelope, Rules};
use projector::timers::TimersProjection;
use services::commands::CommandService;
use services::exec::{Cause, SharedCaches};
use services::gateway::{PaymentGateway, Simulator};
use services::inventory::Inventory;
use services::payment::Payments;
use services::saga::OrderSaga;
use services::shipping::Shipping as ShippingService;
use services::timers::Scheduler;
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

fn cause() -> Cause {
    let id = Uuid::new_v4();
    Cause::new(id, id, "commands")
}

/// The version `cache` holds for `stream` and the stream's last version in the log.
fn cached_version<S: Clone>(cache: &services::exec::StreamCache<S>, stream: &str) -> Option<i64> {
    cache.cached(stream).and_then(|(_, version)| version)
}

async fn last_version(db: &TestDb, stream: &str) -> anyhow::Result<Option<i64>> {
    Ok(db
        .store
        .read_stream(stream, 0)
        .await?
        .last()
        .map(|rec| rec.stream_version))
}

/// The events of `event_type` on `stream`, as the bus would deliver them.
async fn delivered(
    db: &TestDb,
    stream: &str,
    event_type: &str,
) -> anyhow::Result<Vec<EventEnvelope>> {
    let mut found = Vec::new();
    for rec in db.store.read_stream(stream, 0).await? {
        if rec.event_type == event_type {
            found.push(projector::to_envelope(&rec)?);
        }
    }
    Ok(found)
}

/// The workers of one process, sharing `caches`, and an order of one line of stock
/// `A` with standard shipping, placed and confirmed through them (reservation,
/// payment, the saga's join). Deliveries are due at once.
struct Process {
    commands: CommandService,
    shipping: ShippingService,
    scheduler: Arc<Scheduler>,
    order_id: Uuid,
}

/// Five units of each of `skus` in stock, an order of one unit of each placed
/// through the intake of a process sharing `caches`, and inventory and payment
/// reacting to its acceptance (the gateway answers at once). Returns the intake and
/// the order's id.
async fn accepted_order(
    db: &TestDb,
    caches: &SharedCaches,
    rules: Rules,
    skus: &[String],
    unit_price_cents: i64,
    shipping: Option<Shipping>,
) -> anyhow::Result<(CommandService, Uuid)> {
    let store = &db.store;
    let commands = CommandService::sharing(store.clone(), rules, caches);
    let gateway: Arc<dyn PaymentGateway> = Arc::new(Simulator::new(
        db.pool().clone(),
        std::time::Duration::ZERO,
        0.0,
    ));
    let (inventory, payments) = (
        Inventory::new(store.clone()),
        Payments::new(store.clone(), gateway),
    );
    for sku in skus {
        let set = SetStock {
            sku: sku.clone(),
            quantity: 5,
        };
        commands.handle(Command::SetStock(set), &cause()).await?;
    }
    let order_id = Uuid::new_v4();
    let place = PlaceOrder {
        order_id,
        customer_id: "c-1".to_owned(),
        currency: "EUR".to_owned(),
        items: skus
            .iter()
            .map(|sku| line(sku, 1, unit_price_cents))
            .collect(),
        payment_token: "tok_ok".to_owned(),
        shipping,
    };
    commands
        .handle(Command::PlaceOrder(place), &cause())
        .await?;
    for accepted in delivered(db, &streams::order(order_id), "OrderAccepted").await? {
        inventory.react(&accepted).await?;
        payments.react(&accepted).await?;
    }
    Ok((commands, order_id))
}

async fn confirmed_order(db: &TestDb, caches: &SharedCaches) -> anyhow::Result<Process> {
    let store = &db.store;
    let rules = Rules {
        delivery_delay: std::time::Duration::ZERO,
        ..Rules::default()
    };
    let shipping = Shipping {
        method: ShippingMethod::Standard,
        address: "1 Main St".to_owned(),
    };
    let (commands, order_id) =
        accepted_order(db, caches, rules, &["A".to_owned()], 750, Some(shipping)).await?;
    let saga = OrderSaga::sharing(store.clone(), caches);
    let order = streams::order(order_id);
    for reserved in delivered(db, &streams::stock("A"), "StockReserved").await? {
        saga.react(&reserved).await?;
    }
    for captured in delivered(db, &streams::payment(order_id), "PaymentCaptured").await? {
        saga.react(&captured).await?;
    }
    anyhow::ensure!(
        types(store, &order)
            .await?
            .contains(&"OrderConfirmed".to_owned()),
        "the order was not confirmed"
    );
    Ok(Process {
        commands,
        shipping: ShippingService::sharing(store.clone(), caches),
        scheduler: Scheduler::sharing(store.clone(), caches),
        order_id,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workers_of_one_process_decide_an_order_from_placement_to_delivery_without_reading_its_streams(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let caches = SharedCaches::default();
    let process = confirmed_order(&db, &caches).await?;
    let order = streams::order(process.order_id);
    for confirmed in delivered(&db, &order, "OrderConfirmed").await? {
        process.shipping.react(&confirmed).await?;
    }
    catch_up(&db.store, &TimersProjection).await?;
    assert_eq!(process.scheduler.fire_due().await?, 1);

    assert_eq!(
        types(&db.store, &streams::shipment(process.order_id)).await?,
        ["ShipmentShipped", "ShipmentDelivered"]
    );
    assert!(types(&db.store, &order)
        .await?
        .contains(&"OrderShipped".to_owned()));
    // Every decision went through the shared caches (they hold each stream's last
    // version), and none of them read a stream.
    let shipment = streams::shipment(process.order_id);
    assert_eq!(
        cached_version(&caches.orders, &order),
        last_version(&db, &order).await?
    );
    assert_eq!(
        cached_version(&caches.shipments, &shipment),
        last_version(&db, &shipment).await?
    );
    assert_eq!(
        (caches.orders.reads(), caches.shipments.reads()),
        (0, 0),
        "the saga, shipping and the delivery timer each decided on the state the worker before them left"
    );
    Ok(())
}

/// A confirmed order shipped through a process whose scheduler runs, with its
/// delivery due at once; returns once the scheduler delivered it and stopped. No
/// projector runs: the timers table never had the delivery, so only the hand-over can
/// have fired it.
async fn delivered_in_process(db: &TestDb, caches: &SharedCaches) -> anyhow::Result<Process> {
    let process = confirmed_order(db, caches).await?;
    let (stop, scheduler) = running(Arc::clone(&process.scheduler), caches).await?;
    let order = streams::order(process.order_id);
    for confirmed in delivered(db, &order, "OrderConfirmed").await? {
        process.shipping.react(&confirmed).await?;
    }
    let shipment = streams::shipment(process.order_id);
    testkit::wait_until("the shipment to be delivered", DEADLINE, || async {
        let types = types(&db.store, &shipment).await?;
        Ok((types.len() == 2).then_some(()))
    })
    .await?;
    let _ = stop.send(());
    scheduler.await??;
    assert_eq!(
        types(&db.store, &shipment).await?,
        ["ShipmentShipped", "ShipmentDelivered"]
    );
    Ok(process)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_due_at_once_is_fired_in_process_before_the_timers_table_has_it(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let caches = SharedCaches::default();
    let process = delivered_in_process(&db, &caches).await?;
    assert_eq!(
        caches.shipments.reads(),
        0,
        "fired on the shipment shipping left"
    );
    // The projector then sees the timer set and ended in one page: no row is left
    // for a scheduler to claim.
    catch_up(&db.store, &TimersProjection).await?;
    assert_eq!(timers(&db.store).await?, vec![]);
    assert_eq!(process.scheduler.fire_due().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_fired_in_process_and_then_from_the_table_is_delivered_once(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let caches = SharedCaches::default();
    let process = delivered_in_process(&db, &caches).await?;
    // The row a projector writes when it reads the shipment before its delivery (or
    // after a crash that lost the hand-over): a scheduler claims it later.
    let shipment = streams::shipment(process.order_id);
    let shipped = delivered(&db, &shipment, "ShipmentShipped").await?;
    let [shipped] = shipped.as_slice() else {
        anyhow::bail!("expected one ShipmentShipped, got {}", shipped.len());
    };
    sqlx::query(
        "INSERT INTO timers (timer_id, kind, order_id, due_at, scheduled_at)
         VALUES ($1, $2, $3, now(), now())",
    )
    .bind(shipped.event_id)
    .bind(projector::timers::DELIVERY)
    .bind(process.order_id)
    .execute(db.pool())
    .await?;
    let other_process = Scheduler::new(db.second_store().await?);
    assert_eq!(other_process.fire_due().await?, 1);
    assert_eq!(
        types(&db.store, &shipment).await?,
        ["ShipmentShipped", "ShipmentDelivered"],
        "the second firing decided on the delivered shipment and appended nothing"
    );
    assert_eq!(timers(&db.store).await?, vec![]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn shipping_on_a_cached_order_that_was_cancelled_since_reads_it_and_ships_nothing(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let caches = SharedCaches::default();
    let process = confirmed_order(&db, &caches).await?;
    let order = streams::order(process.order_id);
    // The cancel is decided on the stream read from the log, so the shared cache still
    // holds the order as confirmed.
    let cancel = CancelOrder {
        order_id: process.order_id,
        reason: "changed my mind".to_owned(),
    };
    process
        .commands
        .handle(Command::CancelOrder(cancel), &cause())
        .await?;
    let reads_before = caches.orders.reads();
    for confirmed in delivered(&db, &order, "OrderConfirmed").await? {
        process.shipping.react(&confirmed).await?;
    }

    assert!(
        types(&db.store, &streams::shipment(process.order_id))
            .await?
            .is_empty(),
        "nothing shipped"
    );
    let order_types = types(&db.store, &order).await?;
    assert!(order_types.contains(&"OrderCancelled".to_owned()));
    assert!(!order_types.contains(&"OrderShipped".to_owned()));
    assert!(
        caches.orders.reads() > reads_before,
        "the stale state was refused and the order read"
    );
    Ok(())
}

/// A burst delivers an order's outcomes to the saga within milliseconds of each other.
/// Those queued for the order's turn are decided in order and appended together: each
/// outcome recorded once, under its own cause's event id, the join confirming once,
/// in fewer commits than outcomes; a redelivery of them all appends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcomes_queued_for_an_order_are_joined_in_fewer_commits_than_outcomes(
) -> anyhow::Result<()> {
    const LINES: usize = 30;
    let db = TestDb::new().await?;
    let store = &db.store;
    let caches = SharedCaches::default();
    let skus: Vec<String> = (0..LINES).map(|i| format!("SKU-{i}")).collect();
    let (_, order_id) = accepted_order(&db, &caches, Rules::default(), &skus, 100, None).await?;
    let order = streams::order(order_id);
    let mut outcomes = delivered(&db, &streams::payment(order_id), "PaymentCaptured").await?;
    for sku in &skus {
        outcomes.extend(delivered(&db, &streams::stock(sku), "StockReserved").await?);
    }
    assert_eq!(outcomes.len(), LINES + 1);
    let before = last_version(&db, &order).await?.unwrap_or(-1);

    let saga = Arc::new(OrderSaga::sharing(store.clone(), &caches));
    let react_to_all = |outcomes: Vec<EventEnvelope>| {
        let tasks: Vec<_> = outcomes
            .into_iter()
            .map(|env| {
                let saga = Arc::clone(&saga);
                tokio::spawn(async move { saga.react(&env).await })
            })
            .collect();
        async move {
            for task in tasks {
                task.await??;
            }
            anyhow::Ok(())
        }
    };
    react_to_all(outcomes.clone()).await?;

    let recorded: Vec<_> = store
        .read_stream(&order, 0)
        .await?
        .into_iter()
        .filter(|r| r.stream_version > before)
        .collect();
    let count = |t: &str| recorded.iter().filter(|r| r.event_type == t).count();
    assert_eq!(count("OrderLineReserved"), LINES);
    assert_eq!(count("OrderPaymentCaptured"), 1);
    assert_eq!(count("OrderConfirmed"), 1);
    assert_eq!(
        count("OrderCompleted"),
        1,
        "a digital order completes on confirmation"
    );
    let transactions: std::collections::BTreeSet<i64> =
        recorded.iter().map(|r| r.transaction_id).collect();
    assert!(
        transactions.len() <= 20,
        "{} outcomes queued on one order took {} commits",
        LINES + 1,
        transactions.len()
    );
    for env in &outcomes {
        let id = domain::derive_event_id(env.event_id, "order", 0);
        assert!(
            recorded.iter().any(|r| r.event_id == id),
            "each outcome is recorded under its own cause's event id"
        );
    }

    react_to_all(outcomes).await?;
    assert_eq!(
        last_version(&db, &order).await?,
        recorded.last().map(|r| r.stream_version),
        "a redelivery of every outcome appends nothing"
    );
    Ok(())
}
