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
