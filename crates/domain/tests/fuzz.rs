//! Property tests: hostile input never panics the decoder, and no sequence of inputs
//! drives the domain into a state that breaks its invariants.
use std::collections::BTreeSet;

use chrono::{DateTime, TimeDelta, Utc};
use domain::commands::{self, CancelOrder, OrderLine, PlaceOrder, Shipping, ShippingMethod};
use domain::events::{
    PaymentCaptured, PaymentDeclined, PaymentTimedOut, StockReservationFailed, StockReserved,
};
use domain::{
    fold, order, payment, stock, DomainEvent, Evolve, OrderInput, OrderState, PaymentInput,
    PaymentState, Rules, StockInput, StockState,
};
use proptest::prelude::*;
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000)
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        key in prop::sample::select(vec!["order.place", "order.cancel", "order.approve", "order.reject", "stock.set", "x.y", ""]),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = commands::decode(key, &body);
    }

    #[test]
    fn decoding_arbitrary_json_shapes_never_panics(
        key in prop::sample::select(vec!["order.place", "order.cancel", "stock.set"]),
        order_id in prop::option::of("[0-9a-f-]{0,40}"),
        quantity in prop::option::of(any::<i64>()),
        price in prop::option::of(any::<f64>()),
        sku in prop::option::of(".{0,20}"),
    ) {
        let body = serde_json::json!({
            "order_id": order_id,
            "customer_id": "c",
            "currency": "EUR",
            "items": [{"sku": sku, "quantity": quantity, "unit_price_cents": price}],
            "payment_token": "tok_ok",
            "shipping": null,
            "sku": sku,
            "quantity": quantity,
            "reason": "r",
        });
        let _ = commands::decode(key, body.to_string().as_bytes());
    }

    #[test]
    fn stock_never_goes_below_zero_whatever_the_inputs(
        inputs in prop::collection::vec((0u8..4, 0u128..4, 0u32..3, -5i64..40), 0..200),
    ) {
        let mut state = StockState::default();
        for (kind, order, line, quantity) in inputs {
            let order_id = Uuid::from_u128(order);
            let sku = "A".to_owned();
            let input = match kind {
                0 => StockInput::Set { sku, quantity },
                1 => StockInput::Reserve { sku, order_id, line, quantity: quantity.max(1) },
                2 => StockInput::Release { sku, order_id, line },
                _ => StockInput::Commit { sku, order_id, line },
            };
            for event in stock::decide(&state, input) {
                state.apply(&event);
            }
            prop_assert!(state.on_hand >= 0, "on_hand {}", state.on_hand);
            prop_assert!(state.reserved >= 0, "reserved {}", state.reserved);
            let held: i64 = state.reservations.values().sum();
            prop_assert_eq!(held, state.reserved);
        }
    }

    #[test]
    fn the_order_saga_survives_any_interleaving_of_its_inputs(
        lines in 1usize..4,
        inputs in prop::collection::vec((0u8..8, 0u32..4), 0..40),
    ) {
        let order_id = Uuid::from_u128(7);
        let rules = Rules::default();
        let items: Vec<OrderLine> = (0..lines)
            .map(|i| OrderLine { sku: format!("S{i}"), quantity: 1, unit_price_cents: 100 })
            .collect();
        let known: BTreeSet<String> = items.iter().map(|l| l.sku.clone()).collect();
        let place = PlaceOrder {
            order_id,
            customer_id: "c".into(),
            currency: "EUR".into(),
            items: items.clone(),
            payment_token: "tok_ok".into(),
            shipping: Some(Shipping { method: ShippingMethod::Standard, address: "a".into() }),
        };
        let mut history: Vec<DomainEvent> =
            order::decide(&OrderState::default(), OrderInput::Place { cmd: place, rules: &rules, known_skus: &known, facts: Default::default(), now: now() });
        for (kind, line) in inputs {
            let state: OrderState = fold(&history);
            let sku = format!("S{line}");
            let input = match kind {
                0 => OrderInput::LineReserved(StockReserved { sku, order_id, line, quantity: 1 }),
                1 => OrderInput::LineOutOfStock(StockReservationFailed { sku, order_id, line, requested: 1, available: 0 }),
                2 => OrderInput::PaymentCaptured(PaymentCaptured { order_id, amount_cents: 100 * lines as i64, gateway_reference: "g".into() , unwanted: false }),
                3 => OrderInput::PaymentDeclined(PaymentDeclined { order_id, reason: "no".into() }),
                4 => OrderInput::PaymentTimedOut(PaymentTimedOut { order_id }),
                5 => OrderInput::Cancel(CancelOrder { order_id, reason: "r".into() }),
                6 => OrderInput::MarkShipped,
                _ => OrderInput::ReviewExpired { now: now() },
            };
            history.extend(order::decide(&state, input));
        }
        let state: OrderState = fold(&history);
        let confirmed = history.iter().filter(|e| matches!(e, DomainEvent::OrderConfirmed(_))).count();
        let cancelled = history.iter().filter(|e| matches!(e, DomainEvent::OrderCancelled(_))).count();
        prop_assert!(confirmed <= 1 && cancelled <= 1, "confirmed {confirmed}, cancelled {cancelled}");
        // Every line reserved in a cancelled order is released (compensation).
        if cancelled == 1 {
            let reserved = history.iter().filter(|e| matches!(e, DomainEvent::OrderLineReserved(_))).count();
            let released = history.iter().filter(|e| matches!(e, DomainEvent::StockReleaseRequested(_))).count();
            prop_assert_eq!(reserved, released, "state {:?}", state.status);
        }
    }

    #[test]
    fn payment_never_refunds_more_than_it_captured(
        inputs in prop::collection::vec(0u8..8, 0..30),
    ) {
        let order_id = Uuid::from_u128(9);
        let accepted = domain::events::OrderAccepted {
            order_id,
            customer_id: "c".into(),
            currency: "EUR".into(),
            items: vec![],
            payment_token: "tok_ok".into(),
            total_cents: 500,
            payment_timeout_ms: 1_000,
        };
        let mut state = PaymentState::default();
        for kind in inputs {
            let input = match kind {
                0 => PaymentInput::Request(accepted.clone(), now()),
                1 => PaymentInput::Captured { gateway_reference: "g".into() },
                2 => PaymentInput::Declined { reason: "no".into() },
                3 => PaymentInput::TimedOut,
                4 => PaymentInput::OrderCancelled { order_id },
                5 => PaymentInput::Answered {
                    accepted: accepted.clone(),
                    now: now(),
                    outcome: domain::payment::ChargeOutcome::Captured { gateway_reference: "g".into() },
                },
                6 => PaymentInput::Answered {
                    accepted: accepted.clone(),
                    now: now(),
                    outcome: domain::payment::ChargeOutcome::Declined { reason: "no".into() },
                },
                _ => PaymentInput::Refunded { gateway_reference: "r".into() },
            };
            for event in payment::decide(&state, input) {
                state.apply(&event);
            }
            prop_assert!(state.refunded_cents <= state.captured_cents.unwrap_or(0));
        }
    }
}
