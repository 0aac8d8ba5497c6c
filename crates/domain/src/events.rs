//! The event catalogue: every fact orderflow records, with its stable type name and
//! payload. Stored events are a boundary that old data crosses: `decode` upcasts older
//! schema versions to the current shape.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::commands::{OrderLine, Shipping};
use crate::Cents;

/// The schema version of event types whose payload never changed.
pub const FIRST_SCHEMA_VERSION: i32 = 1;

/// The schema version each event type is written with today (the latest shape).
/// Older stored versions are brought to it by [`upcast`] when read.
///
/// - `OrderPlaced` 2: `plan.checks` (v1 had none: upcast as `[]`).
/// - `OrderSentForReview` 2: `rule`, `detail` (v1 was always the amount review: upcast
///   as `"review_threshold"`, `""`).
/// - `OrderPlaced` 3, `OrderConfirmed` 2, `ShipmentShipped` 2, `OrderCancelled` 2: the
///   fields named by [`personal_fields`] may hold a sealed token instead of clear text
///   (data protection). The JSON shape is unchanged (still strings), so the upcast step
///   is empty; the new version tells older readers not to take a token for an address.
pub fn current_schema_version(event_type: &str) -> i32 {
    match event_type {
        "OrderPlaced" => 3,
        "OrderSentForReview" | "OrderConfirmed" | "ShipmentShipped" | "OrderCancelled" => 2,
        _ => FIRST_SCHEMA_VERSION,
    }
}

/// A JSON path into an event's payload, one object key per step.
pub type FieldPath = &'static [&'static str];

/// Where an event type carries the customer's personal data: the shipping address, and
/// the customer's own free text (the reason of an `order.cancel`, kept in
/// `OrderCancelled.detail`). The shell seals these fields with the customer's key
/// before appending and opens them where a reader needs the clear value
/// (`services::vault`); the domain only copies them, so it never needs the key.
///
/// `customer_id` is not listed: it is the key's name and the read model's column.
/// Reviewer names and reasons are staff text, and `OrderRejected.detail` and refusal
/// reasons are the system's own words: none is the customer's personal data.
pub fn personal_fields(event_type: &str) -> &'static [FieldPath] {
    const ADDRESS: FieldPath = &["shipping", "address"];
    const DETAIL: FieldPath = &["detail"];
    match event_type {
        "OrderPlaced" | "OrderConfirmed" | "ShipmentShipped" => &[ADDRESS],
        "OrderCancelled" => &[DETAIL],
        _ => &[],
    }
}

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
    /// The checks run when the order is placed (workflow 2: `fraud_velocity` when
    /// configured); empty in workflow 1. Schema version 2 of `OrderPlaced`.
    pub checks: Vec<String>,
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
    /// Which rule sent the order to review: `review_threshold` (the amount) or the
    /// name of a check of the plan (`fraud_velocity`). Schema version 2.
    pub rule: String,
    /// Why, for the reviewer. Schema version 2 (empty for upcast v1 events).
    pub detail: String,
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
    /// The capture landed after the payment was voided or timed out: the money moved,
    /// but the order does not keep it (payment refunds it; the saga must not count it).
    #[serde(default)]
    pub unwanted: bool,
}

/// The gateway confirmed that nothing was captured for a voided or timed-out payment
/// and that nothing will be (a capture arriving later under the same key is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptureVoided {
    pub order_id: Uuid,
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
    PaymentCaptureVoided(PaymentCaptureVoided),
    ShipmentShipped(ShipmentShipped),
    ShipmentDelivered(ShipmentDelivered),
}

/// Every stored event type name, for docs, `orderflow check` and topology bindings.
pub const EVENT_TYPES: [&str; 30] = [
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
    "PaymentCaptureVoided",
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
            PaymentCaptureVoided(_) => "PaymentCaptureVoided",
            ShipmentShipped(_) => "ShipmentShipped",
            ShipmentDelivered(_) => "ShipmentDelivered",
        }
    }

    /// The schema version this event is written with: its type's current one.
    pub fn schema_version(&self) -> i32 {
        current_schema_version(self.event_type())
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
        // The current version (nearly every stored event) is read in place; only an
        // older one is copied, to be upcast.
        if schema_version == current_schema_version(event_type) {
            return decode_current(event_type, payload);
        }
        let payload = upcast(event_type, schema_version, payload.clone())?;
        decode_current(event_type, &payload)
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
            PaymentCaptureVoided(e) => e.order_id,
            ShipmentShipped(e) => e.order_id,
            ShipmentDelivered(e) => e.order_id,
        })
    }
}

