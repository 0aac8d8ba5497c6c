use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::commands::OrderLine;
use domain::{order, streams, DomainEvent, EventEnvelope, Evolve, OrderInput, OrderState};
use eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent};
use projector::Projection;
use uuid::Uuid;

/// Generous: `read_all` waits for every transaction on the server that began before,
/// including other tests' databases.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn new_events(events: &[DomainEvent]) -> Vec<NewEvent> {
    let correlation_id = Uuid::new_v4();
    events
        .iter()
        .map(|e| NewEvent {
            event_id: Uuid::new_v4(),
            event_type: e.event_type().to_owned(),
            schema_version: e.schema_version(),
            payload: e.to_payload(),
            metadata: Metadata {
                correlation_id,
                causation_id: Uuid::new_v4(),
            },
        })
        .collect()
}

pub async fn append(
    store: &EventStore,
    stream: &str,
    events: &[DomainEvent],
) -> anyhow::Result<()> {
    store
        .append(stream, ExpectedVersion::Any, new_events(events))
        .await?;
    Ok(())
}

pub fn line(sku: &str, quantity: i64, unit_price_cents: i64) -> OrderLine {
    OrderLine {
        sku: sku.to_owned(),
        quantity,
        unit_price_cents,
    }
}

/// Places an order (see `placement`); under review it expires in 24 hours.
pub async fn place(
    store: &EventStore,
    token: &str,
    items: Vec<OrderLine>,
) -> anyhow::Result<(Uuid, OrderState)> {
    place_expiring(
        store,
        token,
        items,
        Utc::now() + chrono::Duration::hours(24),
    )
    .await
}

pub async fn place_expiring(
    store: &EventStore,
    token: &str,
    items: Vec<OrderLine>,
    review_expires_at: DateTime<Utc>,
) -> anyhow::Result<(Uuid, OrderState)> {
    let order_id = Uuid::new_v4();
    let events = placement(order_id, token, &items, true, review_expires_at)?;
    append(store, &streams::order(order_id), &events).await?;
    Ok((order_id, domain::fold(&events)))
}

/// Decides `input` on the order and appends the decision.
pub async fn decide_order(
    store: &EventStore,
    order_id: Uuid,
    mut state: OrderState,
    input: OrderInput<'_>,
) -> anyhow::Result<OrderState> {
    let events = order::decide(&state, input);
    anyhow::ensure!(!events.is_empty(), "the order decided nothing");
    append(store, &streams::order(order_id), &events).await?;
    for e in &events {
        state.apply(e);
    }
    Ok(state)
}

pub async fn stream(store: &EventStore, name: &str) -> anyhow::Result<Vec<RecordedEvent>> {
    Ok(store.read_stream(name, 0).await?)
}

pub async fn types(store: &EventStore, name: &str) -> anyhow::Result<Vec<String>> {
    Ok(stream(store, name)
        .await?
        .into_iter()
        .map(|r| r.event_type)
        .collect())
}

/// The last `event_type` event of the stream, as services receive it.
pub async fn envelope(
    store: &EventStore,
    name: &str,
    event_type: &str,
) -> anyhow::Result<EventEnvelope> {
    let rec = stream(store, name)
        .await?
        .into_iter()
        .rev()
        .find(|r| r.event_type == event_type)
        .ok_or_else(|| anyhow::anyhow!("no {event_type} on {name}"))?;
    Ok(projector::to_envelope(&rec)?)
}

async fn behind(store: &EventStore, checkpoint: &str) -> anyhow::Result<i64> {
    let at = store.load_checkpoint(checkpoint).await?;
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (transaction_id, global_position) > ($1, $2)",
    )
    .bind(at.transaction_id)
    .bind(at.global_position)
    .fetch_one(store.pool())
    .await?)
}

pub async fn catch_up(store: &EventStore, projection: &dyn Projection) -> anyhow::Result<()> {
    let checkpoint = format!("projection:{}", projection.name());
    testkit::wait_until(
        &format!("{} to catch up", projection.name()),
        DEADLINE,
        || async {
            while projector::run_once(store, projection).await? > 0 {}
            Ok((behind(store, &checkpoint).await? == 0).then_some(()))
        },
    )
    .await
}

