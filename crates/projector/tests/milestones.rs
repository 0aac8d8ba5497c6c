//! `order_milestones` against a real PostgreSQL (`TestDb`): the milestones of a full
//! happy order, and replay (also of a dropped table) gives identical rows.
use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::commands::{ApproveOrder, PlaceOrder, Shipping, ShippingMethod};
use domain::events::{PaymentCaptured, ShipmentDelivered, ShipmentShipped, StockReserved};
use domain::{order, streams, DomainEvent, Evolve, OrderInput, OrderState, PlacementFacts, Rules};
use eventstore::EventStore;
use projector::milestones::{MilestoneRow, MilestonesProjection};
use testkit::fixtures::{append, line};
use testkit::TestDb;
use uuid::Uuid;

/// Generous: `read_all` waits for every transaction on the server that began before,
/// including other tests' databases.
const DEADLINE: Duration = Duration::from_secs(30);

/// Decides `input` on the order and appends the decision to its stream.
async fn decide(
    store: &EventStore,
    state: &mut OrderState,
    order_id: Uuid,
    input: OrderInput<'_>,
) -> anyhow::Result<()> {
    let events = order::decide(state, input);
    anyhow::ensure!(!events.is_empty(), "the order decided nothing");
    append(store, &streams::order(order_id), &events).await?;
    for e in &events {
        state.apply(e);
    }
    Ok(())
}

/// A two-line order at the review threshold, shipped standard: placed, approved,
/// reserved line by line, paid, confirmed, shipped, delivered — as the services would
/// record it.
async fn happy_order(store: &EventStore) -> anyhow::Result<Uuid> {
    let order_id = Uuid::new_v4();
    let items = vec![line("A", 1, 60_000), line("B", 2, 20_000)];
    let skus: BTreeSet<String> = ["A", "B"].into_iter().map(String::from).collect();
    let mut state = OrderState::default();
    let place = PlaceOrder {
        order_id,
        customer_id: "c-1".to_owned(),
        currency: "EUR".to_owned(),
        items: items.clone(),
        payment_token: "tok_ok".to_owned(),
        shipping: Some(Shipping {
            method: ShippingMethod::Standard,
            address: "1 Main St".to_owned(),
        }),
    };
    let shipping = place.shipping.clone();
    decide(
        store,
        &mut state,
        order_id,
        OrderInput::Place {
            cmd: place,
            rules: &Rules::default(),
            known_skus: &skus,
            facts: PlacementFacts::default(),
            now: Utc::now(),
        },
    )
    .await?;
    decide(
        store,
        &mut state,
        order_id,
        OrderInput::Approve(ApproveOrder {
            order_id,
            reviewer: "rita".to_owned(),
        }),
    )
    .await?;
    for (index, item) in items.iter().enumerate() {
        let reserved = StockReserved {
            sku: item.sku.clone(),
            order_id,
            line: u32::try_from(index)?,
            quantity: item.quantity,
        };
        append(
            store,
            &streams::stock(&item.sku),
            &[DomainEvent::StockReserved(reserved.clone())],
        )
        .await?;
        decide(
            store,
            &mut state,
            order_id,
            OrderInput::LineReserved(reserved),
        )
        .await?;
    }
    let captured = PaymentCaptured {
        order_id,
        amount_cents: 100_000,
        gateway_reference: "sim-1".to_owned(),
        unwanted: false,
    };
    append(
        store,
        &streams::payment(order_id),
        &[DomainEvent::PaymentCaptured(captured.clone())],
    )
    .await?;
    decide(
        store,
        &mut state,
        order_id,
        OrderInput::PaymentCaptured(captured),
    )
    .await?;
    append(
        store,
        &streams::shipment(order_id),
        &[DomainEvent::ShipmentShipped(ShipmentShipped {
            order_id,
            shipping: shipping.ok_or_else(|| anyhow::anyhow!("no shipping"))?,
            items,
            deliver_at: Utc::now(),
        })],
    )
    .await?;
    decide(store, &mut state, order_id, OrderInput::MarkShipped).await?;
    append(
        store,
        &streams::shipment(order_id),
        &[DomainEvent::ShipmentDelivered(ShipmentDelivered {
            order_id,
        })],
    )
    .await?;
    Ok(order_id)
}

