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
use crate::rules::{self, PlacementFacts, Rules};
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

/// Every status the read model (`order_status.status`) shows, in the order's course
/// (contract section 3).
pub const READ_MODEL_STATUSES: [&str; 8] = [
    "pending",
    "under_review",
    "confirmed",
    "shipped",
    "delivered",
    "completed",
    "cancelled",
    "rejected",
];

impl OrderStatus {
    /// Every status, in declaration order.
    pub const ALL: [OrderStatus; 8] = [
        OrderStatus::New,
        OrderStatus::Rejected,
        OrderStatus::UnderReview,
        OrderStatus::Accepted,
        OrderStatus::Confirmed,
        OrderStatus::Completed,
        OrderStatus::Shipped,
        OrderStatus::Cancelled,
    ];

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
    /// some `StockSet` ever named; `facts` what the plan's checks need (see
    /// [`Rules::needs_recent_orders`]). The rules are read here only: the plan they
    /// give is recorded in `OrderPlaced`, and every later input follows it.
    Place {
        cmd: PlaceOrder,
        rules: &'a Rules,
        known_skus: &'a BTreeSet<String>,
        facts: PlacementFacts,
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
            facts,
            now,
        } => place(state, cmd, rules, known_skus, facts, now),
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
    facts: PlacementFacts,
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
        Ok(()) => match rules.review_cause(&placed, &facts) {
            Some(cause) => DomainEvent::OrderSentForReview(OrderSentForReview {
                order_id: placed.order_id,
                total_cents: placed.total_cents,
                threshold_cents: rules.review_threshold_cents,
                expires_at: rules::after(now, placed.plan.review_timeout_ms),
                rule: cause.rule.to_owned(),
                detail: cause.detail,
            }),
            None => accepted(&placed),
        },
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
    // A capture after the payment was voided or timed out is not this order's money,
    // whatever order its events arrive in: the timeout or cancellation decides.
    if e.unwanted || state.placed.is_none() || state.payment != PaymentStatus::Pending {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{OrderLine, Shipping, ShippingMethod};
    use crate::fold;
    use chrono::TimeDelta;

    const ORDER_ID: Uuid = Uuid::from_u128(0xA11CE);

    fn now() -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000)
    }

    fn line(sku: &str, quantity: i64, unit_price_cents: i64) -> OrderLine {
        OrderLine {
            sku: sku.into(),
            quantity,
            unit_price_cents,
        }
    }

    /// Two lines, 2 000 cents, shipped standard.
    fn small_order() -> PlaceOrder {
        PlaceOrder {
            order_id: ORDER_ID,
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            items: vec![line("A", 2, 500), line("B", 1, 1_000)],
            payment_token: "tok_ok".into(),
            shipping: Some(Shipping {
                method: ShippingMethod::Standard,
                address: "1 Main St".into(),
            }),
        }
    }

    fn digital_order() -> PlaceOrder {
        PlaceOrder {
            shipping: None,
            ..small_order()
        }
    }

    /// At the review threshold exactly.
    fn big_order() -> PlaceOrder {
        PlaceOrder {
            items: vec![line("A", 2, 50_000)],
            ..small_order()
        }
    }

    fn known_skus() -> BTreeSet<String> {
        ["A", "B"].into_iter().map(String::from).collect()
    }

    fn types(events: &[DomainEvent]) -> Vec<&'static str> {
        events.iter().map(DomainEvent::event_type).collect()
    }

    /// Given the events so far, when an input arrives, then these events; the history
    /// grows by what was decided, as the store would.
    struct Saga {
        cmd: PlaceOrder,
        history: Vec<DomainEvent>,
    }

    impl Saga {
        fn new(cmd: PlaceOrder) -> Self {
            Saga {
                cmd,
                history: vec![],
            }
        }

        fn placed(cmd: PlaceOrder) -> Self {
            let mut saga = Saga::new(cmd);
            saga.place(saga.cmd.clone());
            saga
        }

        fn state(&self) -> OrderState {
            fold(&self.history)
        }

        fn when(&mut self, input: OrderInput<'_>) -> Vec<DomainEvent> {
            let decided = decide(&self.state(), input);
            self.history.extend(decided.iter().cloned());
            decided
        }

        fn place(&mut self, cmd: PlaceOrder) -> Vec<DomainEvent> {
            self.place_under(cmd, &Rules::default(), 0)
        }

        /// Placed under `rules`, the customer having placed `recent_orders` orders
        /// within the last minute.
        fn place_under(
            &mut self,
            cmd: PlaceOrder,
            rules: &Rules,
            recent_orders: u32,
        ) -> Vec<DomainEvent> {
            self.when(OrderInput::Place {
                cmd,
                rules,
                known_skus: &known_skus(),
                facts: PlacementFacts { recent_orders },
                now: now(),
            })
        }

        fn reserve(&mut self, line: u32) -> Vec<DomainEvent> {
            let item = self.item(line);
            self.when(OrderInput::LineReserved(StockReserved {
                sku: item.sku,
                order_id: ORDER_ID,
                line,
                quantity: item.quantity,
            }))
        }

        fn out_of_stock(&mut self, line: u32) -> Vec<DomainEvent> {
            let item = self.item(line);
            self.when(OrderInput::LineOutOfStock(StockReservationFailed {
                sku: item.sku,
                order_id: ORDER_ID,
                line,
                requested: item.quantity,
                available: 0,
            }))
        }

        fn capture(&mut self) -> Vec<DomainEvent> {
            self.when(OrderInput::PaymentCaptured(PaymentCaptured {
                order_id: ORDER_ID,
                amount_cents: 2_000,
                gateway_reference: "gw-1".into(),
                unwanted: false,
            }))
        }

        fn decline(&mut self) -> Vec<DomainEvent> {
            self.when(OrderInput::PaymentDeclined(PaymentDeclined {
                order_id: ORDER_ID,
                reason: "card declined".into(),
            }))
        }

        fn time_out_payment(&mut self) -> Vec<DomainEvent> {
            self.when(OrderInput::PaymentTimedOut(PaymentTimedOut {
                order_id: ORDER_ID,
            }))
        }

        fn cancel(&mut self) -> Vec<DomainEvent> {
            self.when(OrderInput::Cancel(CancelOrder {
                order_id: ORDER_ID,
                reason: "changed my mind".into(),
            }))
        }

        fn approve(&mut self) -> Vec<DomainEvent> {
            self.when(OrderInput::Approve(ApproveOrder {
                order_id: ORDER_ID,
                reviewer: "rita".into(),
            }))
        }

        fn reject(&mut self) -> Vec<DomainEvent> {
            self.when(OrderInput::Reject(RejectOrder {
                order_id: ORDER_ID,
                reviewer: "rita".into(),
                reason: "looks fraudulent".into(),
            }))
        }

        fn confirm(&mut self) {
            for line in 0..self.lines() {
                self.reserve(line);
            }
            self.capture();
        }

        fn lines(&self) -> u32 {
            u32::try_from(self.cmd.items.len()).unwrap_or(0)
        }

        fn item(&self, line: u32) -> OrderLine {
            self.cmd.items[line as usize].clone()
        }

        fn status(&self) -> &'static str {
            status_name(&self.state())
        }
    }

    fn cancel_reason(events: &[DomainEvent]) -> Option<(CancelReason, String, Option<String>)> {
        events.iter().find_map(|e| match e {
            DomainEvent::OrderCancelled(c) => Some((c.reason, c.detail.clone(), c.by.clone())),
            _ => None,
        })
    }

    fn released_lines(events: &[DomainEvent]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                DomainEvent::StockReleaseRequested(r) => Some(r.line),
                _ => None,
            })
            .collect()
    }

    fn refusal(events: &[DomainEvent]) -> Option<(String, String)> {
        match events {
            [DomainEvent::OrderCommandRefused(r)] => Some((r.command.clone(), r.reason.clone())),
            _ => None,
        }
    }

    // ------------------------------------------------------------ placing

    #[test]
    fn a_valid_order_is_placed_and_accepted() {
        let mut saga = Saga::new(small_order());
        let events = saga.place(small_order());
        assert_eq!(types(&events), ["OrderPlaced", "OrderAccepted"]);
        let DomainEvent::OrderPlaced(placed) = &events[0] else {
            panic!("not placed")
        };
        assert_eq!((placed.total_cents, placed.item_count), (2_000, 3));
        assert!(placed.plan.ship && !placed.plan.review);
        let DomainEvent::OrderAccepted(accepted) = &events[1] else {
            panic!("not accepted")
        };
        assert_eq!(
            (accepted.total_cents, accepted.payment_timeout_ms),
            (2_000, 30_000)
        );
        assert_eq!(accepted.items, small_order().items);
        assert_eq!(saga.status(), "pending");
    }

    #[test]
    fn an_invalid_order_is_placed_and_rejected_with_the_detail() {
        let mut cmd = small_order();
        cmd.items.push(line("NOPE", 1, 1));
        let mut saga = Saga::new(cmd.clone());
        let events = saga.place(cmd);
        assert_eq!(types(&events), ["OrderPlaced", "OrderRejected"]);
        let DomainEvent::OrderRejected(rejected) = &events[1] else {
            panic!("not rejected")
        };
        assert_eq!(rejected.reason, CancelReason::InvalidOrder);
        assert!(rejected.detail.contains("NOPE"));
        assert_eq!(saga.status(), "rejected");
        assert_eq!(saga.state().cancel_reason, Some(CancelReason::InvalidOrder));
    }

    #[test]
    fn an_order_at_the_threshold_is_sent_for_review_until_the_review_timeout() {
        let mut saga = Saga::new(big_order());
        let events = saga.place(big_order());
        assert_eq!(types(&events), ["OrderPlaced", "OrderSentForReview"]);
        let DomainEvent::OrderSentForReview(review) = &events[1] else {
            panic!("not sent for review")
        };
        assert_eq!(review.expires_at, now() + TimeDelta::hours(24));
        assert_eq!(
            (review.total_cents, review.threshold_cents),
            (100_000, 100_000)
        );
        assert_eq!(saga.status(), "under_review");
    }

    // ------------------------------------------------------------ versions and checks

    /// Workflow `version`, at most 2 orders a minute per customer before review.
    fn fraud_rules(version: u32) -> Rules {
        Rules {
            workflow_version: version,
            fraud_max_orders_per_minute: Some(2),
            ..Rules::default()
        }
    }

    fn review_rule(events: &[DomainEvent]) -> Option<(String, String)> {
        events.iter().find_map(|e| match e {
            DomainEvent::OrderSentForReview(r) => Some((r.rule.clone(), r.detail.clone())),
            _ => None,
        })
    }

    #[test]
    fn workflow_2_sends_a_fast_customers_order_to_review_naming_the_fraud_rule() {
        let mut saga = Saga::new(small_order());
        let events = saga.place_under(small_order(), &fraud_rules(2), 2);
        assert_eq!(types(&events), ["OrderPlaced", "OrderSentForReview"]);
        let DomainEvent::OrderPlaced(placed) = &events[0] else {
            panic!("not placed")
        };
        assert_eq!(placed.plan.workflow_version, 2);
        assert_eq!(placed.plan.checks, ["fraud_velocity"]);
        assert!(!placed.plan.review, "the amount alone needs no review");
        assert!(
            matches!(review_rule(&events), Some((rule, detail)) if rule == "fraud_velocity" && detail.contains("3 orders"))
        );
        assert_eq!(saga.status(), "under_review");
    }

    #[test]
    fn workflow_2_accepts_an_order_within_the_fraud_limit() {
        let mut saga = Saga::new(small_order());
        let events = saga.place_under(small_order(), &fraud_rules(2), 1);
        assert_eq!(types(&events), ["OrderPlaced", "OrderAccepted"]);
    }

    #[test]
    fn workflow_1_runs_no_checks_even_when_a_fraud_rule_is_configured() {
        let mut saga = Saga::new(small_order());
        let events = saga.place_under(small_order(), &fraud_rules(1), 50);
        assert_eq!(types(&events), ["OrderPlaced", "OrderAccepted"]);
        assert_eq!(saga.state().plan().map(|p| p.checks.len()), Some(0));
        assert_eq!(saga.state().plan().map(|p| p.workflow_version), Some(1));
    }

    #[test]
    fn the_amount_review_is_named_before_any_check() {
        let mut saga = Saga::new(big_order());
        let events = saga.place_under(big_order(), &fraud_rules(2), 9);
        assert!(matches!(review_rule(&events), Some((rule, _)) if rule == "review_threshold"));
    }

    #[test]
    fn an_order_held_by_the_fraud_check_finishes_under_its_recorded_plan() {
        // Approval, the join and completion take no rules: they follow the plan
        // recorded in OrderPlaced, whatever the rules say by then.
        let mut saga = Saga::new(digital_order());
        saga.place_under(digital_order(), &fraud_rules(2), 7);
        assert_eq!(types(&saga.approve()), ["OrderApproved", "OrderAccepted"]);
        saga.confirm();
        assert_eq!(saga.status(), "completed");
        assert_eq!(saga.state().plan().map(|p| p.workflow_version), Some(2));
    }

    #[test]
    fn placing_the_same_order_again_has_no_effect() {
        let mut saga = Saga::placed(small_order());
        assert_eq!(saga.place(small_order()), vec![]);
        let mut rejected = Saga::placed(PlaceOrder {
            currency: "USD".into(),
            ..small_order()
        });
        assert_eq!(rejected.place(rejected.cmd.clone()), vec![]);
    }

    #[test]
    fn placing_other_content_under_an_existing_id_is_refused() {
        let mut saga = Saga::placed(small_order());
        let events = saga.place(PlaceOrder {
            payment_token: "tok_decline".into(),
            ..small_order()
        });
        assert!(matches!(refusal(&events), Some((c, _)) if c == "order.place"));
        assert_eq!(saga.status(), "pending");
    }

    // ------------------------------------------------------------ review

    #[test]
    fn approving_an_order_under_review_starts_fulfilment() {
        let mut saga = Saga::placed(big_order());
        assert_eq!(types(&saga.approve()), ["OrderApproved", "OrderAccepted"]);
        assert_eq!(saga.status(), "pending");
    }

    #[test]
    fn a_duplicate_approve_is_refused() {
        let mut saga = Saga::placed(big_order());
        saga.approve();
        let events = saga.approve();
        assert!(
            matches!(refusal(&events), Some((c, r)) if c == "order.approve" && r.contains("pending"))
        );
    }

    #[test]
    fn approve_or_reject_of_an_order_not_under_review_is_refused() {
        let mut saga = Saga::placed(small_order());
        assert!(matches!(refusal(&saga.approve()), Some((c, _)) if c == "order.approve"));
        assert!(matches!(refusal(&saga.reject()), Some((c, _)) if c == "order.reject"));
        let mut missing = Saga::new(small_order());
        assert!(refusal(&missing.approve()).is_some());
        assert!(refusal(&missing.reject()).is_some());
    }

    #[test]
    fn rejecting_an_order_under_review_cancels_it_naming_the_reviewer() {
        let mut saga = Saga::placed(big_order());
        let events = saga.reject();
        assert_eq!(types(&events), ["OrderCancelled"]);
        assert_eq!(
            cancel_reason(&events),
            Some((
                CancelReason::ReviewRejected,
                "looks fraudulent".into(),
                Some("rita".into())
            ))
        );
        assert_eq!(saga.status(), "cancelled");
    }

    #[test]
    fn the_review_timer_cancels_an_order_still_under_review() {
        let mut saga = Saga::placed(big_order());
        let events = saga.when(OrderInput::ReviewExpired {
            now: now() + TimeDelta::hours(24),
        });
        assert!(matches!(
            cancel_reason(&events),
            Some((CancelReason::ReviewExpired, _, None))
        ));
    }

    #[test]
    fn the_review_timer_has_no_effect_before_it_is_due_or_after_a_decision() {
        let mut saga = Saga::placed(big_order());
        assert_eq!(saga.when(OrderInput::ReviewExpired { now: now() }), vec![]);
        saga.approve();
        let late = now() + TimeDelta::hours(25);
        assert_eq!(saga.when(OrderInput::ReviewExpired { now: late }), vec![]);
        let mut never_reviewed = Saga::placed(small_order());
        assert_eq!(
            never_reviewed.when(OrderInput::ReviewExpired { now: late }),
            vec![]
        );
    }

    // ------------------------------------------------------------ the join

    #[test]
    fn the_order_is_confirmed_when_the_payment_completes_the_join() {
        let mut saga = Saga::placed(small_order());
        assert_eq!(types(&saga.reserve(0)), ["OrderLineReserved"]);
        assert_eq!(types(&saga.reserve(1)), ["OrderLineReserved"]);
        let events = saga.capture();
        assert_eq!(types(&events), ["OrderPaymentCaptured", "OrderConfirmed"]);
        let DomainEvent::OrderConfirmed(confirmed) = &events[1] else {
            panic!("not confirmed")
        };
        assert_eq!(confirmed.delivery_delay_ms, 2_000);
        assert_eq!(confirmed.shipping, small_order().shipping);
        assert_eq!(saga.status(), "confirmed");
    }

    #[test]
    fn a_capture_that_landed_after_the_payment_timed_out_never_confirms_the_order() {
        // The payment stream says: timed out, then a late (unwanted) capture. The saga
        // may get the capture first (redelivery reorders); it must not confirm.
        let mut saga = Saga::placed(small_order());
        saga.reserve(0);
        saga.reserve(1);
        let late = saga.when(OrderInput::PaymentCaptured(PaymentCaptured {
            order_id: ORDER_ID,
            amount_cents: 2_000,
            gateway_reference: "gw-late".into(),
            unwanted: true,
        }));
        assert_eq!(types(&late), Vec::<&str>::new());
        assert_eq!(saga.status(), "pending");
        let timed_out = saga.when(OrderInput::PaymentTimedOut(PaymentTimedOut {
            order_id: ORDER_ID,
        }));
        assert!(
            types(&timed_out).contains(&"OrderCancelled"),
            "{:?}",
            types(&timed_out)
        );
    }

    #[test]
    fn the_order_is_confirmed_when_the_last_reservation_completes_the_join() {
        let mut saga = Saga::placed(small_order());
        saga.reserve(1);
        assert_eq!(types(&saga.capture()), ["OrderPaymentCaptured"]);
        assert_eq!(
            types(&saga.reserve(0)),
            ["OrderLineReserved", "OrderConfirmed"]
        );
        assert_eq!(saga.status(), "confirmed");
    }

    #[test]
    fn a_digital_order_completes_once_confirmed() {
        let mut saga = Saga::placed(digital_order());
        saga.capture();
        saga.reserve(0);
        let events = saga.reserve(1);
        assert_eq!(
            types(&events),
            ["OrderLineReserved", "OrderConfirmed", "OrderCompleted"]
        );
        assert_eq!(saga.status(), "completed");
    }

    #[test]
    fn repeated_outcomes_are_recorded_once_and_confirm_once() {
        let mut saga = Saga::placed(small_order());
        saga.confirm();
        assert_eq!(saga.reserve(0), vec![]);
        assert_eq!(saga.capture(), vec![]);
        assert_eq!(saga.out_of_stock(1), vec![]);
        assert_eq!(saga.decline(), vec![]);
        let confirmations = saga
            .history
            .iter()
            .filter(|e| e.event_type() == "OrderConfirmed")
            .count();
        assert_eq!(confirmations, 1);
    }

    #[test]
    fn outcomes_for_unknown_lines_or_orders_have_no_effect() {
        let mut saga = Saga::placed(small_order());
        let stray = OrderInput::LineReserved(StockReserved {
            sku: "A".into(),
            order_id: ORDER_ID,
            line: 7,
            quantity: 1,
        });
        assert_eq!(saga.when(stray), vec![]);
        let mut missing = Saga::new(small_order());
        assert_eq!(missing.reserve(0), vec![]);
        assert_eq!(missing.capture(), vec![]);
        assert_eq!(missing.decline(), vec![]);
    }

    // ------------------------------------------------------------ failures and compensation

    #[test]
    fn missing_stock_cancels_and_releases_reserved_lines() {
        let mut saga = Saga::placed(small_order());
        saga.reserve(0);
        let events = saga.out_of_stock(1);
        assert_eq!(
            types(&events),
            [
                "OrderLineOutOfStock",
                "OrderCancelled",
                "StockReleaseRequested"
            ]
        );
        assert!(
            matches!(cancel_reason(&events), Some((CancelReason::OutOfStock, d, None)) if d.contains("'B'"))
        );
        assert_eq!(released_lines(&events), [0]);
        assert_eq!(saga.status(), "cancelled");
    }

    #[test]
    fn missing_stock_after_a_cancellation_is_only_recorded() {
        let mut saga = Saga::placed(small_order());
        saga.out_of_stock(0);
        assert_eq!(types(&saga.out_of_stock(1)), ["OrderLineOutOfStock"]);
        assert_eq!(saga.state().cancel_reason, Some(CancelReason::OutOfStock));
    }

    #[test]
    fn a_declined_payment_cancels_and_releases_reserved_lines() {
        let mut saga = Saga::placed(small_order());
        saga.reserve(0);
        saga.reserve(1);
        let events = saga.decline();
        assert_eq!(
            types(&events),
            [
                "OrderPaymentFailed",
                "OrderCancelled",
                "StockReleaseRequested",
                "StockReleaseRequested"
            ]
        );
        assert!(matches!(
            cancel_reason(&events),
            Some((CancelReason::PaymentDeclined, _, _))
        ));
        assert_eq!(released_lines(&events), [0, 1]);
        assert_eq!(saga.state().lines, [LineStatus::ReleaseRequested; 2]);
    }

    #[test]
    fn a_payment_timeout_cancels_with_payment_timeout() {
        let mut saga = Saga::placed(small_order());
        saga.reserve(1);
        let events = saga.time_out_payment();
        assert!(matches!(
            cancel_reason(&events),
            Some((CancelReason::PaymentTimeout, _, _))
        ));
        assert_eq!(released_lines(&events), [1]);
        assert_eq!(
            saga.state().payment,
            PaymentStatus::Failed(PaymentFailure::Timeout)
        );
    }

    #[test]
    fn a_payment_captured_after_the_timeout_fired_changes_nothing_here() {
        // The payment stream records the capture and refunds it (see payment.rs).
        let mut saga = Saga::placed(small_order());
        saga.time_out_payment();
        saga.reserve(0);
        assert_eq!(saga.capture(), vec![]);
        assert_eq!(saga.status(), "cancelled");
    }

    #[test]
    fn a_reservation_arriving_after_the_cancellation_is_recorded_and_released() {
        let mut saga = Saga::placed(small_order());
        saga.decline();
        let events = saga.reserve(0);
        assert_eq!(
            types(&events),
            ["OrderLineReserved", "StockReleaseRequested"]
        );
        assert_eq!(released_lines(&events), [0]);
        assert_eq!(saga.reserve(0), vec![]);
        assert_eq!(saga.status(), "cancelled");
    }

    // ------------------------------------------------------------ cancel

    #[test]
    fn cancel_while_the_payment_is_in_flight_cancels_and_a_late_capture_is_only_recorded() {
        let mut saga = Saga::placed(small_order());
        saga.reserve(0);
        let events = saga.cancel();
        assert_eq!(types(&events), ["OrderCancelled", "StockReleaseRequested"]);
        assert_eq!(
            cancel_reason(&events),
            Some((
                CancelReason::CustomerCancelled,
                "changed my mind".into(),
                None
            ))
        );
        saga.reserve(1);
        assert_eq!(types(&saga.capture()), ["OrderPaymentCaptured"]);
        assert_eq!(saga.status(), "cancelled");
    }

    #[test]
    fn an_order_under_review_can_be_cancelled() {
        let mut saga = Saga::placed(big_order());
        assert_eq!(types(&saga.cancel()), ["OrderCancelled"]);
    }

    #[test]
    fn a_confirmed_order_can_be_cancelled_releasing_every_line() {
        let mut saga = Saga::placed(small_order());
        saga.confirm();
        let events = saga.cancel();
        assert_eq!(released_lines(&events), [0, 1]);
        assert_eq!(saga.status(), "cancelled");
        assert_eq!(saga.when(OrderInput::MarkShipped), vec![]);
    }

    #[test]
    fn cancel_is_refused_once_shipped_completed_cancelled_or_rejected_or_never_placed() {
        let mut shipped = Saga::placed(small_order());
        shipped.confirm();
        shipped.when(OrderInput::MarkShipped);
        let mut completed = Saga::placed(digital_order());
        completed.confirm();
        let mut cancelled = Saga::placed(small_order());
        cancelled.cancel();
        let mut rejected = Saga::placed(PlaceOrder {
            items: vec![],
            ..small_order()
        });
        let mut missing = Saga::new(small_order());
        for (saga, status) in [
            (&mut shipped, "shipped"),
            (&mut completed, "completed"),
            (&mut cancelled, "cancelled"),
            (&mut rejected, "rejected"),
        ] {
            let events = saga.cancel();
            assert!(
                matches!(refusal(&events), Some((c, r)) if c == "order.cancel" && r.contains(status)),
                "{status}: {events:?}"
            );
            assert_eq!(saga.status(), status);
        }
        assert!(matches!(refusal(&missing.cancel()), Some((_, r)) if r.contains("does not exist")));
    }

    // ------------------------------------------------------------ shipping

    #[test]
    fn a_confirmed_order_with_shipping_is_marked_shipped() {
        let mut saga = Saga::placed(small_order());
        assert_eq!(saga.when(OrderInput::MarkShipped), vec![]);
        saga.confirm();
        assert_eq!(types(&saga.when(OrderInput::MarkShipped)), ["OrderShipped"]);
        assert_eq!(saga.status(), "shipped");
        assert_eq!(saga.when(OrderInput::MarkShipped), vec![]);
    }

    #[test]
    fn a_digital_order_is_never_shipped() {
        let mut saga = Saga::placed(digital_order());
        saga.confirm();
        assert_eq!(saga.when(OrderInput::MarkShipped), vec![]);
    }

    // ------------------------------------------------------------ state

    #[test]
    fn the_state_counts_stream_versions_and_ignores_other_streams() {
        let saga = Saga::placed(small_order());
        assert_eq!(OrderState::default().version, None);
        assert_eq!(saga.state().version, Some(1));
        let other = DomainEvent::PaymentTimedOut(PaymentTimedOut { order_id: ORDER_ID });
        assert_eq!(evolve(saga.state(), &other), saga.state());
        assert_eq!(saga.state().plan().map(|p| p.ship), Some(true));
        assert_eq!(saga.state().order_id(), Some(ORDER_ID));
    }

    #[test]
    fn status_names_are_the_read_models() {
        let names: Vec<_> = [
            OrderStatus::Rejected,
            OrderStatus::UnderReview,
            OrderStatus::Accepted,
            OrderStatus::Confirmed,
            OrderStatus::Completed,
            OrderStatus::Shipped,
            OrderStatus::Cancelled,
        ]
        .map(OrderStatus::as_str)
        .into();
        assert_eq!(
            names,
            [
                "rejected",
                "under_review",
                "pending",
                "confirmed",
                "completed",
                "shipped",
                "cancelled"
            ]
        );
        // Every status the saga reports is one the read model lists; `delivered`
        // comes from the shipment stream.
        assert!(names.iter().all(|n| READ_MODEL_STATUSES.contains(n)));
        assert!(READ_MODEL_STATUSES.contains(&"delivered"));
        assert_eq!(READ_MODEL_STATUSES.len(), names.len() + 1);
    }
}
