//! Events to write: a representative payload for the storage benchmarks, and a
//! generator of realistic order flows (what `orderflow run` appends per order).
use std::collections::HashMap;

use chrono::Utc;
use domain::commands::{OrderLine, Shipping, ShippingMethod};
use domain::events::{
    OrderAccepted, OrderCompleted, OrderConfirmed, OrderLineReserved, OrderPaymentCaptured,
    OrderPlaced, OrderShipped, PaymentCaptured, PaymentRequested, ShipmentDelivered,
    ShipmentShipped, StockCommitted, StockReserved, StockSet, WorkflowPlan,
};
use domain::{streams, DomainEvent};
use eventstore::{ExpectedVersion, Metadata, NewEvent, StreamAppend};
use uuid::Uuid;

pub fn metadata() -> Metadata {
    Metadata {
        correlation_id: Uuid::new_v4(),
        causation_id: Uuid::new_v4(),
    }
}

/// `events.metadata` as the store writes it.
pub fn metadata_json(metadata: &Metadata) -> serde_json::Value {
    serde_json::json!({
        "correlation_id": metadata.correlation_id.to_string(),
        "causation_id": metadata.causation_id.to_string(),
    })
}

pub fn new_event(event: &DomainEvent) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        event_type: event.event_type().to_owned(),
        schema_version: event.schema_version(),
        payload: event.to_payload(),
        metadata: metadata(),
    }
}

/// Built from JSON so that it reads with every recent shape of `WorkflowPlan` (fields
/// the type does not have are ignored, `checks` is there for those that do).
fn plan(ship: bool) -> WorkflowPlan {
    let plan = serde_json::json!({
        "workflow_version": 1,
        "review": false,
        "ship": ship,
        "review_timeout_ms": 86_400_000u64,
        "payment_timeout_ms": 30_000u64,
        "delivery_delay_ms": 2_000u64,
        "checks": [],
    });
    #[allow(clippy::expect_used)]
    serde_json::from_value(plan).expect("a workflow plan the domain can read")
}

fn lines(sku: &str) -> Vec<OrderLine> {
    vec![OrderLine {
        sku: sku.to_owned(),
        quantity: 1,
        unit_price_cents: 1_999,
    }]
}

fn shipping() -> Shipping {
    Shipping {
        method: ShippingMethod::Standard,
        address: "1 Bench Street, 10115 Berlin".to_owned(),
    }
}

/// A physical one-line `OrderPlaced`: the largest common event (≈ 450 bytes of JSON),
/// used as the payload of every row in the storage benchmarks.
pub fn sample_event() -> DomainEvent {
    order_placed(Uuid::new_v4(), "SKU-1", true)
}

fn order_placed(order_id: Uuid, sku: &str, ship: bool) -> DomainEvent {
    DomainEvent::OrderPlaced(OrderPlaced {
        order_id,
        customer_id: "customer-42".to_owned(),
        currency: "EUR".to_owned(),
        items: lines(sku),
        payment_token: "tok_ok".to_owned(),
        shipping: ship.then(shipping),
        total_cents: 1_999,
        item_count: 1,
        plan: plan(ship),
    })
}

/// Builds the appends of whole orders, in the order `orderflow run` would make them,
/// each event its own `StreamAppend` with the exact expected version (the generator
/// tracks the versions of its SKUs' stock streams; give each generator its own SKUs).
#[derive(Debug)]
pub struct FlowGenerator {
    skus: Vec<String>,
    stock_versions: HashMap<String, i64>,
    orders: u64,
}

impl FlowGenerator {
    pub fn new(skus: Vec<String>) -> FlowGenerator {
        FlowGenerator {
            skus,
            stock_versions: HashMap::new(),
            orders: 0,
        }
    }

    /// `StockSet` for every SKU (plenty of units): append before the first order.
    pub fn stock_set(&mut self) -> Vec<StreamAppend> {
        let mut appends = Vec::new();
        for sku in self.skus.clone() {
            let event = DomainEvent::StockSet(StockSet {
                sku: sku.clone(),
                quantity: 1_000_000_000,
            });
            appends.push(self.stock_append(&sku, &event));
        }
        appends
    }

