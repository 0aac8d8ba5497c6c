//! The order saga (process manager): the whole course of one order, contract section 3.
//!
//! State is folded from the `order-<id>` stream ([`evolve`]); [`decide`] turns one
//! input (a command, an outcome from inventory or payment, a timer, shipping's
//! request) into the events to append to that stream. Refusals are events
//! (`OrderCommandRefused`), never errors; an input with no effect decides nothing.
//!
//! ```text
//! Place ──invalid──▶ Rejected
//!   │ ──total ≥ threshold──▶ UnderReview ──Approve──▶ Accepted
//!   │                           │ Reject / ReviewExpired ──▶ Cancelled
//!   └──────────────────────────────────────────────────▶ Accepted
//! Accepted: parallel split: one reservation per line ∥ payment
//!   join: every line reserved AND payment captured ──▶ Confirmed (digital: + Completed)
//!   out of stock / payment declined / payment timed out ──▶ Cancelled + releases
//! Confirmed ──MarkShipped (plan.ship)──▶ Shipped   (delivered: see the shipment stream)
//! Cancel: accepted while Accepted (pending), UnderReview or Confirmed.
//! ```
//!
//! Compensation: whenever the order is cancelled, every reserved line gets a
//! `StockReleaseRequested`; a reservation that arrives after the cancellation is
//! recorded and released at once. Payment compensates by itself on `OrderCancelled`
//! (see `payment.rs`).
use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::commands::{
    ApproveOrder, CancelOrder, PlaceOrder, RejectOrder, APPROVE_ORDER, CANCEL_ORDER, PLACE_ORDER,
    REJECT_ORDER,
};
use crate::events::{
    CancelReason, DomainEvent, OrderAccepted, OrderApproved, OrderCancelled, OrderCommandRefused,
    OrderCompleted, OrderConfirmed, OrderLineOutOfStock, OrderLineReserved, OrderPaymentCaptured,
    OrderPaymentFailed, OrderPlaced, OrderRejected, OrderSentForReview, OrderShipped,
    PaymentCaptured, PaymentDeclined, PaymentFailure, PaymentTimedOut, StockReleaseRequested,
    StockReservationFailed, StockReserved, WorkflowPlan,
};
use crate::rules::{self, Rules};
use crate::Evolve;

// ---------------------------------------------------------------- state

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderStatus {
    /// Nothing placed yet.
    #[default]
    New,
    /// Invalid when placed (terminal).
    Rejected,
    /// Waiting for `order.approve` / `order.reject` or the review timer.
    UnderReview,
    /// Fulfilment running: awaiting every line's reservation and the payment.
    Accepted,
    /// Every line reserved and payment captured.
    Confirmed,
    /// A digital order, confirmed (terminal).
    Completed,
    Shipped,
    /// Terminal.
    Cancelled,
}

impl OrderStatus {
    /// The status the read model (`order_status.status`) shows.
    ///
    /// `New` has no read-model row (an order exists from `OrderPlaced` on) and maps to
    /// `"new"`. `delivered` is never returned: delivery is known only from the
    /// shipment stream (`ShipmentDelivered`), which the projector applies on top.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::New => "new",
            OrderStatus::Rejected => "rejected",
            OrderStatus::UnderReview => "under_review",
            OrderStatus::Accepted => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Completed => "completed",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Cancelled => "cancelled",
        }
    }
}

/// Where one order line stands in the parallel split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineStatus {
    #[default]
    Pending,
    Reserved,
    OutOfStock,
    /// Was reserved; the order asked inventory to release it.
    ReleaseRequested,
}

/// Where the order's payment stands, as far as the order knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaymentStatus {
    #[default]
    Pending,
    Captured,
    Failed(PaymentFailure),
}

/// The order, folded from its `order-<id>` stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OrderState {
    pub status: OrderStatus,
    /// The placed order (the command's content, total, plan); `None` while `New`.
    pub placed: Option<OrderPlaced>,
    /// One entry per order line, in the order of `placed.items`.
    pub lines: Vec<LineStatus>,
    pub payment: PaymentStatus,
    /// Set by `OrderCancelled` and `OrderRejected`.
    pub cancel_reason: Option<CancelReason>,
    /// When the review timer expires (from `OrderSentForReview`).
    pub review_expires_at: Option<DateTime<Utc>>,
    /// The last `stream_version` folded (0-based); `None` for an empty stream.
    pub version: Option<i64>,
}

