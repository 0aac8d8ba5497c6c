//! `orderflow audit`: checks the rules of the order's course (contract section 3)
//! against the event log alone, and the read models against a fresh fold of the log.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use domain::{DomainEvent, EventEnvelope, Evolve, OrderState, OrderStatus, PaymentState};
use eventstore::{EventStore, LogPosition};
use projector::order_status::{self, OrderStatusRow};

use crate::ServiceError;

/// A timer may fire this late before the order counts as stuck.
pub const STUCK_GRACE: Duration = Duration::seconds(15);

#[derive(Debug, Default)]
struct OrderFacts {
    order: OrderState,
    payment: PaymentState,
    /// Net units per line: reserved − released − committed, and committed.
    held: BTreeMap<u32, i64>,
    committed: BTreeMap<u32, i64>,
    delivered: bool,
    deliver_at: Option<DateTime<Utc>>,
    placed_at: Option<DateTime<Utc>>,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct Report {
    pub orders: usize,
    pub events: u64,
    pub skus: usize,
    /// (order or SKU, problem)
    pub problems: Vec<(String, String)>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn offending(&self) -> BTreeSet<&str> {
        self.problems.iter().map(|(who, _)| who.as_str()).collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "audited {} events: {} orders, {} SKUs", self.events, self.orders, self.skus)?;
        if self.is_clean() {
            return writeln!(f, "OK: stock and money conserved, no order stuck, read models match the log");
        }
        for (who, problem) in &self.problems {
            writeln!(f, "FAIL {who}: {problem}")?;
        }
        writeln!(f, "{} problems; offending: {}", self.problems.len(), self.offending().into_iter().collect::<Vec<_>>().join(" "))
    }
}

/// Folds the whole log and checks it.
pub async fn audit(store: &EventStore) -> Result<Report, ServiceError> {
    let mut auditor = Auditor::default();
    let mut after = LogPosition::START;
    loop {
        let page = store.read_all(after, 5_000).await?;
        let Some(last) = page.last().map(|r| r.log_position()) else { break };
        for rec in &page {
            match projector::to_envelope(rec) {
                Ok(env) => auditor.observe(&env),
                Err(e) => auditor.report.problems.push((rec.stream_name.clone(), format!("undecodable event: {e}"))),
            }
        }
        after = last;
    }
    let rows: Vec<OrderStatusRow> = sqlx::query_as(
        "SELECT order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                placed_at, updated_at, last_global_position FROM order_status",
    )
    .fetch_all(store.pool())
    .await?;
    let stock: Vec<(String, i64, i64)> = sqlx::query_as("SELECT sku, on_hand, reserved FROM stock_levels")
        .fetch_all(store.pool())
        .await?;
    Ok(auditor.finish(Utc::now(), &rows, &stock))
}

/// The pure part of the audit: observe events in log order, then judge.
#[derive(Default)]
pub struct Auditor {
    orders: BTreeMap<uuid::Uuid, OrderFacts>,
    skus: BTreeMap<String, projector::stock_levels::Level>,
    expected_rows: BTreeMap<uuid::Uuid, OrderStatusRow>,
    report: Report,
}

impl Auditor {
    pub fn observe(&mut self, env: &EventEnvelope) {
        self.report.events += 1;
        self.check_stock(env);
        if let Some(order_id) = env.event.order_id() {
            if let Some(row) = order_status::apply(self.expected_rows.get(&order_id), env) {
                self.expected_rows.insert(order_id, row);
            }
            let facts = self.orders.entry(order_id).or_default();
            observe_order(facts, env);
        }
    }

    fn check_stock(&mut self, env: &EventEnvelope) {
        let sku = match &env.event {
            DomainEvent::StockSet(e) => &e.sku,
            DomainEvent::StockReserved(e) => &e.sku,
            DomainEvent::StockReleased(e) => &e.sku,
            DomainEvent::StockCommitted(e) => &e.sku,
            _ => return,
        };
        let level = self.skus.get(sku).copied().unwrap_or_default();
        let next = projector::stock_levels::apply(level, &env.event);
        if next.on_hand < 0 || next.reserved < 0 {
            self.report.problems.push((
                format!("sku {sku}"),
                format!("oversold at position {}: on_hand {}, reserved {}", env.global_position, next.on_hand, next.reserved),
            ));
        }
        self.skus.insert(sku.clone(), next);
    }

    pub fn finish(mut self, now: DateTime<Utc>, rows: &[OrderStatusRow], stock: &[(String, i64, i64)]) -> Report {
        let orders = std::mem::take(&mut self.orders);
        for (order_id, facts) in &orders {
            if facts.order.order_id().is_none() {
                continue; // only refusals for an order that was never placed
            }
            for problem in judge(facts, now) {
                self.report.problems.push((order_id.to_string(), problem));
            }
        }
        self.compare_read_models(rows, stock);
        self.report.orders = orders.values().filter(|f| f.order.order_id().is_some()).count();
        self.report.skus = self.skus.len();
        self.report
    }

