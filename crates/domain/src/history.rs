//! Whether a stored history is one the current decision functions could have written
//! (`orderflow check`, before and after an upgrade).
//!
//! The log cannot be re-decided from its inputs (commands and gateway answers are not
//! stored), so each event is checked against the guard its `decide` applies, on the
//! state folded from the events before it: an `OrderConfirmed` needs every line
//! reserved and the payment captured, a `StockReserved` needs the units on hand, a
//! `ShipmentDelivered` needs a shipment, and so on. The guards are the preconditions
//! of `order::decide`, `stock::decide`, `payment::decide` and `shipment::decide`, and
//! are kept as loose as they are: every interleaving those functions allow (a late
//! reservation after a cancellation, a capture after a timeout) passes.
//!
//! After the guard, the event is folded with the aggregate's own `evolve`, which must
//! count it: an event that the aggregate ignores does not belong on its stream, and the
//! stream's versions must run 0, 1, 2 … without a gap.
use uuid::Uuid;

use crate::events::DomainEvent;
use crate::order::{LineStatus, OrderState, OrderStatus, PaymentStatus};
use crate::payment::PaymentState;
use crate::shipment::ShipmentState;
use crate::stock::StockState;
use crate::streams;
use crate::Evolve;

/// Why a stored event is not one the current code accepts at its place in its stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("stream '{0}' has no known category (order-, payment-, stock-, shipment-)")]
    UnknownCategory(String),
    #[error("{event_type} does not belong on a {category}- stream")]
    ForeignEvent {
        event_type: &'static str,
        category: &'static str,
    },
    #[error("{event_type} names {named}, not this stream's id {stream_id}")]
    WrongStream {
        event_type: &'static str,
        named: String,
        stream_id: String,
    },
    #[error("stream version {found} where {expected} was next")]
    VersionGap { expected: i64, found: i64 },
    #[error("{event_type} is refused here: {reason}")]
    Refused {
        event_type: &'static str,
        reason: String,
    },
}

/// The state of one stream being checked, by category.
#[derive(Debug, Clone)]
enum State {
    Order(OrderState),
    Payment(PaymentState),
    Stock(StockState),
    Shipment(ShipmentState),
}

/// Checks one stream's events in stream order.
#[derive(Debug, Clone)]
pub struct StreamHistory {
    stream_id: String,
    state: State,
    /// The stream version of the last event seen.
    last_stored: Option<i64>,
}

impl StreamHistory {
    /// A checker for the stream `stream_name`, from its empty state.
    pub fn new(stream_name: &str) -> Result<StreamHistory, HistoryError> {
        let (category, id) = stream_name
            .split_once('-')
            .ok_or_else(|| HistoryError::UnknownCategory(stream_name.to_owned()))?;
        let state = match category {
            streams::ORDER => State::Order(OrderState::default()),
            streams::PAYMENT => State::Payment(PaymentState::default()),
            streams::STOCK => State::Stock(StockState::default()),
            streams::SHIPMENT => State::Shipment(ShipmentState::default()),
            _ => return Err(HistoryError::UnknownCategory(stream_name.to_owned())),
        };
        Ok(StreamHistory {
            stream_id: id.to_owned(),
            state,
            last_stored: None,
        })
    }

    /// Checks `event`, stored at `stream_version`, against the state so far, then folds
    /// it in (also when the check fails, so that one bad event is reported once rather
    /// than making every later one look wrong).
    pub fn accept(&mut self, stream_version: i64, event: &DomainEvent) -> Result<(), HistoryError> {
        let identity = self.check_identity(event);
        let guard = self.check_guard(event);
        let expected = self.last_stored.map_or(0, |v| v + 1);
        // The stored version, not the expected one, is the base for the next event:
        // one gap is reported once.
        self.last_stored = Some(stream_version);
        let before = self.version();
        self.apply(event);
        if self.version() == before {
            // evolve did not count it: the aggregate does not know this event.
            return Err(HistoryError::ForeignEvent {
                event_type: event.event_type(),
                category: self.category(),
            });
        }
        identity?;
        guard?;
        if stream_version != expected {
            return Err(HistoryError::VersionGap {
                expected,
                found: stream_version,
            });
        }
        Ok(())
    }

