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
        writeln!(
            f,
            "audited {} events: {} orders, {} SKUs",
            self.events, self.orders, self.skus
        )?;
        if self.is_clean() {
            return writeln!(
                f,
                "OK: stock and money conserved, no order stuck, read models match the log"
            );
        }
        for (who, problem) in &self.problems {
            writeln!(f, "FAIL {who}: {problem}")?;
        }
        writeln!(
            f,
            "{} problems; offending: {}",
            self.problems.len(),
            self.offending().into_iter().collect::<Vec<_>>().join(" ")
        )
    }
}

/// Folds the whole log and checks it.
///
/// The read models are compared as of the projector's checkpoints: rows and checkpoint
/// are read in one snapshot (the projector commits them together), and the expected
/// rows are folded from the events up to that checkpoint, so a projector that is still
/// catching up is not mistaken for a wrong one.
pub async fn audit(store: &EventStore) -> Result<Report, ServiceError> {
    let snapshot = read_models_snapshot(store).await?;
    let mut auditor = Auditor::default()
        .comparing_read_models_at(snapshot.order_status_at, snapshot.stock_levels_at);
    let mut after = LogPosition::START;
    loop {
        let page = store.read_all(after, 5_000).await?;
        let Some(last) = page.last().map(|r| r.log_position()) else {
            break;
        };
        for rec in &page {
            match projector::to_envelope(rec) {
                Ok(env) => auditor.observe_at(&env, rec.log_position()),
                Err(e) => auditor
                    .report
                    .problems
                    .push((rec.stream_name.clone(), format!("undecodable event: {e}"))),
            }
        }
        after = last;
    }
    // Read after the log: every gateway move precedes its event, so only moves still in
    // flight can differ, and those concern orders not yet settled (skipped).
    if let Some(ledger) = gateway_ledger(store).await? {
        auditor = auditor.reconciling_with_gateway(ledger);
    }
    Ok(auditor.finish(Utc::now(), &snapshot.rows, &snapshot.stock))
}

/// The built-in gateway simulator's ledger, net per order (`capture-<id>`,
/// `refund-<id>` keys); `None` when there is none to reconcile with.
async fn gateway_ledger(
    store: &EventStore,
) -> Result<Option<BTreeMap<uuid::Uuid, i64>>, ServiceError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('gateway_ledger') IS NOT NULL")
        .fetch_one(store.pool())
        .await?;
    if !exists {
        return Ok(None);
    }
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT idempotency_key, amount_cents FROM gateway_ledger")
            .fetch_all(store.pool())
            .await?;
    let mut net = BTreeMap::new();
    for (key, amount) in rows {
        let order = key
            .split_once('-')
            .and_then(|(_, id)| uuid::Uuid::parse_str(id).ok());
        if let Some(order_id) = order {
            *net.entry(order_id).or_insert(0) += amount;
        }
    }
    Ok(Some(net))
}

/// The read models and the positions they reflect, from one snapshot.
struct ReadModels {
    rows: Vec<OrderStatusRow>,
    stock: Vec<(String, i64, i64)>,
    order_status_at: LogPosition,
    stock_levels_at: LogPosition,
}

async fn read_models_snapshot(store: &EventStore) -> Result<ReadModels, ServiceError> {
    let mut tx = eventstore::begin(store.pool()).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let checkpoint = |name: &'static str| {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT transaction_id, global_position FROM checkpoints WHERE name = $1",
        )
        .bind(name)
    };
    let at = |row: Option<(i64, i64)>| {
        row.map_or(LogPosition::START, |(transaction_id, global_position)| {
            LogPosition {
                transaction_id,
                global_position,
            }
        })
    };
    let order_status_at = at(checkpoint("projection:order_status")
        .fetch_optional(&mut *tx)
        .await?);
    let stock_levels_at = at(checkpoint("projection:stock_levels")
        .fetch_optional(&mut *tx)
        .await?);
    let rows: Vec<OrderStatusRow> = sqlx::query_as(
        "SELECT order_id, customer_id, status, cancel_reason, total_cents, currency, item_count,
                placed_at, updated_at, last_global_position FROM order_status",
    )
    .fetch_all(&mut *tx)
    .await?;
    let stock: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT sku, on_hand, reserved FROM stock_levels")
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(ReadModels {
        rows,
        stock,
        order_status_at,
        stock_levels_at,
    })
}

