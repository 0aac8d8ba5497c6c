//! Data protection on a real PostgreSQL: the intake seals the customer's personal data
//! with the customer's key, readers open it while the key exists, and forgetting the
//! customer (destroying the key) leaves the log readable with the data redacted.
use domain::commands::ShippingMethod;
use domain::commands::{CancelOrder, Command, PlaceOrder, RejectOrder, SetStock, Shipping};
use domain::{streams, DomainEvent, OrderState, Rules};
use services::commands::CommandService;
use services::exec::{load, Cause};
use services::vault::{is_sealed, Forgotten, Vault, FORGOTTEN};
use testkit::fixtures::line;
use testkit::TestDb;
use uuid::Uuid;

const ADDRESS: &str = "42 Secret Lane, Hushville";

fn cause() -> Cause {
    let id = Uuid::new_v4();
    Cause::new(id, id, "commands")
}

fn place(order_id: Uuid, customer: &str, address: &str, unit_price_cents: i64) -> Command {
    Command::PlaceOrder(PlaceOrder {
        order_id,
        customer_id: customer.to_owned(),
        currency: "EUR".to_owned(),
        items: vec![line("A", 1, unit_price_cents)],
        payment_token: "tok_ok".to_owned(),
        shipping: Some(Shipping {
            method: ShippingMethod::Standard,
            address: address.to_owned(),
        }),
    })
}

async fn intake(db: &TestDb) -> anyhow::Result<CommandService> {
    let service = CommandService::new(db.store.clone(), Rules::default());
    service
        .handle(
            Command::SetStock(SetStock {
                sku: "A".to_owned(),
                quantity: 10,
            }),
            &cause(),
        )
        .await?;
    Ok(service)
}

/// Every payload in the log, as text.
async fn log_text(db: &TestDb) -> anyhow::Result<String> {
    let texts: Vec<String> = sqlx::query_scalar("SELECT payload::text FROM events")
        .fetch_all(db.pool())
        .await?;
    Ok(texts.join("\n"))
}

/// The order's events as a reader that opens them sees them.
async fn opened(
    db: &TestDb,
    vault: &Vault,
    order_id: Uuid,
) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    for mut rec in db.store.read_stream(&streams::order(order_id), 0).await? {
        vault
            .open_payload(&rec.event_type, &mut rec.payload)
            .await?;
        out.push((rec.event_type, rec.payload));
    }
    Ok(out)
}

