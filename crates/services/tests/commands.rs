//! The commands intake's cache of which orders exist: a flood of commands about orders
//! that were never placed stops at the cache instead of reaching PostgreSQL each time,
//! and a command right after its placement still finds the order.
use domain::commands::{CancelOrder, Command, PlaceOrder, SetStock};
use domain::{streams, Rules};
use services::commands::CommandService;
use services::exec::Cause;
use testkit::fixtures::line;
use testkit::TestDb;
use uuid::Uuid;

fn cause() -> Cause {
    let id = Uuid::new_v4();
    Cause::new(id, id, "commands")
}

fn cancel(order_id: Uuid) -> Command {
    Command::CancelOrder(CancelOrder {
        order_id,
        reason: "flood".to_owned(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_storm_of_commands_for_unknown_orders_stops_at_the_cache() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let service = CommandService::new(db.store.clone(), Rules::default());
    let unknown: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    // The first command about each id looks in the log (and waits a moment for a
    // placement that might be in flight) …
    for id in &unknown {
        service.handle(cancel(*id), &cause()).await?;
    }
    let after_first = service.placement_lookups();
    assert!(after_first >= unknown.len() as u64);
    // … the storm that follows is answered from the cache.
    for _ in 0..40 {
        for id in &unknown {
            service.handle(cancel(*id), &cause()).await?;
        }
    }
    assert_eq!(
        service.placement_lookups(),
        after_first,
        "the storm reached the database"
    );
    // And no stream was created for ids anyone can make up.
    for id in &unknown {
        assert_eq!(db.store.stream_version(&streams::order(*id)).await?, None);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_right_after_its_placement_cancels_the_order() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let service = CommandService::new(db.store.clone(), Rules::default());
    service
        .handle(
            Command::SetStock(SetStock {
                sku: "A".to_owned(),
                quantity: 5,
            }),
            &cause(),
        )
        .await?;
    let order_id = Uuid::new_v4();
    service
        .handle(
            Command::PlaceOrder(PlaceOrder {
                order_id,
                customer_id: "c-1".to_owned(),
                currency: "EUR".to_owned(),
                items: vec![line("A", 1, 500)],
                payment_token: "tok_ok".to_owned(),
                shipping: None,
            }),
            &cause(),
        )
        .await?;
    let lookups = service.placement_lookups();
    service.handle(cancel(order_id), &cause()).await?;
    assert_eq!(
        service.placement_lookups(),
        lookups,
        "a placed order is known without asking"
    );
    let types: Vec<String> = db
        .store
        .read_stream(&streams::order(order_id), 0)
        .await?
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types, ["OrderPlaced", "OrderAccepted", "OrderCancelled"]);
    Ok(())
}

/// The events of a stream of type `event_type`, as the services receive them.
async fn envelopes(
    db: &TestDb,
    stream: &str,
    event_type: &str,
) -> anyhow::Result<Vec<domain::EventEnvelope>> {
    let mut found = Vec::new();
    for rec in db.store.read_stream(stream, 0).await? {
        if rec.event_type == event_type {
            found.push(projector::to_envelope(&rec)?);
        }
    }
    Ok(found)
}

async fn types(db: &TestDb, stream: &str) -> anyhow::Result<Vec<String>> {
    Ok(db
        .store
        .read_stream(stream, 0)
        .await?
        .into_iter()
        .map(|e| e.event_type)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_order_cancelled_by_the_customer_gets_its_stock_and_money_back(
) -> anyhow::Result<()> {
    use services::gateway::{PaymentGateway, Simulator};
    use services::{inventory::Inventory, payment::Payments, saga::OrderSaga};
    use std::sync::Arc;

    let db = TestDb::new().await?;
    let commands = CommandService::new(db.store.clone(), Rules::default());
    let inventory = Inventory::new(db.store.clone());
    let gateway: Arc<dyn PaymentGateway> = Arc::new(Simulator::new(
        db.pool().clone(),
        std::time::Duration::ZERO,
        0.0,
    ));
    let payments = Payments::new(db.store.clone(), gateway);
    let saga = OrderSaga::new(db.store.clone());
    let set = |quantity| {
        Command::SetStock(SetStock {
            sku: "A".to_owned(),
            quantity,
        })
    };
    commands.handle(set(5), &cause()).await?;
    let order_id = Uuid::new_v4();
    commands
        .handle(
            Command::PlaceOrder(PlaceOrder {
                order_id,
                customer_id: "c-1".to_owned(),
                currency: "EUR".to_owned(),
                items: vec![line("A", 2, 750)],
                payment_token: "tok_ok".to_owned(),
                shipping: Some(domain::commands::Shipping {
                    method: domain::commands::ShippingMethod::Standard,
                    address: "1 Main St".to_owned(),
                }),
            }),
            &cause(),
        )
        .await?;
    // Reservation and payment, then the saga's join (no shipping service runs here, so
    // the order stays confirmed).
    let order = streams::order(order_id);
    for accepted in envelopes(&db, &order, "OrderAccepted").await? {
        inventory.react(&accepted).await?;
        payments.react(&accepted).await?;
    }
    for reserved in envelopes(&db, &streams::stock("A"), "StockReserved").await? {
        saga.react(&reserved).await?;
    }
    for captured in envelopes(&db, &streams::payment(order_id), "PaymentCaptured").await? {
        saga.react(&captured).await?;
    }
    assert!(types(&db, &order)
        .await?
        .contains(&"OrderConfirmed".to_owned()));

    commands.handle(cancel(order_id), &cause()).await?;
    let order_types = types(&db, &order).await?;
    assert!(
        order_types.ends_with(&[
            "OrderCancelled".to_owned(),
            "StockReleaseRequested".to_owned()
        ]),
        "{order_types:?}"
    );
    for release in envelopes(&db, &order, "StockReleaseRequested").await? {
        inventory.react(&release).await?;
    }
    for cancelled in envelopes(&db, &order, "OrderCancelled").await? {
        payments.react(&cancelled).await?;
    }
    let stock: domain::StockState = services::exec::load(&db.store, &streams::stock("A"))
        .await?
        .state;
    assert_eq!(
        (stock.on_hand, stock.reserved),
        (5, 0),
        "the stock came back"
    );
    let payment = types(&db, &streams::payment(order_id)).await?;
    assert_eq!(
        payment,
        [
            "PaymentRequested",
            "PaymentCaptured",
            "PaymentVoided",
            "PaymentRefunded"
        ]
    );
    let net: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM gateway_ledger WHERE idempotency_key LIKE '%' || $1",
    )
    .bind(order_id.to_string())
    .fetch_one(db.pool())
    .await?;
    assert_eq!(net, 0, "the money went back");
    Ok(())
}
