//! Stream names: `category-id`.
use uuid::Uuid;

pub const ORDER: &str = "order";
pub const PAYMENT: &str = "payment";
pub const STOCK: &str = "stock";
pub const SHIPMENT: &str = "shipment";

pub fn order(order_id: Uuid) -> String {
    format!("{ORDER}-{order_id}")
}

pub fn payment(order_id: Uuid) -> String {
    format!("{PAYMENT}-{order_id}")
}

pub fn stock(sku: &str) -> String {
    format!("{STOCK}-{sku}")
}

pub fn shipment(order_id: Uuid) -> String {
    format!("{SHIPMENT}-{order_id}")
}

/// The category of a stream name (`order-…` → `order`).
pub fn category(stream_name: &str) -> &str {
    stream_name.split_once('-').map_or(stream_name, |(c, _)| c)
}