    fn category(&self) -> &'static str {
        match self.state {
            State::Order(_) => streams::ORDER,
            State::Payment(_) => streams::PAYMENT,
            State::Stock(_) => streams::STOCK,
            State::Shipment(_) => streams::SHIPMENT,
        }
    }

    fn version(&self) -> Option<i64> {
        match &self.state {
            State::Order(s) => s.version,
            State::Payment(s) => s.version,
            State::Stock(s) => s.version,
            State::Shipment(s) => s.version,
        }
    }

    fn apply(&mut self, event: &DomainEvent) {
        match &mut self.state {
            State::Order(s) => s.apply(event),
            State::Payment(s) => s.apply(event),
            State::Stock(s) => s.apply(event),
            State::Shipment(s) => s.apply(event),
        }
    }

    /// The order id (or SKU) the event names must be the stream's id.
    fn check_identity(&self, event: &DomainEvent) -> Result<(), HistoryError> {
        let named = match &self.state {
            State::Stock(_) => sku_of(event).map(str::to_owned),
            _ => event.order_id().as_ref().map(Uuid::to_string),
        };
        match named {
            Some(named) if named != self.stream_id => Err(HistoryError::WrongStream {
                event_type: event.event_type(),
                named,
                stream_id: self.stream_id.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn check_guard(&self, event: &DomainEvent) -> Result<(), HistoryError> {
        let refusal = match &self.state {
            State::Order(s) => order_refusal(s, event),
            State::Payment(s) => payment_refusal(s, event),
            State::Stock(s) => stock_refusal(s, event),
            State::Shipment(s) => shipment_refusal(s, event),
        };
        match refusal {
            Some(reason) => Err(HistoryError::Refused {
                event_type: event.event_type(),
                reason,
            }),
            None => Ok(()),
        }
    }
}

fn sku_of(event: &DomainEvent) -> Option<&str> {
    use DomainEvent as E;
    Some(match event {
        E::StockSet(e) => &e.sku,
        E::StockSetRefused(e) => &e.sku,
        E::StockReserved(e) => &e.sku,
        E::StockReservationFailed(e) => &e.sku,
        E::StockReleased(e) => &e.sku,
        E::StockCommitted(e) => &e.sku,
        _ => return None,
    })
}

fn line_of(state: &OrderState, line: u32) -> Option<LineStatus> {
    usize::try_from(line)
        .ok()
        .and_then(|i| state.lines.get(i))
        .copied()
}

/// Why `order::decide` could not have appended `event` in `state`; `None` if it could.
fn order_refusal(state: &OrderState, event: &DomainEvent) -> Option<String> {
    use DomainEvent as E;
    use OrderStatus as S;
    let status = state.status;
    let line_is = |line: u32, wanted: LineStatus| match line_of(state, line) {
        Some(found) if found == wanted => None,
        Some(found) => Some(format!("line {line} is {found:?}, not {wanted:?}")),
        None => Some(format!("the order has no line {line}")),
    };
    match event {
        // Refusals are recorded for orders that do not exist too (cancel of an unknown id).
        E::OrderCommandRefused(_) => None,
        E::OrderPlaced(_) if state.placed.is_some() => Some("the order was placed before".into()),
        E::OrderPlaced(_) => None,
        _ if state.placed.is_none() => Some("the order was never placed".into()),
        E::OrderRejected(_) | E::OrderSentForReview(_) => {
            (status != S::New).then(|| format!("the order is already {}", status.as_str()))
        }
        E::OrderAccepted(_) => (!matches!(status, S::New | S::UnderReview))
            .then(|| format!("the order is {}", status.as_str())),
        E::OrderApproved(_) => (status != S::UnderReview)
            .then(|| format!("the order is {}, not under_review", status.as_str())),
        E::OrderLineReserved(e) => line_is(e.line, LineStatus::Pending),
        E::OrderLineOutOfStock(e) => line_is(e.line, LineStatus::Pending),
        E::StockReleaseRequested(e) => line_is(e.line, LineStatus::Reserved),
        E::OrderPaymentCaptured(_) | E::OrderPaymentFailed(_) => (state.payment
            != PaymentStatus::Pending)
            .then(|| format!("the payment is already {:?}", state.payment)),
        E::OrderConfirmed(_) => confirm_refusal(state),
        E::OrderCompleted(_) | E::OrderShipped(_) => {
            let ships = state.plan().is_some_and(|p| p.ship);
            let wants_ship = matches!(event, E::OrderShipped(_));
            if status != S::Confirmed {
                Some(format!("the order is {}, not confirmed", status.as_str()))
            } else if ships != wants_ship {
                Some(format!("the order's plan has ship = {ships}"))
            } else {
                None
            }
        }
        E::OrderCancelled(_) => (!matches!(status, S::Accepted | S::UnderReview | S::Confirmed))
            .then(|| format!("the order is already {}", status.as_str())),
        _ => None,
    }
}

/// The join: confirmed only while fulfilling, with every line reserved and the money in.
fn confirm_refusal(state: &OrderState) -> Option<String> {
    if state.status != OrderStatus::Accepted {
        return Some(format!(
            "the order is {}, not pending",
            state.status.as_str()
        ));
    }
    if !state.lines.iter().all(|l| *l == LineStatus::Reserved) {
        return Some("not every line is reserved".into());
    }
    (state.payment != PaymentStatus::Captured).then(|| "the payment is not captured".into())
}

/// Why `payment::decide` could not have appended `event` in `state`.
fn payment_refusal(state: &PaymentState, event: &DomainEvent) -> Option<String> {
    use DomainEvent as E;
    let requested = state.requested.is_some();
    match event {
        // After a void up front, a request is recorded only with the capture the
        // gateway reported for it (`payment::first_call`), which is then refunded.
        E::PaymentRequested(_) => requested.then(|| "the payment was requested before".into()),
        E::PaymentCaptured(_) if !requested => Some("no payment was requested".into()),
        E::PaymentCaptured(_) => state
            .captured_cents
            .is_some()
            .then(|| "the payment was captured before".into()),
        E::PaymentDeclined(_) | E::PaymentTimedOut(_) => {
            (!state.is_open()).then(|| "the payment is not open".into())
        }
        E::PaymentVoided(_) => {
            let nothing_requested = !requested && !state.voided;
            let captured_but_kept =
                state.captured_cents.is_some() && !state.voided && !state.timed_out;
            (!(state.is_open() || nothing_requested || captured_but_kept))
                .then(|| "there is nothing to void".into())
        }
        // Money moves once: never more back than was captured.
        E::PaymentRefunded(e) => {
            let refundable = state
                .captured_cents
                .unwrap_or(0)
                .saturating_sub(state.refunded_cents);
            (e.amount_cents < 1 || e.amount_cents > refundable).then(|| {
                format!(
                    "refunds {} cents of {refundable} refundable",
                    e.amount_cents
                )
            })
        }
        E::PaymentCaptureVoided(_) => {
            let needed = requested
                && (state.voided || state.timed_out)
                && state.captured_cents.is_none()
                && !state.capture_voided;
            (!needed).then(|| "no capture key needed voiding".into())
        }
        _ => None,
    }
}

/// Why `stock::decide` could not have appended `event` in `state`.
fn stock_refusal(state: &StockState, event: &DomainEvent) -> Option<String> {
    use DomainEvent as E;
    let reservation = |order_id: Uuid, line: u32| state.reservations.get(&(order_id, line));
    match event {
        E::StockSet(e) => (e.quantity < 0).then(|| format!("quantity {} is negative", e.quantity)),
        E::StockSetRefused(e) => {
            (e.quantity >= 0).then(|| format!("quantity {} is not negative", e.quantity))
        }
        E::StockReserved(e) => {
            let available = if state.known { state.on_hand.max(0) } else { 0 };
            if reservation(e.order_id, e.line).is_some() {
                Some(format!(
                    "line {} of {} was reserved before",
                    e.line, e.order_id
                ))
            } else if e.quantity < 1 || e.quantity > available {
                Some(format!("reserves {} of {available} available", e.quantity))
            } else {
                None
            }
        }
        E::StockReservationFailed(e) => reservation(e.order_id, e.line)
            .is_some()
            .then(|| format!("line {} of {} is reserved", e.line, e.order_id)),
        E::StockReleased(e) => reservation_mismatch(reservation(e.order_id, e.line), e.quantity),
        E::StockCommitted(e) => reservation_mismatch(reservation(e.order_id, e.line), e.quantity),
        _ => None,
    }
}

fn reservation_mismatch(reserved: Option<&i64>, quantity: i64) -> Option<String> {
    match reserved {
        None => Some("no such reservation".into()),
        Some(reserved) if *reserved != quantity => Some(format!(
            "moves {quantity} units of a reservation of {reserved}"
        )),
        Some(_) => None,
    }
}

/// Why `shipment::decide` could not have appended `event` in `state`.
fn shipment_refusal(state: &ShipmentState, event: &DomainEvent) -> Option<String> {
    match event {
        DomainEvent::ShipmentShipped(_) => state
            .shipped
            .is_some()
            .then(|| "the order was shipped before".into()),
        DomainEvent::ShipmentDelivered(_) if state.shipped.is_none() => {
            Some("nothing was shipped".into())
        }
        DomainEvent::ShipmentDelivered(_) => {
            state.delivered.then(|| "it was delivered before".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{OrderConfirmed, ShipmentDelivered, StockReserved, StockSet};

    const ORDER: Uuid = Uuid::from_u128(0xC0FFEE);

    fn accept_all(stream: &str, events: &[DomainEvent]) -> Vec<Result<(), HistoryError>> {
        let Ok(mut history) = StreamHistory::new(stream) else {
            return vec![Err(HistoryError::UnknownCategory(stream.into()))];
        };
        (0..)
            .zip(events)
            .map(|(v, e)| history.accept(v, e))
            .collect()
    }

    fn set(quantity: i64) -> DomainEvent {
        DomainEvent::StockSet(StockSet {
            sku: "A".into(),
            quantity,
        })
    }

    fn reserve(quantity: i64) -> DomainEvent {
        DomainEvent::StockReserved(StockReserved {
            sku: "A".into(),
            order_id: ORDER,
            line: 0,
            quantity,
        })
    }

    #[test]
    fn a_reservation_within_stock_is_accepted_and_one_beyond_it_refused() {
        let results = accept_all("stock-A", &[set(3), reserve(2)]);
        assert_eq!(results, vec![Ok(()), Ok(())]);
        let results = accept_all("stock-A", &[set(1), reserve(2)]);
        assert!(matches!(results[1], Err(HistoryError::Refused { .. })));
    }

    #[test]
    fn an_event_of_another_sku_or_category_is_reported() {
        let results = accept_all("stock-B", &[set(1)]);
        assert!(matches!(results[0], Err(HistoryError::WrongStream { .. })));
        let delivered = DomainEvent::ShipmentDelivered(ShipmentDelivered { order_id: ORDER });
        let results = accept_all(&format!("order-{ORDER}"), &[delivered]);
        assert!(matches!(results[0], Err(HistoryError::ForeignEvent { .. })));
        assert!(StreamHistory::new("basket-1").is_err());
    }

    #[test]
    fn a_confirmation_before_anything_was_placed_is_refused() {
        let confirmed = DomainEvent::OrderConfirmed(OrderConfirmed {
            order_id: ORDER,
            items: vec![],
            shipping: None,
            delivery_delay_ms: 0,
        });
        let results = accept_all(&format!("order-{ORDER}"), &[confirmed]);
        assert!(matches!(results[0], Err(HistoryError::Refused { .. })));
    }

    #[test]
    fn a_gap_in_stream_versions_is_reported() {
        let Ok(mut history) = StreamHistory::new("stock-A") else {
            panic!("stock- is a category")
        };
        assert_eq!(history.accept(0, &set(1)), Ok(()));
        assert_eq!(
            history.accept(2, &set(2)),
            Err(HistoryError::VersionGap {
                expected: 1,
                found: 2
            })
        );
    }
}