    fn compare_read_models(&mut self, rows: &[OrderStatusRow], stock: &[(String, i64, i64)]) {
        let actual: BTreeMap<uuid::Uuid, &OrderStatusRow> = rows.iter().map(|r| (r.order_id, r)).collect();
        for (id, expected) in &self.expected_rows {
            match actual.get(id) {
                Some(row) if *row == expected => {}
                Some(row) => self.report.problems.push((
                    id.to_string(),
                    format!("order_status differs from the log: has {}/{:?}, log says {}/{:?}", row.status, row.cancel_reason, expected.status, expected.cancel_reason),
                )),
                None => self.report.problems.push((id.to_string(), "missing from order_status".into())),
            }
        }
        for id in actual.keys().filter(|id| !self.expected_rows.contains_key(id)) {
            self.report.problems.push((id.to_string(), "in order_status but not in the log".into()));
        }
        for (sku, on_hand, reserved) in stock {
            let expected = self.skus.get(sku).copied().unwrap_or_default();
            if (expected.on_hand, expected.reserved) != (*on_hand, *reserved) {
                self.report.problems.push((
                    format!("sku {sku}"),
                    format!("stock_levels has {on_hand}/{reserved}, the log says {}/{}", expected.on_hand, expected.reserved),
                ));
            }
        }
    }
}

fn observe_order(facts: &mut OrderFacts, env: &EventEnvelope) {
    facts.order.apply(&env.event);
    facts.payment.apply(&env.event);
    match &env.event {
        DomainEvent::OrderPlaced(_) => facts.placed_at = Some(env.recorded_at),
        DomainEvent::StockReserved(e) => *facts.held.entry(e.line).or_default() += e.quantity,
        DomainEvent::StockReleased(e) => *facts.held.entry(e.line).or_default() -= e.quantity,
        DomainEvent::StockCommitted(e) => {
            *facts.held.entry(e.line).or_default() -= e.quantity;
            *facts.committed.entry(e.line).or_default() += e.quantity;
        }
        DomainEvent::ShipmentShipped(e) => facts.deliver_at = Some(e.deliver_at),
        DomainEvent::ShipmentDelivered(_) => facts.delivered = true,
        _ => {}
    }
}

/// The problems of one order, judged from its facts.
fn judge(facts: &OrderFacts, now: DateTime<Utc>) -> Vec<String> {
    let mut problems = Vec::new();
    let held: i64 = facts.held.values().sum();
    let net_money = facts.payment.captured_cents.unwrap_or(0) - facts.payment.refunded_cents;
    let items = facts.order.placed.as_ref().map(|p| p.items.as_slice()).unwrap_or_default();
    match facts.order.status {
        OrderStatus::Cancelled | OrderStatus::Rejected => {
            if held != 0 {
                problems.push(format!("ended {} with {held} units still reserved", facts.order.status.as_str()));
            }
            if net_money != 0 {
                problems.push(format!("ended {} with {net_money} cents captured net of refunds", facts.order.status.as_str()));
            }
        }
        OrderStatus::Confirmed | OrderStatus::Shipped | OrderStatus::Completed => {
            let total = facts.order.placed.as_ref().map_or(0, |p| p.total_cents);
            if net_money != total {
                problems.push(format!("{} with {net_money} cents captured, total is {total}", facts.order.status.as_str()));
            }
            for (line, item) in items.iter().enumerate() {
                let line = u32::try_from(line).unwrap_or(u32::MAX);
                let have = facts.held.get(&line).copied().unwrap_or(0) + facts.committed.get(&line).copied().unwrap_or(0);
                if have != item.quantity {
                    problems.push(format!("line {line} ({}) has {have} units reserved or shipped, wants {}", item.sku, item.quantity));
                }
            }
        }
        _ => {}
    }
    if let Some(stuck) = stuck(facts, now) {
        problems.push(stuck);
    }
    problems
}

/// Whether the order waits longer than its timers allow.
fn stuck(facts: &OrderFacts, now: DateTime<Utc>) -> Option<String> {
    let late = |due: DateTime<Utc>| now > due + STUCK_GRACE;
    match facts.order.status {
        OrderStatus::UnderReview => facts
            .order
            .review_expires_at
            .filter(|due| late(*due))
            .map(|due| format!("under review past its expiry at {due}")),
        OrderStatus::Accepted => match &facts.payment.requested {
            Some(r) if late(r.expires_at) => Some(format!("pending past its payment timeout at {}", r.expires_at)),
            None => facts
                .placed_at
                .filter(|placed| now > *placed + STUCK_GRACE * 4)
                .map(|placed| format!("pending since {placed} without a payment request")),
            _ => None,
        },
        OrderStatus::Shipped if !facts.delivered => facts
            .deliver_at
            .filter(|due| late(*due))
            .map(|due| format!("shipped but not delivered past {due}")),
        _ => None,
    }
}