impl OrderState {
    pub fn order_id(&self) -> Option<Uuid> {
        self.placed.as_ref().map(|p| p.order_id)
    }

    /// The recorded step plan; `None` while `New`.
    pub fn plan(&self) -> Option<&WorkflowPlan> {
        self.placed.as_ref().map(|p| &p.plan)
    }

    fn line_status(&self, line: u32) -> Option<LineStatus> {
        usize::try_from(line)
            .ok()
            .and_then(|i| self.lines.get(i))
            .copied()
    }

    fn set_line(&mut self, line: u32, status: LineStatus) {
        if let Some(slot) = usize::try_from(line)
            .ok()
            .and_then(|i| self.lines.get_mut(i))
        {
            *slot = status;
        }
    }

    fn bump_version(&mut self) {
        self.version = Some(self.version.map_or(0, |v| v + 1));
    }
}

/// The read model's status of the order (see [`OrderStatus::as_str`]; `delivered`
/// comes from the shipment stream, not from here).
pub fn status_name(state: &OrderState) -> &'static str {
    state.status.as_str()
}

impl Evolve for OrderState {
    fn apply(&mut self, event: &DomainEvent) {
        use DomainEvent as E;
        match event {
            E::OrderPlaced(e) => {
                self.placed = Some(e.clone());
                self.lines = vec![LineStatus::Pending; e.items.len()];
            }
            E::OrderRejected(e) => {
                self.status = OrderStatus::Rejected;
                self.cancel_reason = Some(e.reason);
            }
            E::OrderSentForReview(e) => {
                self.status = OrderStatus::UnderReview;
                self.review_expires_at = Some(e.expires_at);
            }
            E::OrderAccepted(_) => self.status = OrderStatus::Accepted,
            E::OrderLineReserved(e) => self.set_line(e.line, LineStatus::Reserved),
            E::OrderLineOutOfStock(e) => self.set_line(e.line, LineStatus::OutOfStock),
            E::StockReleaseRequested(e) => self.set_line(e.line, LineStatus::ReleaseRequested),
            E::OrderPaymentCaptured(_) => self.payment = PaymentStatus::Captured,
            E::OrderPaymentFailed(e) => self.payment = PaymentStatus::Failed(e.reason),
            E::OrderConfirmed(_) => self.status = OrderStatus::Confirmed,
            E::OrderCompleted(_) => self.status = OrderStatus::Completed,
            E::OrderShipped(_) => self.status = OrderStatus::Shipped,
            E::OrderCancelled(e) => {
                self.status = OrderStatus::Cancelled;
                self.cancel_reason = Some(e.reason);
            }
            E::OrderApproved(_) | E::OrderCommandRefused(_) => {}
            // Not on the order stream: not the order's concern.
            _ => return,
        }
        self.bump_version();
    }
}

/// Folds one event of the `order-<id>` stream into the state.
pub fn evolve(mut state: OrderState, event: &DomainEvent) -> OrderState {
    state.apply(event);
    state
}

// ---------------------------------------------------------------- inputs

/// Everything the order saga reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderInput<'a> {
    /// `order.place`. `known_skus` must hold at least every SKU of `cmd.items` that
    /// some `StockSet` ever named.
    Place {
        cmd: PlaceOrder,
        rules: &'a Rules,
        known_skus: &'a BTreeSet<String>,
        now: DateTime<Utc>,
    },
    Cancel(CancelOrder),
    Approve(ApproveOrder),
    Reject(RejectOrder),
    /// The review timer fired. Has an effect only if `now` ≥ the recorded expiry
    /// (pass the timer's due time or later).
    ReviewExpired {
        now: DateTime<Utc>,
    },
    LineReserved(StockReserved),
    LineOutOfStock(StockReservationFailed),
    PaymentCaptured(PaymentCaptured),
    PaymentDeclined(PaymentDeclined),
    PaymentTimedOut(PaymentTimedOut),
    /// Shipping asks before it ships; `[OrderShipped]` means go, `[]` means don't.
    MarkShipped,
}

