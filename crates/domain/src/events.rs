//! The event catalogue: every fact orderflow records, with its stable type name and
//! payload. Stored events are a boundary that old data crosses: `decode` upcasts older
//! schema versions to the current shape.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::commands::{OrderLine, Shipping};
use crate::Cents;

/// The schema version every event is written with today.
pub const CURRENT_SCHEMA_VERSION: i32 = 1;

/// Why an order was cancelled or rejected: the codes `order_status.cancel_reason` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    InvalidOrder,
    PaymentDeclined,
    PaymentTimeout,
    OutOfStock,
    CustomerCancelled,
    ReviewRejected,
    ReviewExpired,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::InvalidOrder => "invalid_order",
            CancelReason::PaymentDeclined => "payment_declined",
            CancelReason::PaymentTimeout => "payment_timeout",
            CancelReason::OutOfStock => "out_of_stock",
            CancelReason::CustomerCancelled => "customer_cancelled",
            CancelReason::ReviewRejected => "review_rejected",
            CancelReason::ReviewExpired => "review_expired",
        }
    }
}

/// The order's step plan, computed once from the rules when the order is placed and
/// recorded in `OrderPlaced` (dynamic, versioned workflow): the order follows it even
/// if the rules change while it is in flight, and replay follows it too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowPlan {
    pub workflow_version: u32,
    /// Wait for a human decision before reserving and charging.
    pub review: bool,
    /// Enter the shipping sub-process (false: digital-only, ends `completed`).
    pub ship: bool,
    pub review_timeout_ms: u64,
    pub payment_timeout_ms: u64,
    /// Delivery delay of the simulated carrier for this order's shipping method.
    pub delivery_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentFailure {
    Declined,
    Timeout,
}

// ---------------------------------------------------------------- order-<uuid>

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: String,
    pub currency: String,
    pub items: Vec<OrderLine>,
    pub payment_token: String,
    pub shipping: Option<Shipping>,
    /// Sum of quantity × unit price over the lines.
    pub total_cents: Cents,
    /// Sum of the lines' quantities.
    pub item_count: i64,
    pub plan: WorkflowPlan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRejected {
    pub order_id: Uuid,
    pub reason: CancelReason,
    /// What was wrong, for people.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSentForReview {
    pub order_id: Uuid,
    pub total_cents: Cents,
    pub threshold_cents: Cents,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderApproved {
    pub order_id: Uuid,
    pub reviewer: String,
}

/// Fulfilment starts: the parallel split into stock reservation and payment.
/// Self-contained, so that inventory and payment need not read the order stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderAccepted {
    pub order_id: Uuid,
    pub customer_id: String,
    pub currency: String,
    pub items: Vec<OrderLine>,
    pub payment_token: String,
    pub total_cents: Cents,
    pub payment_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLineReserved {
    pub order_id: Uuid,
    pub line: u32,
    pub sku: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLineOutOfStock {
    pub order_id: Uuid,
    pub line: u32,
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPaymentCaptured {
    pub order_id: Uuid,
    pub amount_cents: Cents,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPaymentFailed {
    pub order_id: Uuid,
    pub reason: PaymentFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub items: Vec<OrderLine>,
    pub shipping: Option<Shipping>,
    pub delivery_delay_ms: u64,
}

/// A digital-only order is done once confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCompleted {
    pub order_id: Uuid,
    pub items: Vec<OrderLine>,
}

/// Appended by shipping, atomically with `ShipmentShipped`, so that a concurrent
/// cancellation either happens first (and nothing ships) or is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderShipped {
    pub order_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub reason: CancelReason,
    /// Free text: the customer's or reviewer's reason, or what failed.
    pub detail: String,
    /// Who decided, when a person did (the reviewer).
    pub by: Option<String>,
}

/// Compensation: inventory releases this line's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReleaseRequested {
    pub order_id: Uuid,
    pub line: u32,
    pub sku: String,
    pub quantity: i64,
}

/// A command that decoded but broke a business rule; nothing else changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCommandRefused {
    pub order_id: Uuid,
    /// The command's routing key, e.g. `order.cancel`.
    pub command: String,
    pub reason: String,
}

