//! One SKU's stock, folded from its `stock-<sku>` stream.
//!
//! `on_hand` is what is free to sell; a reservation moves units from `on_hand` to
//! `reserved`, a release moves them back, a commit (shipped, or a digital order
//! completed) removes them from `reserved`. `stock.set` sets `on_hand` and leaves
//! reservations as they are. `on_hand` never goes below zero.
use std::collections::BTreeMap;

use uuid::Uuid;

use crate::events::{
    DomainEvent, StockCommitted, StockReleased, StockReservationFailed, StockReserved, StockSet,
    StockSetRefused,
};
use crate::Evolve;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StockState {
    /// Some `StockSet` named this SKU (a refused set does not count).
    pub known: bool,
    pub on_hand: i64,
    pub reserved: i64,
    /// Units reserved per (order id, line).
    pub reservations: BTreeMap<(Uuid, u32), i64>,
    /// The last `stream_version` folded (0-based); `None` for an empty stream.
    pub version: Option<i64>,
}

impl StockState {
    fn reservation(&self, order_id: Uuid, line: u32) -> Option<i64> {
        self.reservations.get(&(order_id, line)).copied()
    }
}

impl Evolve for StockState {
    fn apply(&mut self, event: &DomainEvent) {
        use DomainEvent as E;
        match event {
            E::StockSet(e) => {
                self.known = true;
                self.on_hand = e.quantity;
            }
            E::StockReserved(e) => {
                self.on_hand = self.on_hand.saturating_sub(e.quantity);
                self.reserved = self.reserved.saturating_add(e.quantity);
                self.reservations.insert((e.order_id, e.line), e.quantity);
            }
            E::StockReleased(e) => {
                self.on_hand = self.on_hand.saturating_add(e.quantity);
                self.reserved = self.reserved.saturating_sub(e.quantity);
                self.reservations.remove(&(e.order_id, e.line));
            }
            E::StockCommitted(e) => {
                self.reserved = self.reserved.saturating_sub(e.quantity);
                self.reservations.remove(&(e.order_id, e.line));
            }
            E::StockSetRefused(_) | E::StockReservationFailed(_) => {}
            // Not on a stock stream.
            _ => return,
        }
        self.version = Some(self.version.map_or(0, |v| v + 1));
    }
}

/// Folds one event of the `stock-<sku>` stream into the state.
pub fn evolve(mut state: StockState, event: &DomainEvent) -> StockState {
    state.apply(event);
    state
}

/// Everything a SKU's stock reacts to. Each input names the SKU (the stream's id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockInput {
    /// `stock.set`.
    Set { sku: String, quantity: i64 },
    /// Reserve one order line (from `OrderAccepted`).
    Reserve {
        sku: String,
        order_id: Uuid,
        line: u32,
        quantity: i64,
    },
    /// Give a line's reservation back (from `StockReleaseRequested`).
    Release {
        sku: String,
        order_id: Uuid,
        line: u32,
    },
    /// The line's units leave the warehouse (from `ShipmentShipped` / `OrderCompleted`).
    Commit {
        sku: String,
        order_id: Uuid,
        line: u32,
    },
}

/// What the SKU's stock does about one input: the events to append to `stock-<sku>`.
pub fn decide(state: &StockState, input: StockInput) -> Vec<DomainEvent> {
    match input {
        StockInput::Set { sku, quantity } => set(sku, quantity),
        StockInput::Reserve {
            sku,
            order_id,
            line,
            quantity,
        } => reserve(state, sku, order_id, line, quantity),
        StockInput::Release {
            sku,
            order_id,
            line,
        } => release(state, sku, order_id, line),
        StockInput::Commit {
            sku,
            order_id,
            line,
        } => commit(state, sku, order_id, line),
    }
}

fn set(sku: String, quantity: i64) -> Vec<DomainEvent> {
    if quantity < 0 {
        return vec![DomainEvent::StockSetRefused(StockSetRefused {
            reason: format!("quantity {quantity} is negative"),
            sku,
            quantity,
        })];
    }
    vec![DomainEvent::StockSet(StockSet { sku, quantity })]
}

/// One reservation per (order, line): a repeated request has no effect. Fails when
/// `on_hand` is short, the SKU was never set (available 0) or the quantity is below 1.
fn reserve(
    state: &StockState,
    sku: String,
    order_id: Uuid,
    line: u32,
    quantity: i64,
) -> Vec<DomainEvent> {
    if state.reservation(order_id, line).is_some() {
        return vec![];
    }
    let available = if state.known { state.on_hand.max(0) } else { 0 };
    if quantity < 1 || quantity > available {
        return vec![DomainEvent::StockReservationFailed(
            StockReservationFailed {
                sku,
                order_id,
                line,
                requested: quantity,
                available,
            },
        )];
    }
    vec![DomainEvent::StockReserved(StockReserved {
        sku,
        order_id,
        line,
        quantity,
    })]
}

fn release(state: &StockState, sku: String, order_id: Uuid, line: u32) -> Vec<DomainEvent> {
    match state.reservation(order_id, line) {
        Some(quantity) => vec![DomainEvent::StockReleased(StockReleased {
            sku,
            order_id,
            line,
            quantity,
        })],
        None => vec![],
    }
}