/// What the order does about one input: the events to append to `order-<id>`.
pub fn decide(state: &OrderState, input: OrderInput<'_>) -> Vec<DomainEvent> {
    match input {
        OrderInput::Place {
            cmd,
            rules,
            known_skus,
            now,
        } => place(state, cmd, rules, known_skus, now),
        OrderInput::Cancel(cmd) => cancel(state, cmd),
        OrderInput::Approve(cmd) => approve(state, cmd),
        OrderInput::Reject(cmd) => reject(state, cmd),
        OrderInput::ReviewExpired { now } => expire_review(state, now),
        OrderInput::LineReserved(e) => line_reserved(state, e),
        OrderInput::LineOutOfStock(e) => line_out_of_stock(state, e),
        OrderInput::PaymentCaptured(e) => payment_captured(state, e),
        OrderInput::PaymentDeclined(e) => {
            payment_failed(state, e.order_id, PaymentFailure::Declined, e.reason)
        }
        OrderInput::PaymentTimedOut(e) => payment_failed(
            state,
            e.order_id,
            PaymentFailure::Timeout,
            "payment not settled within the payment timeout".to_owned(),
        ),
        OrderInput::MarkShipped => mark_shipped(state),
    }
}

// ---------------------------------------------------------------- placing and review

fn place(
    state: &OrderState,
    cmd: PlaceOrder,
    rules: &Rules,
    known_skus: &BTreeSet<String>,
    now: DateTime<Utc>,
) -> Vec<DomainEvent> {
    if let Some(placed) = &state.placed {
        return if same_content(placed, &cmd) {
            vec![]
        } else {
            vec![refused(
                cmd.order_id,
                PLACE_ORDER,
                "the order was already placed with other content".to_owned(),
            )]
        };
    }
    let validity = rules.validate(&cmd, |sku| known_skus.contains(sku));
    let placed = OrderPlaced {
        total_cents: rules::order_total(&cmd.items).unwrap_or(i64::MAX),
        item_count: rules::item_count(&cmd.items).unwrap_or(i64::MAX),
        plan: rules.plan_for(&cmd),
        order_id: cmd.order_id,
        customer_id: cmd.customer_id,
        currency: cmd.currency,
        items: cmd.items,
        payment_token: cmd.payment_token,
        shipping: cmd.shipping,
    };
    let next = match validity {
        Err(detail) => DomainEvent::OrderRejected(OrderRejected {
            order_id: placed.order_id,
            reason: CancelReason::InvalidOrder,
            detail,
        }),
        Ok(()) if placed.plan.review => DomainEvent::OrderSentForReview(OrderSentForReview {
            order_id: placed.order_id,
            total_cents: placed.total_cents,
            threshold_cents: rules.review_threshold_cents,
            expires_at: rules::after(now, placed.plan.review_timeout_ms),
        }),
        Ok(()) => accepted(&placed),
    };
    vec![DomainEvent::OrderPlaced(placed), next]
}

/// Whether a repeated `order.place` carries what was placed (then it has no effect).
fn same_content(placed: &OrderPlaced, cmd: &PlaceOrder) -> bool {
    placed.order_id == cmd.order_id
        && placed.customer_id == cmd.customer_id
        && placed.currency == cmd.currency
        && placed.items == cmd.items
        && placed.payment_token == cmd.payment_token
        && placed.shipping == cmd.shipping
}

/// The parallel split: self-contained, so inventory and payment need not read the order.
fn accepted(placed: &OrderPlaced) -> DomainEvent {
    DomainEvent::OrderAccepted(OrderAccepted {
        order_id: placed.order_id,
        customer_id: placed.customer_id.clone(),
        currency: placed.currency.clone(),
        items: placed.items.clone(),
        payment_token: placed.payment_token.clone(),
        total_cents: placed.total_cents,
        payment_timeout_ms: placed.plan.payment_timeout_ms,
    })
}

