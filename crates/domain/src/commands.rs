//! Commands as the contract defines them (routing key + JSON body), and their decoding.
//!
//! Decoding is the line between dead letters and refusals: whatever fails here (not
//! JSON, unknown routing key, missing field, wrong JSON type, bad UUID, too large) is
//! dead-lettered; whatever decodes is handed to the domain, which may refuse it.
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Cents;

/// Bodies larger than this are dead-lettered without being parsed.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub const PLACE_ORDER: &str = "order.place";
pub const CANCEL_ORDER: &str = "order.cancel";
pub const APPROVE_ORDER: &str = "order.approve";
pub const REJECT_ORDER: &str = "order.reject";
pub const SET_STOCK: &str = "stock.set";

/// Every routing key the commands exchange accepts.
pub const ROUTING_KEYS: [&str; 5] = [
    PLACE_ORDER,
    CANCEL_ORDER,
    APPROVE_ORDER,
    REJECT_ORDER,
    SET_STOCK,
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: Cents,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShippingMethod {
    Standard,
    Express,
}

impl ShippingMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ShippingMethod::Standard => "standard",
            ShippingMethod::Express => "express",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipping {
    pub method: ShippingMethod,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub order_id: Uuid,
    pub customer_id: String,
    pub currency: String,
    pub items: Vec<OrderLine>,
    pub payment_token: String,
    /// Required, but may be `null` (a digital-only order).
    #[serde(deserialize_with = "Option::deserialize")]
    pub shipping: Option<Shipping>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    pub order_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproveOrder {
    pub order_id: Uuid,
    pub reviewer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectOrder {
    pub order_id: Uuid,
    pub reviewer: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetStock {
    pub sku: String,
    pub quantity: i64,
}

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    PlaceOrder(PlaceOrder),
    CancelOrder(CancelOrder),
    ApproveOrder(ApproveOrder),
    RejectOrder(RejectOrder),
    SetStock(SetStock),
}

impl Command {
    pub fn routing_key(&self) -> &'static str {
        match self {
            Command::PlaceOrder(_) => PLACE_ORDER,
            Command::CancelOrder(_) => CANCEL_ORDER,
            Command::ApproveOrder(_) => APPROVE_ORDER,
            Command::RejectOrder(_) => REJECT_ORDER,
            Command::SetStock(_) => SET_STOCK,
        }
    }

    /// The order the command is about, if any.
    pub fn order_id(&self) -> Option<Uuid> {
        match self {
            Command::PlaceOrder(c) => Some(c.order_id),
            Command::CancelOrder(c) => Some(c.order_id),
            Command::ApproveOrder(c) => Some(c.order_id),
            Command::RejectOrder(c) => Some(c.order_id),
            Command::SetStock(_) => None,
        }
    }

    /// The JSON body, as an outside client would publish it.
    pub fn to_body(&self) -> Vec<u8> {
        let value = match self {
            Command::PlaceOrder(c) => serde_json::to_vec(c),
            Command::CancelOrder(c) => serde_json::to_vec(c),
            Command::ApproveOrder(c) => serde_json::to_vec(c),
            Command::RejectOrder(c) => serde_json::to_vec(c),
            Command::SetStock(c) => serde_json::to_vec(c),
        };
        // Serialising these plain structs cannot fail (no maps with non-string keys).
        value.unwrap_or_default()
    }
}

/// Why a message could not be decoded into a command. The text ends up in the
/// `x-orderflow-error` header of the dead letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandDecodeError {
    #[error("unknown routing key '{0}'")]
    UnknownRoutingKey(String),
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not valid UTF-8")]
    NotUtf8,
    #[error("invalid {routing_key} body: {reason}")]
    InvalidBody { routing_key: String, reason: String },
}

/// Decodes one message from the commands exchange.
pub fn decode(routing_key: &str, body: &[u8]) -> Result<Command, CommandDecodeError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(CommandDecodeError::TooLarge {
            size: body.len(),
            limit: MAX_BODY_BYTES,
        });
    }
    if !ROUTING_KEYS.contains(&routing_key) {
        return Err(CommandDecodeError::UnknownRoutingKey(
            routing_key.to_owned(),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|_| CommandDecodeError::NotUtf8)?;
    let invalid = |e: serde_json::Error| CommandDecodeError::InvalidBody {
        routing_key: routing_key.to_owned(),
        reason: e.to_string(),
    };
    Ok(match routing_key {
        PLACE_ORDER => Command::PlaceOrder(serde_json::from_str(text).map_err(invalid)?),
        CANCEL_ORDER => Command::CancelOrder(serde_json::from_str(text).map_err(invalid)?),
        APPROVE_ORDER => Command::ApproveOrder(serde_json::from_str(text).map_err(invalid)?),
        REJECT_ORDER => Command::RejectOrder(serde_json::from_str(text).map_err(invalid)?),
        _ => Command::SetStock(serde_json::from_str(text).map_err(invalid)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place_body() -> serde_json::Value {
        serde_json::json!({
            "order_id": "7f0c1f2e-9a43-4a53-9a0e-0d6f3f6f4a11",
            "customer_id": "c-1",
            "currency": "EUR",
            "items": [{"sku": "A", "quantity": 2, "unit_price_cents": 500}],
            "payment_token": "tok_ok",
            "shipping": {"method": "express", "address": "1 Main St"}
        })
    }

    fn decode_json(key: &str, v: &serde_json::Value) -> Result<Command, CommandDecodeError> {
        decode(key, v.to_string().as_bytes())
    }

    #[test]
    fn decodes_a_place_order() {
        let cmd = decode_json(PLACE_ORDER, &place_body()).expect("valid body");
        let Command::PlaceOrder(p) = cmd else {
            panic!("wrong command")
        };
        assert_eq!(p.items[0].quantity, 2);
        assert_eq!(p.shipping.map(|s| s.method), Some(ShippingMethod::Express));
    }

    #[test]
    fn null_shipping_is_a_digital_order_but_missing_shipping_is_an_error() {
        let mut body = place_body();
        body["shipping"] = serde_json::Value::Null;
        assert!(
            matches!(decode_json(PLACE_ORDER, &body), Ok(Command::PlaceOrder(p)) if p.shipping.is_none())
        );
        body.as_object_mut().map(|o| o.remove("shipping"));
        assert!(matches!(
            decode_json(PLACE_ORDER, &body),
            Err(CommandDecodeError::InvalidBody { .. })
        ));
    }

    #[test]
    fn rejects_floats_bad_uuids_unknown_keys_and_huge_bodies() {
        let mut body = place_body();
        body["items"][0]["unit_price_cents"] = serde_json::json!(5.5);
        assert!(decode_json(PLACE_ORDER, &body).is_err());
        let mut body = place_body();
        body["order_id"] = serde_json::json!("not-a-uuid");
        assert!(decode_json(PLACE_ORDER, &body).is_err());
        assert_eq!(
            decode(PLACE_ORDER.replace("place", "teleport").as_str(), b"{}"),
            Err(CommandDecodeError::UnknownRoutingKey(
                "order.teleport".into()
            ))
        );
        assert!(matches!(
            decode(SET_STOCK, &vec![b' '; MAX_BODY_BYTES + 1]),
            Err(CommandDecodeError::TooLarge { .. })
        ));
        assert!(decode(SET_STOCK, b"not json").is_err());
        assert!(decode(SET_STOCK, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn commands_round_trip_through_their_bodies() {
        let cmd = Command::SetStock(SetStock {
            sku: "A".into(),
            quantity: 3,
        });
        assert_eq!(decode(cmd.routing_key(), &cmd.to_body()), Ok(cmd));
    }
}