fn payload_of<'a>(
    events: &'a [(String, serde_json::Value)],
    event_type: &str,
) -> Option<&'a serde_json::Value> {
    events.iter().find(|(t, _)| t == event_type).map(|(_, p)| p)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_address_is_sealed_in_the_log_and_reads_as_forgotten_once_the_key_is_destroyed(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let service = intake(&db).await?;
    let order_id = Uuid::new_v4();
    service
        .handle(place(order_id, "c-sealed", ADDRESS, 500), &cause())
        .await?;

    // The log never holds the address in clear, and the placement is at v3.
    assert!(!log_text(&db).await?.contains("Secret Lane"));
    let stored = db.store.read_stream(&streams::order(order_id), 0).await?;
    assert_eq!(
        (stored[0].event_type.as_str(), stored[0].schema_version),
        ("OrderPlaced", 3)
    );
    assert!(stored[0].payload["shipping"]["address"]
        .as_str()
        .is_some_and(is_sealed));

    // A reader with the key sees it.
    let vault = Vault::new(db.pool().clone());
    let before = opened(&db, &vault, order_id).await?;
    assert_eq!(
        payload_of(&before, "OrderPlaced").map(|p| p["shipping"]["address"].clone()),
        Some(serde_json::json!(ADDRESS))
    );

    assert!(matches!(
        vault.forget("c-sealed").await?,
        Forgotten::Now { .. }
    ));

    // Afterwards: this process and a fresh one read the marker; the log is unchanged
    // and still folds (the saga and replays go on).
    for reader in [&vault, &Vault::new(db.pool().clone())] {
        let after = opened(&db, reader, order_id).await?;
        assert_eq!(
            payload_of(&after, "OrderPlaced").map(|p| p["shipping"]["address"].clone()),
            Some(serde_json::json!(FORGOTTEN))
        );
    }
    let unchanged = db.store.read_stream(&streams::order(order_id), 0).await?;
    assert_eq!(unchanged, stored);
    let state = load::<OrderState>(&db.store, &streams::order(order_id)).await?;
    assert_eq!(state.state.order_id(), Some(order_id));
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_keys")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(keys, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_placement_has_no_effect_and_one_with_another_address_is_refused(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let service = intake(&db).await?;
    let order_id = Uuid::new_v4();
    let stream = streams::order(order_id);
    service
        .handle(place(order_id, "c-1", ADDRESS, 500), &cause())
        .await?;
    let placed_version = db.store.stream_version(&stream).await?;

    // The same content under a new message id: nothing recorded, though the address
    // was sealed again with a new nonce.
    service
        .handle(place(order_id, "c-1", ADDRESS, 500), &cause())
        .await?;
    assert_eq!(db.store.stream_version(&stream).await?, placed_version);

    // Another address is other content: refused.
    service
        .handle(place(order_id, "c-1", "1 Other Road", 500), &cause())
        .await?;
    let events = db.store.read_stream(&stream, 0).await?;
    assert_eq!(
        events.last().map(|e| e.event_type.as_str()),
        Some("OrderCommandRefused")
    );
    assert!(!log_text(&db).await?.contains("Other Road"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_customers_cancel_reason_is_sealed_and_a_reviewers_reason_is_not() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let service = intake(&db).await?;
    let vault = Vault::new(db.pool().clone());

    let cancelled = Uuid::new_v4();
    service
        .handle(place(cancelled, "c-1", ADDRESS, 500), &cause())
        .await?;
    service
        .handle(
            Command::CancelOrder(CancelOrder {
                order_id: cancelled,
                reason: "moving to Mars next week".to_owned(),
            }),
            &cause(),
        )
        .await?;
    let events = opened(&db, &vault, cancelled).await?;
    assert_eq!(
        payload_of(&events, "OrderCancelled").map(|p| p["detail"].clone()),
        Some(serde_json::json!("moving to Mars next week"))
    );

    // Above the review threshold: the reviewer rejects, in staff words kept clear.
    let reviewed = Uuid::new_v4();
    service
        .handle(place(reviewed, "c-2", ADDRESS, 200_000), &cause())
        .await?;
    service
        .handle(
            Command::RejectOrder(RejectOrder {
                order_id: reviewed,
                reviewer: "rita".to_owned(),
                reason: "address does not exist".to_owned(),
            }),
            &cause(),
        )
        .await?;
    let log = log_text(&db).await?;
    assert!(!log.contains("Mars"));
    assert!(log.contains("address does not exist"));

    // Forgetting the first customer redacts the reason; the decoded event still folds.
    vault.forget("c-1").await?;
    let events = opened(&db, &vault, cancelled).await?;
    let detail = payload_of(&events, "OrderCancelled").map(|p| p["detail"].clone());
    assert_eq!(detail, Some(serde_json::json!(FORGOTTEN)));
    let (event_type, payload) = events
        .iter()
        .find(|(t, _)| t == "OrderCancelled")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no OrderCancelled"))?;
    assert!(matches!(
        DomainEvent::decode(&event_type, 2, &payload)?,
        DomainEvent::OrderCancelled(c) if c.detail == FORGOTTEN
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn forgetting_is_recorded_once_and_a_returning_customer_gets_a_new_key() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let vault = Vault::new(db.pool().clone());
    assert_eq!(vault.forget("nobody").await?, Forgotten::Unknown);

    let other = Vault::new(db.pool().clone());
    let first = other.key_for("c-9").await?;
    let old_token = first.seal("old address")?;
    assert_eq!(
        vault.forget("c-9").await?,
        Forgotten::Now {
            key_id: first.key_id()
        }
    );
    assert!(matches!(
        vault.forget("c-9").await?,
        Forgotten::Already { .. }
    ));
    let tombstones: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT key_id, customer_id FROM forgotten_customers")
            .fetch_all(db.pool())
            .await?;
    assert_eq!(tombstones, vec![(first.key_id(), "c-9".to_owned())]);

    // The customer orders again, through another process that used the old key before
    // it was destroyed: a new key (sealing never trusts a cached key); nothing sealed
    // before comes back.
    let second = other.key_for("c-9").await?;
    assert_ne!(second.key_id(), first.key_id());
    assert_eq!(vault.open_text(&old_token).await?, FORGOTTEN);
    assert_eq!(
        vault.open_text(&second.seal("new address")?).await?,
        "new address"
    );
    // Clear text (events written before sealing began) reads as it is.
    assert_eq!(vault.open_text("1 Main St").await?, "1 Main St");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_creating_a_customers_first_key_at_once_agree_on_one() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let vaults: Vec<Vault> = (0..4).map(|_| Vault::new(db.pool().clone())).collect();
    let keys = futures::future::try_join_all(vaults.iter().map(|v| v.key_for("c-race"))).await?;
    let first = keys[0].key_id();
    assert!(keys.iter().all(|k| k.key_id() == first));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_keys")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(rows, 1);
    Ok(())
}