fn approve(state: &OrderState, cmd: ApproveOrder) -> Vec<DomainEvent> {
    match (&state.placed, state.status) {
        (Some(placed), OrderStatus::UnderReview) => vec![
            DomainEvent::OrderApproved(OrderApproved {
                order_id: placed.order_id,
                reviewer: cmd.reviewer,
            }),
            accepted(placed),
        ],
        _ => vec![refused(
            cmd.order_id,
            APPROVE_ORDER,
            not_under_review(state),
        )],
    }
}

fn reject(state: &OrderState, cmd: RejectOrder) -> Vec<DomainEvent> {
    if state.status != OrderStatus::UnderReview {
        return vec![refused(cmd.order_id, REJECT_ORDER, not_under_review(state))];
    }
    vec![cancelled(
        cmd.order_id,
        CancelReason::ReviewRejected,
        cmd.reason,
        Some(cmd.reviewer),
    )]
}

fn expire_review(state: &OrderState, now: DateTime<Utc>) -> Vec<DomainEvent> {
    let due = state
        .review_expires_at
        .is_some_and(|expires_at| now >= expires_at);
    match state.order_id() {
        Some(order_id) if state.status == OrderStatus::UnderReview && due => vec![cancelled(
            order_id,
            CancelReason::ReviewExpired,
            "no review decision within the review timeout".to_owned(),
            None,
        )],
        _ => vec![],
    }
}

fn not_under_review(state: &OrderState) -> String {
    format!("the order is not under_review but {}", status_name(state))
}

// ---------------------------------------------------------------- cancelling

fn cancel(state: &OrderState, cmd: CancelOrder) -> Vec<DomainEvent> {
    match state.status {
        OrderStatus::Accepted | OrderStatus::UnderReview | OrderStatus::Confirmed => {
            let mut events = vec![cancelled(
                cmd.order_id,
                CancelReason::CustomerCancelled,
                cmd.reason,
                None,
            )];
            events.extend(release_reserved_lines(state));
            events
        }
        OrderStatus::New => vec![refused(
            cmd.order_id,
            CANCEL_ORDER,
            "the order does not exist".to_owned(),
        )],
        OrderStatus::Rejected
        | OrderStatus::Completed
        | OrderStatus::Shipped
        | OrderStatus::Cancelled => vec![refused(
            cmd.order_id,
            CANCEL_ORDER,
            format!("the order is already {}", status_name(state)),
        )],
    }
}

/// The fulfilment failed: cancel, and release every line reserved so far.
fn fail_fulfilment(
    state: &OrderState,
    order_id: Uuid,
    reason: CancelReason,
    detail: String,
) -> Vec<DomainEvent> {
    let mut events = vec![cancelled(order_id, reason, detail, None)];
    events.extend(release_reserved_lines(state));
    events
}

/// Compensation: a release request for every line currently reserved.
fn release_reserved_lines(state: &OrderState) -> Vec<DomainEvent> {
    let Some(placed) = &state.placed else {
        return vec![];
    };
    (0u32..)
        .zip(placed.items.iter().zip(&state.lines))
        .filter(|(_, (_, status))| **status == LineStatus::Reserved)
        .map(|(line, (item, _))| release(placed.order_id, line, &item.sku, item.quantity))
        .collect()
}

fn release(order_id: Uuid, line: u32, sku: &str, quantity: i64) -> DomainEvent {
    DomainEvent::StockReleaseRequested(StockReleaseRequested {
        order_id,
        line,
        sku: sku.to_owned(),
        quantity,
    })
}

fn cancelled(
    order_id: Uuid,
    reason: CancelReason,
    detail: String,
    by: Option<String>,
) -> DomainEvent {
    DomainEvent::OrderCancelled(OrderCancelled {
        order_id,
        reason,
        detail,
        by,
    })
}

fn refused(order_id: Uuid, command: &str, reason: String) -> DomainEvent {
    DomainEvent::OrderCommandRefused(OrderCommandRefused {
        order_id,
        command: command.to_owned(),
        reason,
    })
}

// ---------------------------------------------------------------- the join