/// Deserialises a payload of the current shape into the variant `event_type` names,
/// with `$de` (one of the generic functions below) applied to that variant's type.
macro_rules! decode_variant {
    ($event_type:expr, $payload:expr, $de:ident) => {
        decode_variant!(@each $event_type, $payload, $de;
            OrderPlaced, OrderRejected, OrderSentForReview, OrderApproved, OrderAccepted,
            OrderLineReserved, OrderLineOutOfStock, OrderPaymentCaptured, OrderPaymentFailed,
            OrderConfirmed, OrderCompleted, OrderShipped, OrderCancelled, StockReleaseRequested,
            OrderCommandRefused, StockSet, StockSetRefused, StockReserved,
            StockReservationFailed, StockReleased, StockCommitted, PaymentRequested,
            PaymentCaptured, PaymentDeclined, PaymentTimedOut, PaymentVoided, PaymentRefunded,
            PaymentCaptureVoided, ShipmentShipped, ShipmentDelivered)
    };
    (@each $event_type:expr, $payload:expr, $de:ident; $($name:ident),*) => {
        match $event_type {
            $(stringify!($name) => $de::<$name>($payload).map(DomainEvent::$name),)*
            _ => return Err(DecodeError::UnknownType($event_type.to_owned())),
        }
    };
}

fn from_value_ref<'a, T: Deserialize<'a>>(
    payload: &'a serde_json::Value,
) -> Result<T, serde_json::Error> {
    T::deserialize(payload)
}

fn from_text<'a, T: Deserialize<'a>>(payload: &'a str) -> Result<T, serde_json::Error> {
    serde_json::from_str(payload)
}

fn malformed(event_type: &str, error: serde_json::Error) -> DecodeError {
    DecodeError::Malformed {
        event_type: event_type.to_owned(),
        reason: error.to_string(),
    }
}

