//! One order's payment, folded from its `payment-<order id>` stream.
//!
//! The payment service records the request (with the payment timer), asks
//! [`next_action`] what to tell the gateway, and records the gateway's answer. It
//! compensates by itself: a capture that is, or becomes, unwanted (the order was
//! cancelled, or the payment had timed out) is refunded; a request in flight when the
//! order is cancelled is voided, and a capture that still arrives is refunded.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::events::{
    DomainEvent, OrderAccepted, PaymentCaptureVoided, PaymentCaptured, PaymentDeclined,
    PaymentRefunded, PaymentRequested, PaymentTimedOut, PaymentVoided,
};
use crate::rules;
use crate::{Cents, Evolve};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PaymentState {
    pub requested: Option<PaymentRequested>,
    /// The amount captured; `None` until captured.
    pub captured_cents: Option<Cents>,
    pub refunded_cents: Cents,
    pub declined: bool,
    pub timed_out: bool,
    pub voided: bool,
    /// The order was cancelled: any capture is to be refunded. Set by `PaymentVoided`,
    /// and by folding the order's `OrderCancelled` event (not on this stream) into the
    /// state: the payment service does so when handling `OrderCancelled`.
    pub order_cancelled: bool,
    /// The gateway confirmed that no capture happened or will happen for this payment.
    pub capture_voided: bool,
    /// The last `stream_version` of `payment-<id>` folded (0-based); `None` for an
    /// empty stream. `OrderCancelled` does not count.
    pub version: Option<i64>,
}

impl PaymentState {
    /// Captured, declined, or voided: the gateway answered or we stopped asking.
    pub fn is_settled(&self) -> bool {
        self.captured_cents.is_some() || self.declined || self.voided
    }

    /// Requested and neither settled nor timed out: a capture may still be tried.
    pub fn is_open(&self) -> bool {
        self.requested.is_some() && !self.is_settled() && !self.timed_out
    }

    /// What must go back to the customer: a capture the order does not keep.
    pub fn refund_owed(&self) -> Cents {
        let unwanted = self.voided || self.timed_out || self.order_cancelled;
        match self.captured_cents {
            Some(captured) if unwanted => captured.saturating_sub(self.refunded_cents).max(0),
            _ => 0,
        }
    }

    fn order_id(&self) -> Option<Uuid> {
        self.requested.as_ref().map(|r| r.order_id)
    }
}

impl Evolve for PaymentState {
    fn apply(&mut self, event: &DomainEvent) {
        use DomainEvent as E;
        match event {
            E::PaymentRequested(e) => self.requested = Some(e.clone()),
            E::PaymentCaptured(e) => self.captured_cents = Some(e.amount_cents),
            E::PaymentDeclined(_) => self.declined = true,
            E::PaymentTimedOut(_) => self.timed_out = true,
            E::PaymentVoided(_) => {
                self.voided = true;
                self.order_cancelled = true;
            }
            E::PaymentRefunded(e) => {
                self.refunded_cents = self.refunded_cents.saturating_add(e.amount_cents);
            }
            E::PaymentCaptureVoided(_) => self.capture_voided = true,
            E::OrderCancelled(_) => {
                // Known from the order stream; not a payment-stream event.
                self.order_cancelled = true;
                return;
            }
            _ => return,
        }
        self.version = Some(self.version.map_or(0, |v| v + 1));
    }
}

/// Folds one event into the state (see [`PaymentState::order_cancelled`]).
pub fn evolve(mut state: PaymentState, event: &DomainEvent) -> PaymentState {
    state.apply(event);
    state
}

/// Everything the payment reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentInput {
    /// The order's fulfilment started: request the payment, start the payment timer.
    Request(OrderAccepted, DateTime<Utc>),
    /// The gateway captured the money.
    Captured { gateway_reference: String },
    /// The gateway declined.
    Declined { reason: String },
    /// The payment timer fired.
    TimedOut,
    /// The order was cancelled (possibly before its payment was even requested).
    OrderCancelled { order_id: Uuid },
    /// The gateway refunded what was owed.
    Refunded { gateway_reference: String },
    /// The gateway voided the capture key: nothing was or will be captured.
    CaptureVoided,
    /// The order's fulfilment started and the gateway already answered the call
    /// [`first_call`] asked for: the request and its answer are recorded together.
    Answered {
        accepted: OrderAccepted,
        now: DateTime<Utc>,
        outcome: ChargeOutcome,
    },
}