/// A line's reservation arrived. Recorded once; released at once if the order is no
/// longer waiting for it (cancelled); may complete the join.
fn line_reserved(state: &OrderState, e: StockReserved) -> Vec<DomainEvent> {
    if state.line_status(e.line) != Some(LineStatus::Pending) {
        return vec![];
    }
    let mut events = vec![DomainEvent::OrderLineReserved(OrderLineReserved {
        order_id: e.order_id,
        line: e.line,
        sku: e.sku.clone(),
        quantity: e.quantity,
    })];
    if state.status == OrderStatus::Accepted {
        events.extend(join(state, &events));
    } else {
        events.push(release(e.order_id, e.line, &e.sku, e.quantity));
    }
    events
}

fn line_out_of_stock(state: &OrderState, e: StockReservationFailed) -> Vec<DomainEvent> {
    if state.line_status(e.line) != Some(LineStatus::Pending) {
        return vec![];
    }
    let detail = format!(
        "SKU '{}': requested {}, available {}",
        e.sku, e.requested, e.available
    );
    let mut events = vec![DomainEvent::OrderLineOutOfStock(OrderLineOutOfStock {
        order_id: e.order_id,
        line: e.line,
        sku: e.sku,
        requested: e.requested,
        available: e.available,
    })];
    if state.status == OrderStatus::Accepted {
        events.extend(fail_fulfilment(
            state,
            e.order_id,
            CancelReason::OutOfStock,
            detail,
        ));
    }
    events
}

/// Recorded once. A capture for a cancelled order is only recorded: payment refunds
/// it by itself.
fn payment_captured(state: &OrderState, e: PaymentCaptured) -> Vec<DomainEvent> {
    if state.placed.is_none() || state.payment != PaymentStatus::Pending {
        return vec![];
    }
    let mut events = vec![DomainEvent::OrderPaymentCaptured(OrderPaymentCaptured {
        order_id: e.order_id,
        amount_cents: e.amount_cents,
    })];
    if state.status == OrderStatus::Accepted {
        events.extend(join(state, &events));
    }
    events
}

fn payment_failed(
    state: &OrderState,
    order_id: Uuid,
    reason: PaymentFailure,
    detail: String,
) -> Vec<DomainEvent> {
    if state.placed.is_none() || state.payment != PaymentStatus::Pending {
        return vec![];
    }
    let mut events = vec![DomainEvent::OrderPaymentFailed(OrderPaymentFailed {
        order_id,
        reason,
    })];
    if state.status == OrderStatus::Accepted {
        let code = match reason {
            PaymentFailure::Declined => CancelReason::PaymentDeclined,
            PaymentFailure::Timeout => CancelReason::PaymentTimeout,
        };
        events.extend(fail_fulfilment(state, order_id, code, detail));
    }
    events
}

/// The join: once the branch just recorded (`recorded`) leaves every line reserved
/// and the payment captured, the order is confirmed (and a digital one completed).
fn join(state: &OrderState, recorded: &[DomainEvent]) -> Vec<DomainEvent> {
    let after = recorded.iter().fold(state.clone(), evolve);
    let all_reserved = after.lines.iter().all(|l| *l == LineStatus::Reserved);
    let (Some(placed), true, PaymentStatus::Captured) =
        (&after.placed, all_reserved, after.payment)
    else {
        return vec![];
    };
    let mut events = vec![DomainEvent::OrderConfirmed(OrderConfirmed {
        order_id: placed.order_id,
        items: placed.items.clone(),
        shipping: placed.shipping.clone(),
        delivery_delay_ms: placed.plan.delivery_delay_ms,
    })];
    if !placed.plan.ship {
        events.push(DomainEvent::OrderCompleted(OrderCompleted {
            order_id: placed.order_id,
            items: placed.items.clone(),
        }));
    }
    events
}

// ---------------------------------------------------------------- shipping

fn mark_shipped(state: &OrderState) -> Vec<DomainEvent> {
    match (&state.placed, state.status) {
        (Some(placed), OrderStatus::Confirmed) if placed.plan.ship => {
            vec![DomainEvent::OrderShipped(OrderShipped {
                order_id: placed.order_id,
            })]
        }
        _ => vec![],
    }
}