// ---------------------------------------------------------------- stock-<sku>

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockSet {
    pub sku: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockSetRefused {
    pub sku: String,
    pub quantity: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReserved {
    pub sku: String,
    pub order_id: Uuid,
    pub line: u32,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReservationFailed {
    pub sku: String,
    pub order_id: Uuid,
    pub line: u32,
    pub requested: i64,
    pub available: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReleased {
    pub sku: String,
    pub order_id: Uuid,
    pub line: u32,
    pub quantity: i64,
}

/// Reserved units leave the warehouse (shipped, or a digital order completed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockCommitted {
    pub sku: String,
    pub order_id: Uuid,
    pub line: u32,
    pub quantity: i64,
}

// ---------------------------------------------------------------- payment-<uuid>

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequested {
    pub order_id: Uuid,
    pub amount_cents: Cents,
    pub currency: String,
    pub payment_token: String,
    /// The payment timer: unsettled by then, the payment times out.
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: Uuid,
    pub amount_cents: Cents,
    pub gateway_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentTimedOut {
    pub order_id: Uuid,
}

/// The order was cancelled before the payment settled (or was even requested): stop
/// trying, and request nothing any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentVoided {
    pub order_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub order_id: Uuid,
    pub amount_cents: Cents,
    pub gateway_reference: String,
}

// ---------------------------------------------------------------- shipment-<uuid>

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentShipped {
    pub order_id: Uuid,
    pub shipping: Shipping,
    pub items: Vec<OrderLine>,
    /// The delivery timer of the simulated carrier.
    pub deliver_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDelivered {
    pub order_id: Uuid,
}

/// Every event orderflow records. The variant name is the stored `event_type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum DomainEvent {
    OrderPlaced(OrderPlaced),
    OrderRejected(OrderRejected),
    OrderSentForReview(OrderSentForReview),
    OrderApproved(OrderApproved),
    OrderAccepted(OrderAccepted),
    OrderLineReserved(OrderLineReserved),
    OrderLineOutOfStock(OrderLineOutOfStock),
    OrderPaymentCaptured(OrderPaymentCaptured),
    OrderPaymentFailed(OrderPaymentFailed),
    OrderConfirmed(OrderConfirmed),
    OrderCompleted(OrderCompleted),
    OrderShipped(OrderShipped),
    OrderCancelled(OrderCancelled),
    StockReleaseRequested(StockReleaseRequested),
    OrderCommandRefused(OrderCommandRefused),
    StockSet(StockSet),
    StockSetRefused(StockSetRefused),
    StockReserved(StockReserved),
    StockReservationFailed(StockReservationFailed),
    StockReleased(StockReleased),
    StockCommitted(StockCommitted),
    PaymentRequested(PaymentRequested),
    PaymentCaptured(PaymentCaptured),
    PaymentDeclined(PaymentDeclined),
    PaymentTimedOut(PaymentTimedOut),
    PaymentVoided(PaymentVoided),
    PaymentRefunded(PaymentRefunded),
    ShipmentShipped(ShipmentShipped),
    ShipmentDelivered(ShipmentDelivered),
}

/// Every stored event type name, for docs, `orderflow check` and topology bindings.
pub const EVENT_TYPES: [&str; 29] = [
    "OrderPlaced",
    "OrderRejected",
    "OrderSentForReview",
    "OrderApproved",
    "OrderAccepted",
    "OrderLineReserved",
    "OrderLineOutOfStock",
    "OrderPaymentCaptured",
    "OrderPaymentFailed",
    "OrderConfirmed",
    "OrderCompleted",
    "OrderShipped",
    "OrderCancelled",
    "StockReleaseRequested",
    "OrderCommandRefused",
    "StockSet",
    "StockSetRefused",
    "StockReserved",
    "StockReservationFailed",
    "StockReleased",
    "StockCommitted",
    "PaymentRequested",
    "PaymentCaptured",
    "PaymentDeclined",
    "PaymentTimedOut",
    "PaymentVoided",
    "PaymentRefunded",
    "ShipmentShipped",
    "ShipmentDelivered",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type '{0}'")]
    UnknownType(String),
    #[error("event type '{event_type}' has no decoder for schema version {schema_version}")]
    UnknownVersion {
        event_type: String,
        schema_version: i32,
    },
    #[error("malformed {event_type} payload: {reason}")]
    Malformed { event_type: String, reason: String },
}

impl DomainEvent {
    /// The stored `event_type`.
    pub fn event_type(&self) -> &'static str {
        // The serde tag is the variant name; serialising just the tag is cheap enough
        // to avoid, so match instead.
        use DomainEvent::*;
        match self {
            OrderPlaced(_) => "OrderPlaced",
            OrderRejected(_) => "OrderRejected",
            OrderSentForReview(_) => "OrderSentForReview",
            OrderApproved(_) => "OrderApproved",
            OrderAccepted(_) => "OrderAccepted",
            OrderLineReserved(_) => "OrderLineReserved",
            OrderLineOutOfStock(_) => "OrderLineOutOfStock",
            OrderPaymentCaptured(_) => "OrderPaymentCaptured",
            OrderPaymentFailed(_) => "OrderPaymentFailed",
            OrderConfirmed(_) => "OrderConfirmed",
            OrderCompleted(_) => "OrderCompleted",
            OrderShipped(_) => "OrderShipped",
            OrderCancelled(_) => "OrderCancelled",
            StockReleaseRequested(_) => "StockReleaseRequested",
            OrderCommandRefused(_) => "OrderCommandRefused",
            StockSet(_) => "StockSet",
            StockSetRefused(_) => "StockSetRefused",
            StockReserved(_) => "StockReserved",
            StockReservationFailed(_) => "StockReservationFailed",
            StockReleased(_) => "StockReleased",
            StockCommitted(_) => "StockCommitted",
            PaymentRequested(_) => "PaymentRequested",
            PaymentCaptured(_) => "PaymentCaptured",
            PaymentDeclined(_) => "PaymentDeclined",
            PaymentTimedOut(_) => "PaymentTimedOut",
            PaymentVoided(_) => "PaymentVoided",
            PaymentRefunded(_) => "PaymentRefunded",
            ShipmentShipped(_) => "ShipmentShipped",
            ShipmentDelivered(_) => "ShipmentDelivered",
        }
    }

    pub fn schema_version(&self) -> i32 {
        CURRENT_SCHEMA_VERSION
    }

    /// The payload as stored in `events.payload`.
    pub fn to_payload(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut map)) => {
                map.remove("payload").unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        }
    }

    /// Decodes a stored event, upcasting older schema versions to the current shape.
    pub fn decode(
        event_type: &str,
        schema_version: i32,
        payload: &serde_json::Value,
    ) -> Result<DomainEvent, DecodeError> {
        if !EVENT_TYPES.contains(&event_type) {
            return Err(DecodeError::UnknownType(event_type.to_owned()));
        }
        let payload = upcast(event_type, schema_version, payload.clone())?;
        let tagged = serde_json::json!({ "type": event_type, "payload": payload });
        serde_json::from_value(tagged).map_err(|e| DecodeError::Malformed {
            event_type: event_type.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The order an event concerns, if any (every event but the stock-level ones).
    pub fn order_id(&self) -> Option<Uuid> {
        use DomainEvent::*;
        Some(match self {
            OrderPlaced(e) => e.order_id,
            OrderRejected(e) => e.order_id,
            OrderSentForReview(e) => e.order_id,
            OrderApproved(e) => e.order_id,
            OrderAccepted(e) => e.order_id,
            OrderLineReserved(e) => e.order_id,
            OrderLineOutOfStock(e) => e.order_id,
            OrderPaymentCaptured(e) => e.order_id,
            OrderPaymentFailed(e) => e.order_id,
            OrderConfirmed(e) => e.order_id,
            OrderCompleted(e) => e.order_id,
            OrderShipped(e) => e.order_id,
            OrderCancelled(e) => e.order_id,
            StockReleaseRequested(e) => e.order_id,
            OrderCommandRefused(e) => e.order_id,
            StockSet(_) | StockSetRefused(_) => return None,
            StockReserved(e) => e.order_id,
            StockReservationFailed(e) => e.order_id,
            StockReleased(e) => e.order_id,
            StockCommitted(e) => e.order_id,
            PaymentRequested(e) => e.order_id,
            PaymentCaptured(e) => e.order_id,
            PaymentDeclined(e) => e.order_id,
            PaymentTimedOut(e) => e.order_id,
            PaymentVoided(e) => e.order_id,
            PaymentRefunded(e) => e.order_id,
            ShipmentShipped(e) => e.order_id,
            ShipmentDelivered(e) => e.order_id,
        })
    }
}

/// Brings a stored payload of an older schema version to the current shape.
/// Version 1 is the first; later versions add arms here, never edit stored rows.
fn upcast(
    event_type: &str,
    schema_version: i32,
    payload: serde_json::Value,
) -> Result<serde_json::Value, DecodeError> {
    match schema_version {
        CURRENT_SCHEMA_VERSION => Ok(payload),
        _ => Err(DecodeError::UnknownVersion {
            event_type: event_type.to_owned(),
            schema_version,
        }),
    }
}

/// A domain event with the identity and context the log gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub stream_name: String,
    pub stream_version: i64,
    pub global_position: i64,
    pub recorded_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub event: DomainEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_round_trips_through_its_payload() {
        let e = DomainEvent::OrderCancelled(OrderCancelled {
            order_id: Uuid::from_u128(7),
            reason: CancelReason::OutOfStock,
            detail: "sku A short by 2".into(),
            by: None,
        });
        let payload = e.to_payload();
        assert_eq!(payload["reason"], "out_of_stock");
        assert_eq!(DomainEvent::decode(e.event_type(), 1, &payload), Ok(e));
    }

    #[test]
    fn unknown_types_and_versions_are_errors_not_panics() {
        let p = serde_json::json!({});
        assert!(matches!(
            DomainEvent::decode("Nope", 1, &p),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            DomainEvent::decode("StockSet", 99, &p),
            Err(DecodeError::UnknownVersion { .. })
        ));
        assert!(matches!(
            DomainEvent::decode("StockSet", 1, &p),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn event_type_names_match_the_catalogue() {
        let e = DomainEvent::PaymentTimedOut(PaymentTimedOut {
            order_id: Uuid::nil(),
        });
        let tagged = serde_json::to_value(&e).unwrap_or_default();
        assert_eq!(tagged["type"], e.event_type());
        assert!(EVENT_TYPES.contains(&e.event_type()));
    }
}