/// The pure part of the audit: observe events in log order, then judge.
#[derive(Default)]
pub struct Auditor {
    orders: BTreeMap<uuid::Uuid, OrderFacts>,
    /// Every SKU's level over the whole log (for the oversell check).
    skus: BTreeMap<String, projector::stock_levels::Level>,
    /// What the read models should hold, folded up to the positions they reflect.
    expected_rows: BTreeMap<uuid::Uuid, OrderStatusRow>,
    expected_stock: BTreeMap<String, projector::stock_levels::Level>,
    order_status_at: Option<LogPosition>,
    stock_levels_at: Option<LogPosition>,
    /// Net money the gateway moved per order (captures − refunds), when known.
    gateway: Option<BTreeMap<uuid::Uuid, i64>>,
    report: Report,
}

impl Auditor {
    /// Also reconcile with the gateway's own ledger: money it moved for an order that
    /// the log does not know of (a capture never recorded) is a problem too.
    pub fn reconciling_with_gateway(mut self, net_by_order: BTreeMap<uuid::Uuid, i64>) -> Self {
        self.gateway = Some(net_by_order);
        self
    }

    /// Compare the read models as of these positions (their projections' checkpoints)
    /// rather than the end of the log.
    pub fn comparing_read_models_at(
        mut self,
        order_status: LogPosition,
        stock_levels: LogPosition,
    ) -> Self {
        self.order_status_at = Some(order_status);
        self.stock_levels_at = Some(stock_levels);
        self
    }

    /// Observes the next event of the log (read models compared at the end of the log).
    pub fn observe(&mut self, env: &EventEnvelope) {
        self.observe_event(env, None);
    }

    /// Observes the next event of the log, at its position.
    pub fn observe_at(&mut self, env: &EventEnvelope, position: LogPosition) {
        self.observe_event(env, Some(position));
    }

    fn observe_event(&mut self, env: &EventEnvelope, position: Option<LogPosition>) {
        let reflected = |limit: Option<LogPosition>| match (limit, position) {
            (Some(limit), Some(position)) => position <= limit,
            _ => true,
        };
        self.report.events += 1;
        self.check_stock(env);
        if reflected(self.stock_levels_at) {
            if let Some(sku) = stock_sku(&env.event) {
                let level = self.expected_stock.get(sku).copied().unwrap_or_default();
                let next = projector::stock_levels::apply(level, &env.event);
                self.expected_stock.insert(sku.to_owned(), next);
            }
        }
        if let Some(order_id) = env.event.order_id() {
            if reflected(self.order_status_at) {
                if let Some(row) = order_status::apply(self.expected_rows.get(&order_id), env) {
                    self.expected_rows.insert(order_id, row);
                }
            }
            let facts = self.orders.entry(order_id).or_default();
            observe_order(facts, env);
        }
    }

    fn check_stock(&mut self, env: &EventEnvelope) {
        let Some(sku) = stock_sku(&env.event) else {
            return;
        };
        let level = self.skus.get(sku).copied().unwrap_or_default();
        let next = projector::stock_levels::apply(level, &env.event);
        if next.on_hand < 0 || next.reserved < 0 {
            self.report.problems.push((
                format!("sku {sku}"),
                format!(
                    "oversold at position {}: on_hand {}, reserved {}",
                    env.global_position, next.on_hand, next.reserved
                ),
            ));
        }
        self.skus.insert(sku.to_owned(), next);
    }

    pub fn finish(
        mut self,
        now: DateTime<Utc>,
        rows: &[OrderStatusRow],
        stock: &[(String, i64, i64)],
    ) -> Report {
        let orders = std::mem::take(&mut self.orders);
        for (order_id, facts) in &orders {
            if facts.order.order_id().is_none() {
                continue; // only refusals for an order that was never placed
            }
            for problem in judge(facts, now) {
                self.report.problems.push((order_id.to_string(), problem));
            }
            let settled = matches!(
                facts.order.status,
                OrderStatus::Cancelled | OrderStatus::Rejected | OrderStatus::Completed
            ) || facts.delivered;
            if let (Some(gateway), true) = (&self.gateway, settled) {
                let logged =
                    facts.payment.captured_cents.unwrap_or(0) - facts.payment.refunded_cents;
                let moved = gateway.get(order_id).copied().unwrap_or(0);
                if moved != logged {
                    self.report.problems.push((
                        order_id.to_string(),
                        format!("the gateway holds {moved} cents for it, the log says {logged}"),
                    ));
                }
            }
        }
        self.compare_read_models(rows, stock);
        self.report.orders = orders
            .values()
            .filter(|f| f.order.order_id().is_some())
            .count();
        self.report.skus = self.skus.len();
        self.report
    }