/// What the gateway answered about an order's capture key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// The money was captured (by this call, or by an earlier one with the same key).
    Captured { gateway_reference: String },
    /// Nothing was captured, and nothing will be with this key.
    Declined { reason: String },
}

/// What the payment does about one input: the events to append to `payment-<id>`.
pub fn decide(state: &PaymentState, input: PaymentInput) -> Vec<DomainEvent> {
    match input {
        PaymentInput::Request(accepted, now) => request(state, accepted, now),
        PaymentInput::Captured { gateway_reference } => captured(state, gateway_reference),
        PaymentInput::Declined { reason } => declined(state, reason),
        PaymentInput::TimedOut => timed_out(state),
        PaymentInput::OrderCancelled { order_id } => void(state, order_id),
        PaymentInput::Refunded { gateway_reference } => refunded(state, gateway_reference),
        PaymentInput::CaptureVoided => capture_voided(state),
        PaymentInput::Answered {
            accepted,
            now,
            outcome,
        } => answered(state, accepted, now, outcome),
    }
}

/// An answer to a capture of a request already recorded.
impl From<ChargeOutcome> for PaymentInput {
    fn from(outcome: ChargeOutcome) -> PaymentInput {
        match outcome {
            ChargeOutcome::Captured { gateway_reference } => {
                PaymentInput::Captured { gateway_reference }
            }
            ChargeOutcome::Declined { reason } => PaymentInput::Declined { reason },
        }
    }
}

/// The gateway call to make for an accepted order before anything is recorded, so that
/// the request and the gateway's answer take one append instead of two:
/// - nothing requested yet: capture;
/// - the order was cancelled before its payment was requested (voided up front): void
///   the capture key, because an earlier handling of the same `OrderAccepted` may have
///   captured and died before recording it (or may still be capturing);
/// - requested already: nothing here (`next_action` goes on from the stream).
pub fn first_call(state: &PaymentState, accepted: &OrderAccepted) -> Option<GatewayAction> {
    if state.requested.is_some() {
        return None;
    }
    let capture_key = capture_key(accepted.order_id);
    if state.voided {
        return Some(GatewayAction::VoidCapture { capture_key });
    }
    Some(GatewayAction::Capture {
        amount_cents: accepted.total_cents,
        token: accepted.payment_token.clone(),
        idempotency_key: capture_key,
    })
}

/// The request with the gateway's answer to [`first_call`]. A capture is recorded with
/// its request even when the order was cancelled meanwhile (the money moved, so it is
/// recorded as unwanted and refunded); a decline then needs no record at all. When the
/// request was recorded elsewhere meanwhile, the answer (the same key's) settles it.
fn answered(
    state: &PaymentState,
    accepted: OrderAccepted,
    now: DateTime<Utc>,
    outcome: ChargeOutcome,
) -> Vec<DomainEvent> {
    if state.requested.is_some() {
        return decide(state, outcome.into());
    }
    if state.voided && matches!(outcome, ChargeOutcome::Declined { .. }) {
        return vec![];
    }
    let requested = requested(accepted, now);
    let after = evolve(state.clone(), &requested);
    let mut events = vec![requested];
    events.extend(decide(&after, outcome.into()));
    events
}

/// Once; never after the order was cancelled (a cancellation handled before the
/// request, e.g. by a concurrent handler, voids the payment up front).
fn request(state: &PaymentState, accepted: OrderAccepted, now: DateTime<Utc>) -> Vec<DomainEvent> {
    if state.requested.is_some() || state.voided {
        return vec![];
    }
    vec![requested(accepted, now)]
}

fn requested(accepted: OrderAccepted, now: DateTime<Utc>) -> DomainEvent {
    DomainEvent::PaymentRequested(PaymentRequested {
        order_id: accepted.order_id,
        amount_cents: accepted.total_cents,
        currency: accepted.currency,
        payment_token: accepted.payment_token,
        expires_at: rules::after(now, accepted.payment_timeout_ms),
    })
}