async fn rows(store: &EventStore) -> anyhow::Result<Vec<MilestoneRow>> {
    Ok(sqlx::query_as(
        "SELECT order_id, milestone, reached_at, global_position FROM order_milestones
          ORDER BY order_id, global_position, milestone",
    )
    .fetch_all(store.pool())
    .await?)
}

/// Projects until `expected` milestone rows are there.
async fn project(store: &EventStore, expected: usize) -> anyhow::Result<Vec<MilestoneRow>> {
    testkit::wait_until("the milestones to be projected", DEADLINE, || async {
        while projector::run_once(store, &MilestonesProjection).await? > 0 {}
        let rows = rows(store).await?;
        Ok((rows.len() >= expected).then_some(rows))
    })
    .await
}

async fn recorded_at(
    store: &EventStore,
    stream: &str,
    event_type: &str,
) -> anyhow::Result<(DateTime<Utc>, i64)> {
    Ok(sqlx::query_as(
        "SELECT recorded_at, global_position FROM events
          WHERE stream_name = $1 AND event_type = $2",
    )
    .bind(stream)
    .bind(event_type)
    .fetch_one(store.pool())
    .await?)
}

#[tokio::test]
async fn a_happy_order_reaches_every_milestone_at_the_time_of_its_event() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let order_id = happy_order(&db.store).await?;
    let rows = project(&db.store, 8).await?;
    let names: Vec<&str> = rows.iter().map(|r| r.milestone.as_str()).collect();
    assert_eq!(
        names,
        [
            "placed",
            "reviewed",
            "accepted",
            "reserved",
            "paid",
            "confirmed",
            "shipped",
            "delivered"
        ]
    );
    assert!(rows.iter().all(|r| r.order_id == order_id));
    let order = streams::order(order_id);
    let shipment = streams::shipment(order_id);
    for (milestone, stream, event_type) in [
        ("placed", &order, "OrderPlaced"),
        ("reviewed", &order, "OrderApproved"),
        ("paid", &order, "OrderPaymentCaptured"),
        ("confirmed", &order, "OrderConfirmed"),
        ("shipped", &shipment, "ShipmentShipped"),
        ("delivered", &shipment, "ShipmentDelivered"),
    ] {
        let row = rows
            .iter()
            .find(|r| r.milestone == milestone)
            .ok_or_else(|| anyhow::anyhow!("no {milestone}"))?;
        assert_eq!(
            (row.reached_at, row.global_position),
            recorded_at(&db.store, stream, event_type).await?,
            "{milestone}"
        );
    }
    // reserved is reached by the second line's reservation, not the first
    let reserved = rows.iter().find(|r| r.milestone == "reserved");
    let last_line: i64 = sqlx::query_scalar(
        "SELECT max(global_position) FROM events
          WHERE stream_name = $1 AND event_type = 'OrderLineReserved'",
    )
    .bind(&order)
    .fetch_one(db.pool())
    .await?;
    assert_eq!(reserved.map(|r| r.global_position), Some(last_line));
    Ok(())
}

#[tokio::test]
async fn replay_gives_identical_milestones_also_after_the_table_was_dropped() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    happy_order(&db.store).await?;
    happy_order(&db.store).await?;
    let live = project(&db.store, 16).await?;
    assert_eq!(live.len(), 16);

    projector::replay(&db.store, std::sync::Arc::new(MilestonesProjection), |_| {}).await?;
    assert_eq!(rows(&db.store).await?, live);

    sqlx::query("DROP TABLE order_milestones")
        .execute(db.pool())
        .await?;
    projector::replay(&db.store, std::sync::Arc::new(MilestonesProjection), |_| {}).await?;
    assert_eq!(rows(&db.store).await?, live);
    assert!(projector::all_projections()
        .iter()
        .any(|p| p.name() == "order_milestones"));
    Ok(())
}