    fn stock_append(&mut self, sku: &str, event: &DomainEvent) -> StreamAppend {
        let version = self.stock_versions.get(sku).copied();
        self.stock_versions
            .insert(sku.to_owned(), version.map_or(0, |v| v + 1));
        StreamAppend {
            stream_name: streams::stock(sku),
            expected_version: version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact),
            events: vec![new_event(event)],
        }
    }

    /// One order's appends: 12 events for a physical order (every other one), 10 for a
    /// digital one.
    pub fn order(&mut self) -> Vec<StreamAppend> {
        let n = self.orders;
        self.orders += 1;
        let ship = n % 2 == 0;
        let sku = self.skus[(n as usize) % self.skus.len()].clone();
        let order_id = Uuid::new_v4();
        let now = Utc::now();
        let mut out = Vec::with_capacity(12);
        let mut versions: HashMap<String, i64> = HashMap::new();
        let mut on = |stream: String, event: DomainEvent, out: &mut Vec<StreamAppend>| {
            let version = versions.get(&stream).copied();
            versions.insert(stream.clone(), version.map_or(0, |v| v + 1));
            out.push(StreamAppend {
                stream_name: stream,
                expected_version: version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact),
                events: vec![new_event(&event)],
            });
        };
        let order = streams::order(order_id);
        let payment = streams::payment(order_id);
        let shipment = streams::shipment(order_id);
        on(order.clone(), order_placed(order_id, &sku, ship), &mut out);
        on(
            order.clone(),
            DomainEvent::OrderAccepted(OrderAccepted {
                order_id,
                customer_id: "customer-42".to_owned(),
                currency: "EUR".to_owned(),
                items: lines(&sku),
                payment_token: "tok_ok".to_owned(),
                total_cents: 1_999,
                payment_timeout_ms: 30_000,
            }),
            &mut out,
        );
        let reserved = DomainEvent::StockReserved(StockReserved {
            sku: sku.clone(),
            order_id,
            line: 0,
            quantity: 1,
        });
        out.push(self.stock_append(&sku, &reserved));
        on(
            payment.clone(),
            DomainEvent::PaymentRequested(PaymentRequested {
                order_id,
                amount_cents: 1_999,
                currency: "EUR".to_owned(),
                payment_token: "tok_ok".to_owned(),
                expires_at: now + chrono::Duration::seconds(30),
            }),
            &mut out,
        );
        on(
            payment,
            DomainEvent::PaymentCaptured(PaymentCaptured {
                order_id,
                amount_cents: 1_999,
                gateway_reference: format!("sim-{order_id}"),
                unwanted: false,
            }),
            &mut out,
        );
        on(
            order.clone(),
            DomainEvent::OrderLineReserved(OrderLineReserved {
                order_id,
                line: 0,
                sku: sku.clone(),
                quantity: 1,
            }),
            &mut out,
        );
        on(
            order.clone(),
            DomainEvent::OrderPaymentCaptured(OrderPaymentCaptured {
                order_id,
                amount_cents: 1_999,
            }),
            &mut out,
        );
        on(
            order.clone(),
            DomainEvent::OrderConfirmed(OrderConfirmed {
                order_id,
                items: lines(&sku),
                shipping: ship.then(shipping),
                delivery_delay_ms: 2_000,
            }),
            &mut out,
        );
        if ship {
            on(
                shipment.clone(),
                DomainEvent::ShipmentShipped(ShipmentShipped {
                    order_id,
                    shipping: shipping(),
                    items: lines(&sku),
                    deliver_at: now + chrono::Duration::seconds(2),
                }),
                &mut out,
            );
            on(
                order,
                DomainEvent::OrderShipped(OrderShipped { order_id }),
                &mut out,
            );
        } else {
            on(
                order,
                DomainEvent::OrderCompleted(OrderCompleted {
                    order_id,
                    items: lines(&sku),
                }),
                &mut out,
            );
        }
        let committed = DomainEvent::StockCommitted(StockCommitted {
            sku: sku.clone(),
            order_id,
            line: 0,
            quantity: 1,
        });
        out.push(self.stock_append(&sku, &committed));
        if ship {
            on(
                shipment,
                DomainEvent::ShipmentDelivered(ShipmentDelivered { order_id }),
                &mut out,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_have_about_ten_events_and_consistent_versions() {
        let mut generator = FlowGenerator::new(vec!["A".into()]);
        let set = generator.stock_set();
        assert_eq!(set[0].expected_version, ExpectedVersion::NoStream);
        let physical = generator.order();
        let digital = generator.order();
        assert_eq!(physical.len(), 12);
        assert_eq!(digital.len(), 10);
        // the stock stream continues from StockSet (version 0)
        let stock: Vec<_> = physical
            .iter()
            .chain(&digital)
            .filter(|a| a.stream_name == "stock-A")
            .map(|a| a.expected_version)
            .collect();
        assert_eq!(
            stock,
            (0..4).map(ExpectedVersion::Exact).collect::<Vec<_>>()
        );
        for append in physical.iter().chain(&digital) {
            for event in &append.events {
                let decoded =
                    DomainEvent::decode(&event.event_type, event.schema_version, &event.payload);
                assert!(decoded.is_ok(), "{}: {decoded:?}", event.event_type);
            }
        }
    }
}