/// Recorded once, even after a void or timeout: money moved (and is then refunded).
fn captured(state: &PaymentState, gateway_reference: String) -> Vec<DomainEvent> {
    match &state.requested {
        Some(requested) if state.captured_cents.is_none() => {
            vec![DomainEvent::PaymentCaptured(PaymentCaptured {
                order_id: requested.order_id,
                amount_cents: requested.amount_cents,
                gateway_reference,
                unwanted: state.voided || state.timed_out,
            })]
        }
        _ => vec![],
    }
}

/// The gateway confirmed the void: stop asking it.
fn capture_voided(state: &PaymentState) -> Vec<DomainEvent> {
    match state.order_id() {
        Some(order_id) if needs_gateway_void(state) => {
            vec![DomainEvent::PaymentCaptureVoided(PaymentCaptureVoided {
                order_id,
            })]
        }
        _ => vec![],
    }
}

/// A voided or timed-out payment with no capture known: a capture may still have
/// happened (a worker killed between the gateway's answer and its event, or a call
/// still in flight), so the gateway is asked to void the capture key, which either
/// reports the capture (then refunded) or makes any later capture with it fail.
fn needs_gateway_void(state: &PaymentState) -> bool {
    state.requested.is_some()
        && (state.voided || state.timed_out)
        && state.captured_cents.is_none()
        && !state.capture_voided
}

fn declined(state: &PaymentState, reason: String) -> Vec<DomainEvent> {
    match state.order_id() {
        Some(order_id) if state.is_open() => vec![DomainEvent::PaymentDeclined(PaymentDeclined {
            order_id,
            reason,
        })],
        _ => vec![],
    }
}

fn timed_out(state: &PaymentState) -> Vec<DomainEvent> {
    match state.order_id() {
        Some(order_id) if state.is_open() => {
            vec![DomainEvent::PaymentTimedOut(PaymentTimedOut { order_id })]
        }
        _ => vec![],
    }
}

/// Stops an open request. With nothing requested yet the void is recorded up front,
/// so that an `OrderAccepted` handled late (redelivered, or concurrently) requests
/// nothing.
/// The order was cancelled: stop trying to capture, and, when money was captured
/// already, record that it is owed back (so the refund survives a restart: the order's
/// cancellation is not on this stream).
fn void(state: &PaymentState, order_id: Uuid) -> Vec<DomainEvent> {
    let nothing_requested = state.requested.is_none() && !state.voided;
    let captured_but_kept = state.captured_cents.is_some() && !state.voided && !state.timed_out;
    if state.is_open() || nothing_requested || captured_but_kept {
        return vec![DomainEvent::PaymentVoided(PaymentVoided { order_id })];
    }
    vec![]
}

fn refunded(state: &PaymentState, gateway_reference: String) -> Vec<DomainEvent> {
    let owed = state.refund_owed();
    match state.order_id() {
        Some(order_id) if owed > 0 => vec![DomainEvent::PaymentRefunded(PaymentRefunded {
            order_id,
            amount_cents: owed,
            gateway_reference,
        })],
        _ => vec![],
    }
}

/// A call to make to the payment gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayAction {
    Capture {
        amount_cents: Cents,
        token: String,
        idempotency_key: String,
    },
    Refund {
        amount_cents: Cents,
        idempotency_key: String,
    },
    /// Void the capture key: report a capture made under it, or refuse any later one.
    VoidCapture { capture_key: String },
}

/// What to ask the gateway next, if anything: capture an open request, or refund a
/// capture the order does not keep. Keys are stable per order and step, so repeating
/// a call moves no money twice.
pub fn next_action(state: &PaymentState) -> Option<GatewayAction> {
    let requested = state.requested.as_ref()?;
    let owed = state.refund_owed();
    if owed > 0 {
        return Some(GatewayAction::Refund {
            amount_cents: owed,
            idempotency_key: refund_key(requested.order_id),
        });
    }
    if needs_gateway_void(state) {
        return Some(GatewayAction::VoidCapture {
            capture_key: capture_key(requested.order_id),
        });
    }
    state.is_open().then(|| GatewayAction::Capture {
        amount_cents: requested.amount_cents,
        token: requested.payment_token.clone(),
        idempotency_key: capture_key(requested.order_id),
    })
}