pub async fn catch_up_all(store: &EventStore) -> anyhow::Result<()> {
    for projection in projector::all_projections() {
        catch_up(store, projection.as_ref()).await?;
    }
    Ok(())
}

/// Runs the relay until its checkpoint is at the end of the log; returns how many it
/// published.
pub async fn relay_all(store: &EventStore, bus: &bus::Bus) -> anyhow::Result<usize> {
    let published = std::sync::atomic::AtomicUsize::new(0);
    testkit::wait_until("the relay to catch up", DEADLINE, || async {
        let n = services::relay::relay_page(store, bus).await?;
        published.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        Ok((behind(store, services::relay::CHECKPOINT).await? == 0).then_some(()))
    })
    .await?;
    Ok(published.into_inner())
}

pub async fn timers(
    store: &EventStore,
) -> anyhow::Result<Vec<(Uuid, String, Uuid, DateTime<Utc>)>> {
    Ok(
        sqlx::query_as("SELECT timer_id, kind, order_id, due_at FROM timers ORDER BY timer_id")
            .fetch_all(store.pool())
            .await?,
    )
}

/// (kind, outcome, amount) of the gateway's ledger rows for `key`.
pub async fn ledger(store: &EventStore, key: &str) -> anyhow::Result<Vec<(String, String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT kind, outcome, amount_cents FROM gateway_ledger WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_all(store.pool())
    .await?)
}

/// The events of placing an order, as the order saga decides them under the default
/// rules (workflow 1): `OrderPlaced`, then `OrderRejected` (a quantity below 1),
/// `OrderSentForReview` (total at or above 100000, expiring at `review_expires_at`)
/// or `OrderAccepted`. Built from the v1 payloads, which every schema version since
/// decodes (upcasts), so these helpers do not depend on the latest payload shape.
pub fn placement(
    order_id: Uuid,
    token: &str,
    items: &[OrderLine],
    shipped: bool,
    review_expires_at: DateTime<Utc>,
) -> anyhow::Result<Vec<DomainEvent>> {
    let total: i64 = items.iter().map(|l| l.quantity * l.unit_price_cents).sum();
    let item_count: i64 = items.iter().map(|l| l.quantity).sum();
    let review = total >= 100_000;
    let shipping =
        shipped.then(|| serde_json::json!({ "method": "standard", "address": "1 Main St" }));
    let placed = DomainEvent::decode(
        "OrderPlaced",
        1,
        &serde_json::json!({
            "order_id": order_id, "customer_id": "customer-1", "currency": "EUR",
            "items": items, "payment_token": token, "shipping": shipping,
            "total_cents": total, "item_count": item_count,
            "plan": { "workflow_version": 1, "review": review, "ship": shipped,
                      "review_timeout_ms": 86_400_000u64, "payment_timeout_ms": 30_000u64,
                      "delivery_delay_ms": 2_000u64 }
        }),
    )?;
    let next = if items.is_empty() || items.iter().any(|l| l.quantity < 1) {
        DomainEvent::OrderRejected(domain::events::OrderRejected {
            order_id,
            reason: domain::events::CancelReason::InvalidOrder,
            detail: "quantity below 1".to_owned(),
        })
    } else if review {
        DomainEvent::decode(
            "OrderSentForReview",
            1,
            &serde_json::json!({
                "order_id": order_id, "total_cents": total, "threshold_cents": 100_000,
                "expires_at": review_expires_at
            }),
        )?
    } else {
        DomainEvent::OrderAccepted(domain::events::OrderAccepted {
            order_id,
            customer_id: "customer-1".to_owned(),
            currency: "EUR".to_owned(),
            items: items.to_vec(),
            payment_token: token.to_owned(),
            total_cents: total,
            payment_timeout_ms: 30_000,
        })
    };
    Ok(vec![placed, next])
}