/// Deserialises a payload of the current shape straight into its variant: the same
/// result as the adjacently tagged `DomainEvent` deserialiser, without building (and
/// copying the payload into) a tagged `{"type", "payload"}` object first.
fn decode_current(
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<DomainEvent, DecodeError> {
    decode_variant!(event_type, payload, from_value_ref).map_err(|e| malformed(event_type, e))
}

impl DomainEvent {
    /// [`DomainEvent::decode`] of a payload given as JSON text (as `payload::text`
    /// reads it): an event of its type's current version is deserialised from the
    /// text directly, without building a `serde_json::Value` first; an older one is
    /// parsed and upcast as `decode` does.
    pub fn decode_text(
        event_type: &str,
        schema_version: i32,
        payload: &str,
    ) -> Result<DomainEvent, DecodeError> {
        if !EVENT_TYPES.contains(&event_type) {
            return Err(DecodeError::UnknownType(event_type.to_owned()));
        }
        if schema_version == current_schema_version(event_type) {
            return decode_variant!(event_type, payload, from_text)
                .map_err(|e| malformed(event_type, e));
        }
        let value: serde_json::Value =
            serde_json::from_str(payload).map_err(|e| malformed(event_type, e))?;
        DomainEvent::decode(event_type, schema_version, &value)
    }
}

/// Brings a stored payload of an older schema version to the current shape of its
/// type, one version step at a time. Stored rows are never rewritten: every reader
/// (services folding streams, the projector, the relay's consumers) upcasts on read.
/// A version newer than this build knows, or below 1, is an error.
pub fn upcast(
    event_type: &str,
    schema_version: i32,
    mut payload: serde_json::Value,
) -> Result<serde_json::Value, DecodeError> {
    let current = current_schema_version(event_type);
    if !(FIRST_SCHEMA_VERSION..=current).contains(&schema_version) {
        return Err(DecodeError::UnknownVersion {
            event_type: event_type.to_owned(),
            schema_version,
        });
    }
    for from in schema_version..current {
        payload = upcast_step(event_type, from, payload);
    }
    Ok(payload)
}

/// One step: version `from` of `event_type` → version `from + 1`. Only adds what is
/// missing, so a payload that already has the newer field keeps it.
fn upcast_step(event_type: &str, from: i32, mut payload: serde_json::Value) -> serde_json::Value {
    use serde_json::{json, Value};
    match (event_type, from) {
        // v1 plans had no checks: workflow 1 runs none.
        ("OrderPlaced", 1) => {
            if let Some(plan) = payload.get_mut("plan").and_then(Value::as_object_mut) {
                plan.entry("checks").or_insert_with(|| json!([]));
            }
        }
        // v1 reviews were always the amount review.
        ("OrderSentForReview", 1) => {
            if let Some(fields) = payload.as_object_mut() {
                fields
                    .entry("rule")
                    .or_insert_with(|| json!(crate::rules::REVIEW_THRESHOLD));
                fields.entry("detail").or_insert_with(|| json!(""));
            }
        }
        _ => {}
    }
    payload
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

    fn v1_order_placed() -> serde_json::Value {
        serde_json::json!({
            "order_id": Uuid::from_u128(9), "customer_id": "c-1", "currency": "EUR",
            "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 100}],
            "payment_token": "tok_ok", "shipping": null, "total_cents": 100, "item_count": 1,
            "plan": {"workflow_version": 1, "review": false, "ship": false,
                     "review_timeout_ms": 1, "payment_timeout_ms": 2, "delivery_delay_ms": 3}
        })
    }

    #[test]
    fn schema_versions_are_per_type() {
        assert_eq!(current_schema_version("OrderPlaced"), 3);
        assert_eq!(current_schema_version("OrderSentForReview"), 2);
        assert_eq!(current_schema_version("OrderCancelled"), 2);
        assert_eq!(current_schema_version("StockSet"), 1);
        let decoded = DomainEvent::decode("OrderPlaced", 1, &v1_order_placed());
        assert_eq!(decoded.map(|e| e.schema_version()), Ok(3));
    }

    #[test]
    fn a_v1_order_placed_is_upcast_to_a_plan_without_checks() {
        let upcast_payload = upcast("OrderPlaced", 1, v1_order_placed());
        assert_eq!(
            upcast_payload.map(|p| p["plan"]["checks"].clone()),
            Ok(serde_json::json!([]))
        );
        let Ok(DomainEvent::OrderPlaced(placed)) =
            DomainEvent::decode("OrderPlaced", 1, &v1_order_placed())
        else {
            panic!("a v1 OrderPlaced does not decode")
        };
        assert_eq!(placed.plan.workflow_version, 1);
        assert!(placed.plan.checks.is_empty());
        // the v2 shape round-trips as itself
        let e = DomainEvent::OrderPlaced(placed);
        assert_eq!(
            DomainEvent::decode("OrderPlaced", 2, &e.to_payload()),
            Ok(e)
        );
    }

    #[test]
    fn decoding_text_upcasts_old_versions_and_refuses_what_decode_refuses() {
        let text = v1_order_placed().to_string();
        assert_eq!(
            DomainEvent::decode_text("OrderPlaced", 1, &text),
            DomainEvent::decode("OrderPlaced", 1, &v1_order_placed())
        );
        assert!(DomainEvent::decode_text("OrderPlaced", 1, &text).is_ok());
        assert!(matches!(
            DomainEvent::decode_text("OrderPlaced", 3, "{not json"),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            DomainEvent::decode_text("OrderPlaced", 1, "{not json"),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            DomainEvent::decode_text("OrderPlaced", 4, &text),
            Err(DecodeError::UnknownVersion { .. })
        ));
        assert!(matches!(
            DomainEvent::decode_text("Nope", 1, "{}"),
            Err(DecodeError::UnknownType(_))
        ));
    }

    #[test]
    fn a_v1_order_sent_for_review_is_upcast_to_the_amount_rule() {
        let v1 = serde_json::json!({
            "order_id": Uuid::from_u128(9), "total_cents": 100_000,
            "threshold_cents": 100_000, "expires_at": "2025-01-01T00:00:00Z"
        });
        let Ok(DomainEvent::OrderSentForReview(review)) =
            DomainEvent::decode("OrderSentForReview", 1, &v1)
        else {
            panic!("a v1 OrderSentForReview does not decode")
        };
        assert_eq!(
            (review.rule.as_str(), review.detail.as_str()),
            ("review_threshold", "")
        );
    }

    #[test]
    fn a_v2_payload_missing_its_new_fields_is_malformed_and_unknown_versions_error() {
        assert!(matches!(
            DomainEvent::decode("OrderPlaced", 2, &v1_order_placed()),
            Err(DecodeError::Malformed { .. })
        ));
        for version in [0, 4] {
            assert!(matches!(
                DomainEvent::decode("OrderPlaced", version, &v1_order_placed()),
                Err(DecodeError::UnknownVersion { .. })
            ));
        }
    }

    #[test]
    fn personal_fields_name_string_fields_of_their_event_types() {
        let shipped = DomainEvent::ShipmentShipped(ShipmentShipped {
            order_id: Uuid::nil(),
            shipping: Shipping {
                method: crate::commands::ShippingMethod::Standard,
                address: "1 Main St".into(),
            },
            items: vec![],
            deliver_at: chrono::DateTime::<Utc>::default(),
        });
        let payload = shipped.to_payload();
        for path in personal_fields(shipped.event_type()) {
            let value = path.iter().try_fold(&payload, |v, key| v.get(*key));
            assert_eq!(value.and_then(|v| v.as_str()), Some("1 Main St"));
        }
        assert_eq!(personal_fields("OrderCancelled"), &[&["detail"][..]]);
        assert!(personal_fields("OrderApproved").is_empty());
        // every type with personal data was bumped when sealing began
        for event_type in [
            "OrderPlaced",
            "OrderConfirmed",
            "ShipmentShipped",
            "OrderCancelled",
        ] {
            assert!(current_schema_version(event_type) > FIRST_SCHEMA_VERSION);
            assert!(!personal_fields(event_type).is_empty());
        }
    }

    /// The adjacently tagged deserialiser `decode` used to go through.
    fn tagged_decode(event_type: &str, payload: &serde_json::Value) -> Option<DomainEvent> {
        serde_json::from_value(serde_json::json!({ "type": event_type, "payload": payload })).ok()
    }

    #[test]
    fn decoding_in_place_equals_the_tagged_deserialiser() {
        let order_id = Uuid::from_u128(5);
        let payloads = [
            ("OrderPlaced", {
                let mut p = v1_order_placed();
                p["plan"]["checks"] = serde_json::json!(["fraud_velocity"]);
                p
            }),
            (
                "PaymentCaptured",
                serde_json::json!({"order_id": order_id, "amount_cents": 5, "gateway_reference": "g"}),
            ),
            (
                "PaymentCaptured",
                serde_json::json!({"order_id": order_id, "amount_cents": 5, "gateway_reference": "g", "unwanted": true}),
            ),
            (
                "ShipmentShipped",
                serde_json::json!({"order_id": order_id, "shipping": {"method": "express", "address": "x"},
                                   "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 3}],
                                   "deliver_at": "2025-01-01T00:00:00Z"}),
            ),
            (
                "OrderCancelled",
                serde_json::json!({"order_id": order_id, "reason": "review_rejected", "detail": "d", "by": "rita"}),
            ),
            (
                "StockSet",
                serde_json::json!({"sku": "A", "quantity": 3, "extra": "ignored"}),
            ),
            (
                "ShipmentDelivered",
                serde_json::json!({"order_id": order_id}),
            ),
        ];
        for (event_type, payload) in payloads {
            let version = current_schema_version(event_type);
            let decoded = DomainEvent::decode(event_type, version, &payload).ok();
            assert!(decoded.is_some(), "{event_type} does not decode");
            assert_eq!(decoded, tagged_decode(event_type, &payload), "{event_type}");
            let text = payload.to_string();
            assert_eq!(
                DomainEvent::decode_text(event_type, version, &text).ok(),
                decoded,
                "{event_type} from text"
            );
        }
        // malformed payloads are errors both ways
        for (event_type, payload) in [
            (
                "StockSet",
                serde_json::json!({"sku": "A", "quantity": "three"}),
            ),
            (
                "OrderCancelled",
                serde_json::json!({"order_id": order_id, "reason": "bored"}),
            ),
            ("ShipmentDelivered", serde_json::json!(null)),
        ] {
            let version = current_schema_version(event_type);
            assert!(matches!(
                DomainEvent::decode(event_type, version, &payload),
                Err(DecodeError::Malformed { .. })
            ));
            assert!(matches!(
                DomainEvent::decode_text(event_type, version, &payload.to_string()),
                Err(DecodeError::Malformed { .. })
            ));
            assert_eq!(tagged_decode(event_type, &payload), None);
        }
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