/// The gateway idempotency key of the order's capture.
pub fn capture_key(order_id: Uuid) -> String {
    format!("capture-{order_id}")
}

/// The gateway idempotency key of the order's refund.
pub fn refund_key(order_id: Uuid) -> String {
    format!("refund-{order_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{CancelReason, OrderCancelled};
    use crate::fold;
    use chrono::TimeDelta;

    const ORDER_ID: Uuid = Uuid::from_u128(0xCAFE);

    fn now() -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000)
    }

    fn accepted() -> OrderAccepted {
        OrderAccepted {
            order_id: ORDER_ID,
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            items: vec![],
            payment_token: "tok_ok".into(),
            total_cents: 2_000,
            payment_timeout_ms: 30_000,
        }
    }

    fn captured() -> PaymentInput {
        PaymentInput::Captured {
            gateway_reference: "gw-capture".into(),
        }
    }

    fn refunded() -> PaymentInput {
        PaymentInput::Refunded {
            gateway_reference: "gw-refund".into(),
        }
    }

    fn cancelled() -> PaymentInput {
        PaymentInput::OrderCancelled { order_id: ORDER_ID }
    }

    fn order_cancelled() -> DomainEvent {
        DomainEvent::OrderCancelled(OrderCancelled {
            order_id: ORDER_ID,
            reason: CancelReason::CustomerCancelled,
            detail: String::new(),
            by: None,
        })
    }

    /// The payment stream, built by deciding each input on the state so far.
    struct Payment(Vec<DomainEvent>);

    impl Payment {
        fn requested() -> Self {
            let mut payment = Payment(vec![]);
            payment.when(PaymentInput::Request(accepted(), now()));
            payment
        }

        fn state(&self) -> PaymentState {
            fold(&self.0)
        }

        fn when(&mut self, input: PaymentInput) -> Vec<DomainEvent> {
            let decided = decide(&self.state(), input);
            self.0.extend(decided.iter().cloned());
            decided
        }

        /// What `input` would decide now, without recording it.
        fn clone_when(&self, input: PaymentInput) -> Vec<DomainEvent> {
            decide(&self.state(), input)
        }

        fn types_of(&mut self, input: PaymentInput) -> Vec<&'static str> {
            self.when(input)
                .iter()
                .map(DomainEvent::event_type)
                .collect()
        }
    }

    fn refund_of(amount_cents: Cents) -> Option<GatewayAction> {
        Some(GatewayAction::Refund {
            amount_cents,
            idempotency_key: format!("refund-{ORDER_ID}"),
        })
    }

    #[test]
    fn an_accepted_order_requests_its_payment_once_with_a_timer() {
        let payment = Payment::requested();
        let [DomainEvent::PaymentRequested(requested)] = &payment.0[..] else {
            panic!("{:?}", payment.0)
        };
        assert_eq!(requested.expires_at, now() + TimeDelta::seconds(30));
        assert_eq!(
            (requested.amount_cents, requested.payment_token.as_str()),
            (2_000, "tok_ok")
        );
        let mut payment = payment;
        assert_eq!(
            payment.when(PaymentInput::Request(accepted(), now())),
            vec![]
        );
    }

    #[test]
    fn an_open_request_asks_the_gateway_to_capture_with_a_stable_key() {
        let payment = Payment::requested();
        assert_eq!(
            next_action(&payment.state()),
            Some(GatewayAction::Capture {
                amount_cents: 2_000,
                token: "tok_ok".into(),
                idempotency_key: format!("capture-{ORDER_ID}"),
            })
        );
        assert_eq!(next_action(&PaymentState::default()), None);
    }

    #[test]
    fn a_capture_is_recorded_once_and_ends_the_gateway_calls() {
        let mut payment = Payment::requested();
        assert_eq!(payment.types_of(captured()), ["PaymentCaptured"]);
        assert_eq!(payment.when(captured()), vec![]);
        assert_eq!(payment.when(PaymentInput::TimedOut), vec![]);
        assert_eq!(
            payment.when(PaymentInput::Declined {
                reason: "late".into()
            }),
            vec![]
        );
        assert_eq!(next_action(&payment.state()), None);
    }

    #[test]
    fn a_decline_is_recorded_once_and_ends_the_gateway_calls() {
        let mut payment = Payment::requested();
        assert_eq!(
            payment.types_of(PaymentInput::Declined {
                reason: "no".into()
            }),
            ["PaymentDeclined"]
        );
        assert_eq!(
            payment.when(PaymentInput::Declined {
                reason: "no".into()
            }),
            vec![]
        );
        assert_eq!(payment.when(PaymentInput::TimedOut), vec![]);
        assert_eq!(payment.when(cancelled()), vec![]);
        assert_eq!(next_action(&payment.state()), None);
    }

    #[test]
    fn the_timer_times_out_an_unsettled_payment_once() {
        let mut payment = Payment::requested();
        assert_eq!(
            payment.types_of(PaymentInput::TimedOut),
            ["PaymentTimedOut"]
        );
        assert_eq!(payment.when(PaymentInput::TimedOut), vec![]);
        assert_eq!(next_action(&payment.state()), void_of_capture());
        assert_eq!(Payment(vec![]).when(PaymentInput::TimedOut), vec![]);
    }

    fn void_of_capture() -> Option<GatewayAction> {
        Some(GatewayAction::VoidCapture {
            capture_key: format!("capture-{ORDER_ID}"),
        })
    }

    #[test]
    fn a_timed_out_or_voided_payment_asks_the_gateway_to_void_until_it_confirms() {
        let mut payment = Payment::requested();
        payment.when(cancelled());
        assert_eq!(next_action(&payment.state()), void_of_capture());
        assert_eq!(
            payment.types_of(PaymentInput::CaptureVoided),
            ["PaymentCaptureVoided"]
        );
        assert_eq!(next_action(&payment.state()), None);
        assert_eq!(payment.when(PaymentInput::CaptureVoided), vec![]);
    }

    #[test]
    fn a_capture_recorded_after_a_void_or_timeout_is_marked_unwanted() {
        let mut payment = Payment::requested();
        payment.when(PaymentInput::TimedOut);
        let events = payment.when(captured());
        assert!(matches!(&events[..], [DomainEvent::PaymentCaptured(c)] if c.unwanted));
        let mut kept = Payment::requested();
        let events = kept.when(captured());
        assert!(matches!(&events[..], [DomainEvent::PaymentCaptured(c)] if !c.unwanted));
    }

    #[test]
    fn a_capture_after_the_timeout_is_recorded_and_refunded() {
        let mut payment = Payment::requested();
        payment.when(PaymentInput::TimedOut);
        assert_eq!(payment.types_of(captured()), ["PaymentCaptured"]);
        assert_eq!(next_action(&payment.state()), refund_of(2_000));
        let events = payment.when(refunded());
        assert!(
            matches!(&events[..], [DomainEvent::PaymentRefunded(r)] if r.amount_cents == 2_000)
        );
        assert_eq!(next_action(&payment.state()), None);
        assert_eq!(payment.when(refunded()), vec![]);
    }

    #[test]
    fn cancelling_while_requested_voids_and_a_late_capture_is_refunded() {
        let mut payment = Payment::requested();
        assert_eq!(payment.types_of(cancelled()), ["PaymentVoided"]);
        assert_eq!(payment.when(cancelled()), vec![]);
        assert_eq!(next_action(&payment.state()), void_of_capture());
        assert_eq!(payment.types_of(captured()), ["PaymentCaptured"]);
        assert_eq!(next_action(&payment.state()), refund_of(2_000));
        assert_eq!(payment.types_of(refunded()), ["PaymentRefunded"]);
        let state = payment.state();
        assert_eq!(
            (state.captured_cents, state.refunded_cents),
            (Some(2_000), 2_000)
        );
    }

    #[test]
    fn cancelling_a_captured_payment_records_the_refund_owed_on_the_payment_stream() {
        let mut payment = Payment::requested();
        payment.when(captured());
        assert_eq!(
            payment.when(refunded()),
            vec![],
            "the capture is kept until the order is cancelled"
        );
        assert_eq!(payment.types_of(cancelled()), ["PaymentVoided"]);
        // The payment stream alone says a refund is owed: a restarted worker knows it.
        assert_eq!(next_action(&payment.state()), refund_of(2_000));
        assert_eq!(payment.types_of(refunded()), ["PaymentRefunded"]);
        assert_eq!(next_action(&payment.state()), None);
        assert_eq!(
            payment.when(cancelled()),
            vec![],
            "a second cancel is a no-op"
        );
    }

    #[test]
    fn folding_the_orders_cancellation_in_also_shows_the_refund() {
        let mut payment = Payment::requested();
        payment.when(captured());
        let state = evolve(payment.state(), &order_cancelled());
        assert_eq!(state.version, payment.state().version);
        assert_eq!(next_action(&state), refund_of(2_000));
    }

    fn answered(outcome: ChargeOutcome) -> PaymentInput {
        PaymentInput::Answered {
            accepted: accepted(),
            now: now(),
            outcome,
        }
    }

    fn capture_answered() -> PaymentInput {
        answered(ChargeOutcome::Captured {
            gateway_reference: "gw-capture".into(),
        })
    }

    fn decline_answered() -> PaymentInput {
        answered(ChargeOutcome::Declined {
            reason: "no".into(),
        })
    }

    #[test]
    fn a_new_payment_captures_first_and_records_the_request_with_the_answer() {
        assert_eq!(
            first_call(&PaymentState::default(), &accepted()),
            next_action(&Payment::requested().state())
        );
        let mut payment = Payment(vec![]);
        assert_eq!(
            payment.types_of(capture_answered()),
            ["PaymentRequested", "PaymentCaptured"]
        );
        assert_eq!(payment.0, {
            let mut apart = Payment::requested();
            apart.when(captured());
            apart.0
        });
        assert_eq!(next_action(&payment.state()), None);
        assert_eq!(first_call(&payment.state(), &accepted()), None);
        assert_eq!(payment.when(capture_answered()), vec![]);

        let mut declined = Payment(vec![]);
        assert_eq!(
            declined.types_of(decline_answered()),
            ["PaymentRequested", "PaymentDeclined"]
        );
        assert_eq!(next_action(&declined.state()), None);
    }

    #[test]
    fn an_answer_for_a_request_recorded_elsewhere_settles_that_request() {
        let mut payment = Payment::requested();
        assert_eq!(payment.types_of(capture_answered()), ["PaymentCaptured"]);
        let mut payment = Payment::requested();
        assert_eq!(payment.types_of(decline_answered()), ["PaymentDeclined"]);
    }

    #[test]
    fn after_a_void_up_front_an_accepted_order_voids_the_capture_key_and_refunds_a_capture_it_reports(
    ) {
        let mut payment = Payment(vec![]);
        payment.when(cancelled());
        assert_eq!(
            first_call(&payment.state(), &accepted()),
            Some(GatewayAction::VoidCapture {
                capture_key: format!("capture-{ORDER_ID}"),
            })
        );
        // Nothing was captured: nothing to record.
        assert_eq!(payment.clone_when(decline_answered()), vec![]);
        // A capture that was made (by a handler that died, or raced the cancel) is
        // recorded with its request, as unwanted, and refunded.
        let events = payment.when(capture_answered());
        assert!(
            matches!(&events[..], [DomainEvent::PaymentRequested(_), DomainEvent::PaymentCaptured(c)] if c.unwanted),
            "{events:?}"
        );
        assert_eq!(next_action(&payment.state()), refund_of(2_000));
        assert_eq!(payment.types_of(refunded()), ["PaymentRefunded"]);
        assert_eq!(next_action(&payment.state()), None);
        assert_eq!(payment.when(capture_answered()), vec![]);
    }

    #[test]
    fn a_cancellation_before_the_request_voids_up_front_and_nothing_is_requested() {
        let mut payment = Payment(vec![]);
        assert_eq!(payment.types_of(cancelled()), ["PaymentVoided"]);
        assert_eq!(payment.when(cancelled()), vec![]);
        assert_eq!(
            payment.when(PaymentInput::Request(accepted(), now())),
            vec![]
        );
        assert_eq!(next_action(&payment.state()), None);
        assert_eq!(payment.when(captured()), vec![]);
        assert_eq!(payment.when(refunded()), vec![]);
    }
}
