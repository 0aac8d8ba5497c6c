//! Versioned, dynamic workflow against a real PostgreSQL (`TestDb`): two workflow
//! versions side by side on one store, each order finishing under the plan it recorded;
//! and a stored v1 `OrderPlaced` read back in the v2 shape.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use domain::commands::{ApproveOrder, Command, OrderLine, PlaceOrder, SetStock};
use domain::{streams, DomainEvent, OrderState, OrderStatus, Rules};
use eventstore::{EventStore, ExpectedVersion, LogPosition, Metadata, NewEvent};
use services::commands::CommandService;
use services::exec::{load, Cause};
use services::gateway::{PaymentGateway, Simulator};
use services::inventory::Inventory;
use services::payment::Payments;
use services::saga::OrderSaga;
use testkit::TestDb;
use uuid::Uuid;

/// Generous: `read_all` waits for every transaction on the server that began before,
/// including other tests' databases.
const DEADLINE: Duration = Duration::from_secs(30);

/// At most 2 orders a minute per customer pass without review, under `version`.
fn rules(version: u32) -> Rules {
    Rules {
        workflow_version: version,
        fraud_max_orders_per_minute: Some(2),
        ..Rules::default()
    }
}

fn cause() -> Cause {
    Cause::new(Uuid::new_v4(), Uuid::new_v4(), "commands")
}

/// A small digital order (it completes once confirmed: no shipping timers involved).
fn order(customer: &str) -> PlaceOrder {
    PlaceOrder {
        order_id: Uuid::new_v4(),
        customer_id: customer.to_owned(),
        currency: "EUR".to_owned(),
        items: vec![OrderLine {
            sku: "A".to_owned(),
            quantity: 1,
            unit_price_cents: 1_000,
        }],
        payment_token: "tok_ok".to_owned(),
        shipping: None,
    }
}

async fn order_state(store: &EventStore, order_id: Uuid) -> anyhow::Result<OrderState> {
    Ok(load::<OrderState>(store, &streams::order(order_id))
        .await?
        .state)
}

/// The services that react to events, fed from the log in its order as the relay and
/// RabbitMQ would feed them: inventory, payment (gateway simulator), the order saga.
struct Fulfilment {
    store: EventStore,
    inventory: Inventory,
    payments: Payments,
    saga: OrderSaga,
    after: LogPosition,
}

impl Fulfilment {
    fn new(db: &TestDb) -> Fulfilment {
        let gateway: Arc<dyn PaymentGateway> =
            Arc::new(Simulator::new(db.pool().clone(), Duration::ZERO, 0.0));
        Fulfilment {
            store: db.store.clone(),
            inventory: Inventory::new(db.store.clone()),
            payments: Payments::new(db.store.clone(), gateway),
            saga: OrderSaga::new(db.store.clone()),
            after: LogPosition::START,
        }
    }

    /// Hands every event visible after the last one handed on to each service.
    async fn pump(&mut self) -> anyhow::Result<()> {
        loop {
            let page = self.store.read_all(self.after, 500).await?;
            let Some(last) = page.last().map(|r| r.log_position()) else {
                return Ok(());
            };
            for rec in &page {
                let env = projector::to_envelope(rec)?;
                self.inventory.react(&env).await?;
                self.payments.react(&env).await?;
                self.saga.react(&env).await?;
            }
            self.after = last;
        }
    }

    /// Pumps until every order in `orders` is terminal; their states.
    async fn finish(&mut self, orders: &[Uuid]) -> anyhow::Result<BTreeMap<Uuid, OrderState>> {
        let mut states = BTreeMap::new();
        let started = std::time::Instant::now();
        let mut wakeups = self.store.follow().await?;
        loop {
            self.pump().await?;
            states.clear();
            for id in orders {
                states.insert(*id, order_state(&self.store, *id).await?);
            }
            let done = states.values().all(|s| {
                matches!(
                    s.status,
                    OrderStatus::Completed | OrderStatus::Cancelled | OrderStatus::Rejected
                )
            });
            if done {
                return Ok(states);
            }
            anyhow::ensure!(
                started.elapsed() < DEADLINE,
                "orders not finished: {states:?}"
            );
            // The log shows an event once every older transaction on the server has
            // ended: wait for the next append (or a short poll), then look again.
            wakeups.wait(Duration::from_millis(50)).await;
        }
    }
}

/// The decision that placed the order: the event after `OrderPlaced`.
fn next_after_placed(stream: &[domain::EventEnvelope]) -> Option<&DomainEvent> {
    stream.get(1).map(|e| &e.event)
}

async fn order_stream(
    store: &EventStore,
    order_id: Uuid,
) -> anyhow::Result<Vec<domain::EventEnvelope>> {
    store
        .read_stream(&streams::order(order_id), 0)
        .await?
        .iter()
        .map(|r| Ok(projector::to_envelope(r)?))
        .collect()
}

