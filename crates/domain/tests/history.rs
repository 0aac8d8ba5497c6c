//! `domain::history` (what `orderflow check` runs over the log) accepts every history
//! the decision functions can write, whatever the interleaving of their inputs: its
//! guards must never be stricter than `decide`.
use std::collections::BTreeSet;

use chrono::{DateTime, TimeDelta, Utc};
use domain::commands::ShippingMethod;
use domain::commands::{ApproveOrder, CancelOrder, OrderLine, PlaceOrder, RejectOrder, Shipping};
use domain::events::{
    OrderAccepted, PaymentCaptured, PaymentDeclined, PaymentTimedOut, StockReservationFailed,
    StockReserved,
};
use domain::history::StreamHistory;
use domain::{
    fold, order, payment, stock, DomainEvent, Evolve, OrderInput, OrderState, PaymentInput,
    PaymentState, Rules, StockInput, StockState,
};
use proptest::prelude::*;
use uuid::Uuid;

fn now() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000)
}

/// Runs the history check over `events` as the stream `stream`; the first failure.
fn check(stream: &str, events: &[DomainEvent]) -> Result<(), String> {
    let mut history = StreamHistory::new(stream).map_err(|e| e.to_string())?;
    for (version, event) in (0..).zip(events) {
        history
            .accept(version, event)
            .map_err(|e| format!("event {version} ({}): {e}", event.event_type()))?;
    }
    Ok(())
}

fn order_input(kind: u8, line: u32, order_id: Uuid, lines: usize) -> OrderInput<'static> {
    let sku = format!("S{line}");
    match kind {
        0 => OrderInput::LineReserved(StockReserved {
            sku,
            order_id,
            line,
            quantity: 1,
        }),
        1 => OrderInput::LineOutOfStock(StockReservationFailed {
            sku,
            order_id,
            line,
            requested: 1,
            available: 0,
        }),
        2 => OrderInput::PaymentCaptured(PaymentCaptured {
            order_id,
            amount_cents: 100 * lines as i64,
            gateway_reference: "g".into(),
            unwanted: false,
        }),
        3 => OrderInput::PaymentDeclined(PaymentDeclined {
            order_id,
            reason: "no".into(),
        }),
        4 => OrderInput::PaymentTimedOut(PaymentTimedOut { order_id }),
        5 => OrderInput::Cancel(CancelOrder {
            order_id,
            reason: "r".into(),
        }),
        6 => OrderInput::MarkShipped,
        7 => OrderInput::Approve(ApproveOrder {
            order_id,
            reviewer: "r".into(),
        }),
        8 => OrderInput::Reject(RejectOrder {
            order_id,
            reviewer: "r".into(),
            reason: "r".into(),
        }),
        _ => OrderInput::ReviewExpired {
            now: now() + TimeDelta::days(2),
        },
    }
}

proptest! {
    #[test]
    fn every_order_history_decide_writes_passes_the_check(
        lines in 1usize..4,
        price in prop::sample::select(vec![100i64, 60_000]),
        ship in any::<bool>(),
        inputs in prop::collection::vec((0u8..10, 0u32..4), 0..40),
    ) {
        let order_id = Uuid::from_u128(7);
        let rules = Rules::default();
        let items: Vec<OrderLine> = (0..lines)
            .map(|i| OrderLine { sku: format!("S{i}"), quantity: 1, unit_price_cents: price })
            .collect();
        let known: BTreeSet<String> = items.iter().map(|l| l.sku.clone()).collect();
        let place = PlaceOrder {
            order_id,
            customer_id: "c".into(),
            currency: "EUR".into(),
            items,
            payment_token: "tok_ok".into(),
            shipping: ship.then(|| Shipping { method: ShippingMethod::Standard, address: "a".into() }),
        };
        let mut history = order::decide(
            &OrderState::default(),
            OrderInput::Place { cmd: place, rules: &rules, known_skus: &known, facts: Default::default(), now: now() },
        );
        for (kind, line) in inputs {
            let state: OrderState = fold(&history);
            history.extend(order::decide(&state, order_input(kind, line, order_id, lines)));
        }
        prop_assert_eq!(check(&format!("order-{order_id}"), &history), Ok(()));
    }

    #[test]
    fn every_stock_history_decide_writes_passes_the_check(
        inputs in prop::collection::vec((0u8..4, 0u128..4, 0u32..3, -5i64..40), 0..200),
    ) {
        let mut state = StockState::default();
        let mut history = Vec::new();
        for (kind, order, line, quantity) in inputs {
            let order_id = Uuid::from_u128(order);
            let sku = "A".to_owned();
            let input = match kind {
                0 => StockInput::Set { sku, quantity },
                1 => StockInput::Reserve { sku, order_id, line, quantity },
                2 => StockInput::Release { sku, order_id, line },
                _ => StockInput::Commit { sku, order_id, line },
            };
            for event in stock::decide(&state, input) {
                state.apply(&event);
                history.push(event);
            }
        }
        prop_assert_eq!(check("stock-A", &history), Ok(()));
    }

    #[test]
    fn every_payment_history_decide_writes_passes_the_check(
        inputs in prop::collection::vec(0u8..9, 0..30),
    ) {
        let order_id = Uuid::from_u128(9);
        let accepted = OrderAccepted {
            order_id,
            customer_id: "c".into(),
            currency: "EUR".into(),
            items: vec![],
            payment_token: "tok_ok".into(),
            total_cents: 500,
            payment_timeout_ms: 1_000,
        };
        let mut state = PaymentState::default();
        let mut history = Vec::new();
        for kind in inputs {
            let input = match kind {
                0 => PaymentInput::Request(accepted.clone(), now()),
                1 => PaymentInput::Captured { gateway_reference: "g".into() },
                2 => PaymentInput::Declined { reason: "no".into() },
                3 => PaymentInput::TimedOut,
                4 => PaymentInput::OrderCancelled { order_id },
                5 => PaymentInput::CaptureVoided,
                6 => PaymentInput::Answered {
                    accepted: accepted.clone(),
                    now: now(),
                    outcome: domain::payment::ChargeOutcome::Captured { gateway_reference: "g".into() },
                },
                7 => PaymentInput::Answered {
                    accepted: accepted.clone(),
                    now: now(),
                    outcome: domain::payment::ChargeOutcome::Declined { reason: "no".into() },
                },
                _ => PaymentInput::Refunded { gateway_reference: "r".into() },
            };
            for event in payment::decide(&state, input) {
                state.apply(&event);
                history.push(event);
            }
        }
        prop_assert_eq!(check(&format!("payment-{order_id}"), &history), Ok(()));
    }
}

#[test]
fn a_history_decide_could_not_write_is_named() {
    let order_id = Uuid::from_u128(1);
    let shipped_twice = vec![DomainEvent::ShipmentDelivered(
        domain::events::ShipmentDelivered { order_id },
    )];
    let failure = check(&format!("shipment-{order_id}"), &shipped_twice);
    assert!(
        failure
            .as_ref()
            .is_err_and(|e| e.contains("ShipmentDelivered") && e.contains("nothing was shipped")),
        "{failure:?}"
    );
}
