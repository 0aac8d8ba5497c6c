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