    fn compare_read_models(&mut self, rows: &[OrderStatusRow], stock: &[(String, i64, i64)]) {
        let actual: BTreeMap<uuid::Uuid, &OrderStatusRow> =
            rows.iter().map(|r| (r.order_id, r)).collect();
        for (id, expected) in &self.expected_rows {
            match actual.get(id) {
                Some(row) if *row == expected => {}
                Some(row) => self.report.problems.push((
                    id.to_string(),
                    format!(
                        "order_status differs from the log: has {}/{:?}, log says {}/{:?}",
                        row.status, row.cancel_reason, expected.status, expected.cancel_reason
                    ),
                )),
                None => self
                    .report
                    .problems
                    .push((id.to_string(), "missing from order_status".into())),
            }
        }
        for id in actual
            .keys()
            .filter(|id| !self.expected_rows.contains_key(id))
        {
            self.report
                .problems
                .push((id.to_string(), "in order_status but not in the log".into()));
        }
        for (sku, on_hand, reserved) in stock {
            let expected = self.expected_stock.get(sku).copied().unwrap_or_default();
            if (expected.on_hand, expected.reserved) != (*on_hand, *reserved) {
                self.report.problems.push((
                    format!("sku {sku}"),
                    format!(
                        "stock_levels has {on_hand}/{reserved}, the log says {}/{}",
                        expected.on_hand, expected.reserved
                    ),
                ));
            }
        }
        let listed: BTreeSet<&str> = stock.iter().map(|(sku, _, _)| sku.as_str()).collect();
        for sku in self
            .expected_stock
            .keys()
            .filter(|sku| !listed.contains(sku.as_str()))
        {
            self.report
                .problems
                .push((format!("sku {sku}"), "missing from stock_levels".into()));
        }
    }
}

/// The SKU whose level an event changes, if any.
fn stock_sku(event: &DomainEvent) -> Option<&str> {
    match event {
        DomainEvent::StockSet(e) => Some(&e.sku),
        DomainEvent::StockReserved(e) => Some(&e.sku),
        DomainEvent::StockReleased(e) => Some(&e.sku),
        DomainEvent::StockCommitted(e) => Some(&e.sku),
        _ => None,
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
    let items = facts
        .order
        .placed
        .as_ref()
        .map(|p| p.items.as_slice())
        .unwrap_or_default();
    match facts.order.status {
        OrderStatus::Cancelled | OrderStatus::Rejected => {
            if held != 0 {
                problems.push(format!(
                    "ended {} with {held} units still reserved",
                    facts.order.status.as_str()
                ));
            }
            if net_money != 0 {
                problems.push(format!(
                    "ended {} with {net_money} cents captured net of refunds",
                    facts.order.status.as_str()
                ));
            }
        }
        OrderStatus::Confirmed | OrderStatus::Shipped | OrderStatus::Completed => {
            let total = facts.order.placed.as_ref().map_or(0, |p| p.total_cents);
            if net_money != total {
                problems.push(format!(
                    "{} with {net_money} cents captured, total is {total}",
                    facts.order.status.as_str()
                ));
            }
            for (line, item) in items.iter().enumerate() {
                let line = u32::try_from(line).unwrap_or(u32::MAX);
                let have = facts.held.get(&line).copied().unwrap_or(0)
                    + facts.committed.get(&line).copied().unwrap_or(0);
                if have != item.quantity {
                    problems.push(format!(
                        "line {line} ({}) has {have} units reserved or shipped, wants {}",
                        item.sku, item.quantity
                    ));
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
            Some(r) if late(r.expires_at) => Some(format!(
                "pending past its payment timeout at {}",
                r.expires_at
            )),
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