fn commit(state: &StockState, sku: String, order_id: Uuid, line: u32) -> Vec<DomainEvent> {
    match state.reservation(order_id, line) {
        Some(quantity) => vec![DomainEvent::StockCommitted(StockCommitted {
            sku,
            order_id,
            line,
            quantity,
        })],
        None => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fold;

    const ORDER_ID: Uuid = Uuid::from_u128(0xB0B);

    fn set(quantity: i64) -> StockInput {
        StockInput::Set {
            sku: "A".into(),
            quantity,
        }
    }

    fn reserve(order: u128, line: u32, quantity: i64) -> StockInput {
        StockInput::Reserve {
            sku: "A".into(),
            order_id: Uuid::from_u128(order),
            line,
            quantity,
        }
    }

    fn release(order: u128, line: u32) -> StockInput {
        StockInput::Release {
            sku: "A".into(),
            order_id: Uuid::from_u128(order),
            line,
        }
    }

    fn commit(order: u128, line: u32) -> StockInput {
        StockInput::Commit {
            sku: "A".into(),
            order_id: Uuid::from_u128(order),
            line,
        }
    }

    /// Decides each input on the state so far and keeps what was decided.
    fn run(inputs: impl IntoIterator<Item = StockInput>) -> Vec<DomainEvent> {
        let mut history = Vec::new();
        for input in inputs {
            let state: StockState = fold(&history);
            history.extend(decide(&state, input));
        }
        history
    }

    fn types(events: &[DomainEvent]) -> Vec<&'static str> {
        events.iter().map(DomainEvent::event_type).collect()
    }

    #[test]
    fn setting_stock_sets_on_hand_and_makes_the_sku_known() {
        let state: StockState = fold(&run([set(5), set(3)]));
        assert!(state.known);
        assert_eq!((state.on_hand, state.reserved), (3, 0));
        assert_eq!(state.version, Some(1));
    }

    #[test]
    fn a_negative_stock_set_is_refused_and_changes_nothing() {
        let events = run([set(-1)]);
        assert_eq!(types(&events), ["StockSetRefused"]);
        let state: StockState = fold(&events);
        assert!(!state.known);
        assert_eq!(state.on_hand, 0);
    }

    #[test]
    fn a_reservation_moves_units_from_on_hand_to_reserved() {
        let events = run([set(5), reserve(0xB0B, 0, 2)]);
        assert_eq!(types(&events), ["StockSet", "StockReserved"]);
        let state: StockState = fold(&events);
        assert_eq!((state.on_hand, state.reserved), (3, 2));
        assert_eq!(state.reservations.get(&(ORDER_ID, 0)), Some(&2));
    }

    #[test]
    fn a_repeated_reservation_for_the_same_line_has_no_effect() {
        let events = run([set(5), reserve(0xB0B, 0, 2), reserve(0xB0B, 0, 2)]);
        assert_eq!(types(&events), ["StockSet", "StockReserved"]);
    }

    #[test]
    fn a_reservation_beyond_on_hand_fails_with_what_is_available() {
        let events = run([set(1), reserve(0xB0B, 0, 2)]);
        let Some(DomainEvent::StockReservationFailed(failed)) = events.last() else {
            panic!("{events:?}")
        };
        assert_eq!((failed.requested, failed.available), (2, 1));
    }

    #[test]
    fn a_reservation_of_a_never_set_sku_fails_with_nothing_available() {
        let events = run([reserve(0xB0B, 0, 1)]);
        assert!(
            matches!(&events[..], [DomainEvent::StockReservationFailed(f)] if f.available == 0)
        );
    }

    #[test]
    fn a_release_gives_the_units_back_once() {
        let events = run([
            set(5),
            reserve(0xB0B, 0, 2),
            release(0xB0B, 0),
            release(0xB0B, 0),
        ]);
        assert_eq!(
            types(&events),
            ["StockSet", "StockReserved", "StockReleased"]
        );
        let state: StockState = fold(&events);
        assert_eq!((state.on_hand, state.reserved), (5, 0));
        assert!(state.reservations.is_empty());
    }

    #[test]
    fn releasing_or_committing_what_was_never_reserved_has_no_effect() {
        assert_eq!(
            types(&run([set(5), release(0xB0B, 0), commit(0xB0B, 0)])),
            ["StockSet"]
        );
    }

    #[test]
    fn a_commit_removes_the_units_from_reserved_once() {
        let events = run([
            set(5),
            reserve(0xB0B, 0, 2),
            commit(0xB0B, 0),
            commit(0xB0B, 0),
            release(0xB0B, 0),
        ]);
        assert_eq!(
            types(&events),
            ["StockSet", "StockReserved", "StockCommitted"]
        );
        let state: StockState = fold(&events);
        assert_eq!((state.on_hand, state.reserved), (3, 0));
    }

    #[test]
    fn a_stock_set_leaves_reservations_as_they_are() {
        let state: StockState = fold(&run([
            set(5),
            reserve(0xB0B, 0, 2),
            set(0),
            release(0xB0B, 0),
        ]));
        assert_eq!((state.on_hand, state.reserved), (2, 0));
    }

    /// A small linear congruential generator: deterministic "random" sequences.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % below
        }

        fn small(&mut self, below: u64) -> i64 {
            i64::try_from(self.next(below)).unwrap_or(0)
        }
    }

    #[test]
    fn on_hand_never_goes_below_zero_and_reserved_matches_the_reservations() {
        let mut rng = Lcg(7);
        for _ in 0..300 {
            let mut history = Vec::new();
            for _ in 0..60 {
                let (order, line) = (
                    u128::from(rng.next(4)),
                    u32::try_from(rng.next(3)).unwrap_or(0),
                );
                let input = match rng.next(10) {
                    0 => set(rng.small(12) - 2),
                    1..=4 => reserve(order, line, rng.small(6) - 1),
                    5..=7 => release(order, line),
                    _ => commit(order, line),
                };
                let state: StockState = fold(&history);
                history.extend(decide(&state, input));
                let state: StockState = fold(&history);
                assert!(state.on_hand >= 0, "on_hand below zero after {history:?}");
                assert!(state.reserved >= 0);
                assert_eq!(state.reserved, state.reservations.values().sum::<i64>());
            }
        }
    }
}
