//! Events for tests: build and append domain events the way the services do.
use chrono::{DateTime, Utc};
use domain::commands::OrderLine;
use domain::DomainEvent;
use eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent};
use uuid::Uuid;

/// The events ready to append, with fresh ids and one correlation id.
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

/// Appends `events` to `stream` in one transaction.
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