#[tokio::test]
async fn v1_and_v2_orders_of_fast_customers_run_side_by_side_and_all_finish() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let v1 = CommandService::new(db.store.clone(), rules(1));
    let v2 = CommandService::new(db.store.clone(), rules(2));
    v1.handle(
        Command::SetStock(SetStock {
            sku: "A".to_owned(),
            quantity: 100,
        }),
        &cause(),
    )
    .await?;

    // The same pattern under each version: a customer placing 3 orders at once.
    let mut placed = Vec::new();
    for (service, customer) in [(&v1, "fast-v1"), (&v2, "fast-v2")] {
        for _ in 0..3 {
            let cmd = order(customer);
            placed.push((customer, cmd.order_id));
            service.handle(Command::PlaceOrder(cmd), &cause()).await?;
        }
    }

    let mut held = Vec::new();
    for (customer, order_id) in &placed {
        let stream = order_stream(&db.store, *order_id).await?;
        let Some(DomainEvent::OrderPlaced(p)) = stream.first().map(|e| &e.event) else {
            anyhow::bail!("{order_id} not placed");
        };
        match (*customer, next_after_placed(&stream)) {
            ("fast-v1", Some(DomainEvent::OrderAccepted(_))) => {
                assert_eq!(p.plan.workflow_version, 1);
                assert!(p.plan.checks.is_empty());
            }
            ("fast-v2", Some(DomainEvent::OrderAccepted(_))) => {
                assert_eq!(p.plan.checks, ["fraud_velocity"]);
            }
            ("fast-v2", Some(DomainEvent::OrderSentForReview(r))) => {
                assert_eq!(r.rule, "fraud_velocity");
                assert_eq!(p.plan.workflow_version, 2);
                held.push(*order_id);
            }
            (customer, other) => anyhow::bail!("{customer}: unexpected {other:?}"),
        }
    }
    assert_eq!(held.len(), 1, "only v2's third order waits for review");

    // The reviewer approves through a service configured with workflow 1: approval
    // reads no rules, the order goes on under its recorded v2 plan.
    v1.handle(
        Command::ApproveOrder(ApproveOrder {
            order_id: held[0],
            reviewer: "rita".to_owned(),
        }),
        &cause(),
    )
    .await?;

    let ids: Vec<Uuid> = placed.iter().map(|(_, id)| *id).collect();
    let states = Fulfilment::new(&db).finish(&ids).await?;
    for (customer, order_id) in &placed {
        let state = &states[order_id];
        assert_eq!(
            state.status,
            OrderStatus::Completed,
            "{customer} {order_id}"
        );
        let version = state.plan().map(|p| p.workflow_version);
        let expected = if *customer == "fast-v1" { 1 } else { 2 };
        assert_eq!(version, Some(expected));
    }
    Ok(())
}

#[tokio::test]
async fn the_fraud_count_comes_from_the_log_and_ignores_other_customers() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let v2 = CommandService::new(db.store.clone(), rules(2));
    v2.handle(
        Command::SetStock(SetStock {
            sku: "A".to_owned(),
            quantity: 100,
        }),
        &cause(),
    )
    .await?;
    for customer in ["a", "b", "c", "a"] {
        v2.handle(Command::PlaceOrder(order(customer)), &cause())
            .await?;
    }
    let other = order("d");
    assert_eq!(
        services::commands::recent_orders(&db.store, "a", other.order_id).await?,
        2
    );
    assert_eq!(
        services::commands::recent_orders(&db.store, "d", other.order_id).await?,
        0
    );
    // a redelivered placement does not count itself
    let again = order("a");
    v2.handle(Command::PlaceOrder(again.clone()), &cause())
        .await?;
    assert_eq!(
        services::commands::recent_orders(&db.store, "a", again.order_id).await?,
        2
    );
    Ok(())
}

#[tokio::test]
async fn a_stored_v1_order_placed_is_read_as_v2_by_the_services_and_the_projector(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let order_id = Uuid::new_v4();
    // As a build before schema version 2 wrote it: no plan.checks.
    let v1_payload = serde_json::json!({
        "order_id": order_id, "customer_id": "old-timer", "currency": "EUR",
        "items": [{"sku": "A", "quantity": 2, "unit_price_cents": 500}],
        "payment_token": "tok_ok", "shipping": null, "total_cents": 1_000, "item_count": 2,
        "plan": {"workflow_version": 1, "review": false, "ship": false,
                 "review_timeout_ms": 86_400_000, "payment_timeout_ms": 30_000,
                 "delivery_delay_ms": 2_000}
    });
    db.store
        .append(
            &streams::order(order_id),
            ExpectedVersion::NoStream,
            vec![NewEvent {
                event_id: Uuid::new_v4(),
                event_type: "OrderPlaced".to_owned(),
                schema_version: 1,
                payload: v1_payload.clone(),
                metadata: Metadata {
                    correlation_id: Uuid::new_v4(),
                    causation_id: Uuid::new_v4(),
                },
            }],
        )
        .await?;

    // The stored row is untouched ...
    let stored = db.store.read_stream(&streams::order(order_id), 0).await?;
    assert_eq!(
        (stored[0].schema_version, &stored[0].payload),
        (1, &v1_payload)
    );
    // ... and every reader sees the v2 shape: the decoder, the services' fold ...
    let event = DomainEvent::decode("OrderPlaced", 1, &stored[0].payload)?;
    assert_eq!(event.schema_version(), 3);
    assert_eq!(event.to_payload()["plan"]["checks"], serde_json::json!([]));
    let state = order_state(&db.store, order_id).await?;
    assert_eq!(state.plan().map(|p| p.checks.clone()), Some(vec![]));
    // ... and the projector, which projects it like any other placement.
    let envelope = projector::to_envelope(&stored[0])?;
    assert!(matches!(&envelope.event, DomainEvent::OrderPlaced(p) if p.plan.checks.is_empty()));
    for projection in projector::all_projections() {
        testkit::wait_until("the projection to apply the v1 event", DEADLINE, || async {
            Ok((projector::run_once(&db.store, projection.as_ref()).await? > 0).then_some(()))
        })
        .await?;
    }
    let status: String = sqlx::query_scalar("SELECT status FROM order_status WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(db.pool())
        .await?;
    assert_eq!(status, "pending");
    let milestone: String =
        sqlx::query_scalar("SELECT milestone FROM order_milestones WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(db.pool())
            .await?;
    assert_eq!(milestone, "placed");

    // A version this build does not know is still an error, not a guess.
    assert!(DomainEvent::decode("OrderPlaced", 3, &v1_payload).is_err());
    Ok(())
}
