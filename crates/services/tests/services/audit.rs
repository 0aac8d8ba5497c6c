use chrono::{DateTime, Duration, Utc};
use domain::events::*;
use domain::{streams, DomainEvent, EventEnvelope};
use projector::order_status::{self, OrderStatusRow};
use projector::stock_levels::{self, Level};
use services::audit::{audit, Auditor, Report, STUCK_GRACE};
use std::collections::BTreeMap;
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

/// A log built in memory, in order, with the read models a correct projector makes.
struct Log {
    events: Vec<EventEnvelope>,
    start: DateTime<Utc>,
}

impl Log {
    fn new() -> Self {
        Log {
            events: Vec::new(),
            start: Utc::now() - Duration::minutes(10),
        }
    }

    fn push(&mut self, stream: &str, event: DomainEvent) -> &mut Self {
        let position = i64::try_from(self.events.len()).unwrap_or(0) + 1;
        self.events.push(EventEnvelope {
            event_id: Uuid::new_v4(),
            stream_name: stream.to_owned(),
            stream_version: 0,
            global_position: position,
            recorded_at: self.start + Duration::milliseconds(position),
            correlation_id: Uuid::nil(),
            causation_id: Uuid::nil(),
            event,
        });
        self
    }

    fn rows(&self) -> Vec<OrderStatusRow> {
        let mut rows: BTreeMap<Uuid, OrderStatusRow> = BTreeMap::new();
        for env in &self.events {
            if let Some(id) = env.event.order_id() {
                if let Some(row) = order_status::apply(rows.get(&id), env) {
                    rows.insert(id, row);
                }
            }
        }
        rows.into_values().collect()
    }

    fn stock(&self) -> Vec<(String, i64, i64)> {
        let mut levels: BTreeMap<String, Level> = BTreeMap::new();
        for env in &self.events {
            let sku = match &env.event {
                DomainEvent::StockSet(e) => &e.sku,
                DomainEvent::StockReserved(e) => &e.sku,
                DomainEvent::StockReleased(e) => &e.sku,
                DomainEvent::StockCommitted(e) => &e.sku,
                _ => continue,
            };
            let level = levels.get(sku).copied().unwrap_or_default();
            levels.insert(sku.clone(), stock_levels::apply(level, &env.event));
        }
        levels
            .into_iter()
            .map(|(sku, l)| (sku, l.on_hand, l.reserved))
            .collect()
    }

    fn audit_with(&self, now: DateTime<Utc>, rows: &[OrderStatusRow]) -> Report {
        let mut auditor = Auditor::default();
        for env in &self.events {
            auditor.observe(env);
        }
        auditor.finish(now, rows, &self.stock())
    }

    fn audit(&self) -> Report {
        self.audit_with(Utc::now(), &self.rows())
    }
}

/// An order of 2 × A at 500, placed and accepted.
fn placed(log: &mut Log) -> Uuid {
    let order_id = Uuid::new_v4();
    let events =
        placement(order_id, "tok_ok", &[line("A", 2, 500)], true, Utc::now()).unwrap_or_default();
    assert_eq!(events.len(), 2, "placement builds");
    for event in events {
        log.push(&streams::order(order_id), event);
    }
    order_id
}

fn reserved(log: &mut Log, order_id: Uuid) {
    log.push(
        &streams::stock("A"),
        DomainEvent::StockReserved(StockReserved {
            sku: "A".into(),
            order_id,
            line: 0,
            quantity: 2,
        }),
    )
    .push(
        &streams::order(order_id),
        DomainEvent::OrderLineReserved(OrderLineReserved {
            order_id,
            line: 0,
            sku: "A".into(),
            quantity: 2,
        }),
    );
}

fn paid(log: &mut Log, order_id: Uuid, amount_cents: i64) {
    let payment = streams::payment(order_id);
    log.push(
        &payment,
        DomainEvent::PaymentRequested(PaymentRequested {
            order_id,
            amount_cents: 1_000,
            currency: "EUR".into(),
            payment_token: "tok_ok".into(),
            expires_at: Utc::now() + Duration::seconds(30),
        }),
    )
    .push(
        &payment,
        DomainEvent::PaymentCaptured(PaymentCaptured {
            order_id,
            amount_cents,
            gateway_reference: "sim".into(),
            unwanted: false,
        }),
    )
    .push(
        &streams::order(order_id),
        DomainEvent::OrderPaymentCaptured(OrderPaymentCaptured {
            order_id,
            amount_cents,
        }),
    );
}

fn confirmed(log: &mut Log, order_id: Uuid) {
    log.push(
        &streams::order(order_id),
        DomainEvent::OrderConfirmed(OrderConfirmed {
            order_id,
            items: vec![],
            shipping: None,
            delivery_delay_ms: 0,
        }),
    );
}

fn cancelled(log: &mut Log, order_id: Uuid) {
    log.push(
        &streams::order(order_id),
        DomainEvent::OrderCancelled(OrderCancelled {
            order_id,
            reason: CancelReason::CustomerCancelled,
            detail: String::new(),
            by: None,
        }),
    );
}

fn released(log: &mut Log, order_id: Uuid) {
    log.push(
        &streams::stock("A"),
        DomainEvent::StockReleased(StockReleased {
            sku: "A".into(),
            order_id,
            line: 0,
            quantity: 2,
        }),
    );
}

fn refunded(log: &mut Log, order_id: Uuid) {
    let payment = streams::payment(order_id);
    log.push(
        &payment,
        DomainEvent::PaymentVoided(PaymentVoided { order_id }),
    )
    .push(
        &payment,
        DomainEvent::PaymentRefunded(PaymentRefunded {
            order_id,
            amount_cents: 1_000,
            gateway_reference: "sim-r".into(),
        }),
    );
}

fn stocked() -> Log {
    let mut log = Log::new();
    log.push(
        &streams::stock("A"),
        DomainEvent::StockSet(StockSet {
            sku: "A".into(),
            quantity: 10,
        }),
    );
    log
}

fn problems_of(report: &Report, who: &str) -> Vec<String> {
    report
        .problems
        .iter()
        .filter(|(w, _)| w == who)
        .map(|(_, p)| p.clone())
        .collect()
}

#[test]
fn a_clean_log_passes() {
    let mut log = stocked();
    let kept = placed(&mut log);
    reserved(&mut log, kept);
    paid(&mut log, kept, 1_000);
    confirmed(&mut log, kept);
    let undone = placed(&mut log);
    reserved(&mut log, undone);
    paid(&mut log, undone, 1_000);
    cancelled(&mut log, undone);
    released(&mut log, undone);
    refunded(&mut log, undone);

    let report = log.audit();
    assert!(report.is_clean(), "{report}");
    assert_eq!((report.orders, report.skus), (2, 1));
    assert_eq!(report.events, u64::try_from(log.events.len()).unwrap_or(0));
}

#[test]
fn a_cancelled_order_whose_reservation_was_never_released_fails_naming_it() {
    let mut log = stocked();
    let order_id = placed(&mut log);
    reserved(&mut log, order_id);
    cancelled(&mut log, order_id);

    let report = log.audit();
    assert!(!report.is_clean());
    let id = order_id.to_string();
    assert!(report.offending().contains(id.as_str()), "{report}");
    let problems = problems_of(&report, &id);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("2 units still reserved")),
        "{problems:?}"
    );
}

#[test]
fn a_cancelled_order_with_money_kept_fails_naming_it() {
    let mut log = stocked();
    let order_id = placed(&mut log);
    paid(&mut log, order_id, 1_000);
    cancelled(&mut log, order_id);

    let report = log.audit();
    let problems = problems_of(&report, &order_id.to_string());
    assert!(
        problems.iter().any(|p| p.contains("1000 cents captured")),
        "{report}"
    );
}

#[test]
fn a_confirmed_order_with_the_wrong_amount_captured_fails_naming_it() {
    let mut log = stocked();
    let order_id = placed(&mut log);
    reserved(&mut log, order_id);
    paid(&mut log, order_id, 2_000);
    confirmed(&mut log, order_id);

    let report = log.audit();
    let problems = problems_of(&report, &order_id.to_string());
    assert!(
        problems
            .iter()
            .any(|p| p.contains("2000 cents captured, total is 1000")),
        "{report}"
    );
}

#[test]
fn a_confirmed_order_missing_a_reservation_fails_naming_it() {
    let mut log = stocked();
    let order_id = placed(&mut log);
    paid(&mut log, order_id, 1_000);
    confirmed(&mut log, order_id);

    let report = log.audit();
    let problems = problems_of(&report, &order_id.to_string());
    assert!(problems.iter().any(|p| p.contains("line 0")), "{report}");
}

#[test]
fn a_read_model_row_that_differs_from_the_log_is_reported() {
    let mut log = stocked();
    let order_id = placed(&mut log);
    let mut rows = log.rows();
    rows[0].status = "confirmed".into();
    let report = log.audit_with(Utc::now(), &rows);
    let problems = problems_of(&report, &order_id.to_string());
    assert!(
        problems.iter().any(|p| p.contains("differs from the log")),
        "{report}"
    );

    let report = log.audit_with(Utc::now(), &[]);
    assert!(
        problems_of(&report, &order_id.to_string())
            .iter()
            .any(|p| p.contains("missing")),
        "{report}"
    );
}

#[test]
fn an_order_under_review_past_its_expiry_and_grace_is_stuck() {
    let mut log = stocked();
    let order_id = Uuid::new_v4();
    let order = streams::order(order_id);
    let expires_at = Utc::now();
    for event in placement(
        order_id,
        "tok_ok",
        &[line("A", 1, 250_000)],
        true,
        expires_at,
    )
    .unwrap_or_default()
    {
        log.push(&order, event);
    }
    assert_eq!(
        log.events.last().map(|e| e.event.event_type()),
        Some("OrderSentForReview")
    );
    let rows = log.rows();
    let id = order_id.to_string();

    let within_grace = log.audit_with(expires_at + STUCK_GRACE, &rows);
    assert!(within_grace.is_clean(), "{within_grace}");
    let late = log.audit_with(expires_at + STUCK_GRACE + Duration::seconds(1), &rows);
    assert!(
        problems_of(&late, &id)
            .iter()
            .any(|p| p.contains("under review past its expiry")),
        "{late}"
    );
}

#[tokio::test]
async fn audit_of_a_projected_database_passes_then_reports_a_corrupted_row() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    append(
        store,
        &streams::stock("A"),
        &[DomainEvent::StockSet(StockSet {
            sku: "A".into(),
            quantity: 10,
        })],
    )
    .await?;
    let (order_id, _) = place(store, "tok_ok", vec![line("A", 2, 500)]).await?;
    catch_up_all(store).await?;

    let report = audit(store).await?;
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.orders, 1);

    sqlx::query("UPDATE order_status SET status = 'delivered' WHERE order_id = $1")
        .bind(order_id)
        .execute(db.pool())
        .await?;
    let report = audit(store).await?;
    let id = order_id.to_string();
    assert!(report.offending().contains(id.as_str()), "{report}");
    assert!(
        report.to_string().contains(&format!("FAIL {id}")),
        "{report}"
    );

    sqlx::query("UPDATE stock_levels SET on_hand = 3 WHERE sku = 'A'")
        .execute(db.pool())
        .await?;
    let report = audit(store).await?;
    assert!(report.offending().contains("sku A"), "{report}");
    Ok(())
}

#[tokio::test]
async fn audit_reports_an_order_stuck_in_review_in_the_database() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // the review expired more than the grace ago
    let (order_id, _) = place_expiring(
        &db.store,
        "tok_ok",
        vec![line("A", 1, 500_000)],
        Utc::now() - STUCK_GRACE - Duration::minutes(1),
    )
    .await?;
    assert_eq!(
        types(&db.store, &streams::order(order_id)).await?,
        ["OrderPlaced", "OrderSentForReview"]
    );
    catch_up_all(&db.store).await?;
    let report = audit(&db.store).await?;
    let id = order_id.to_string();
    assert!(
        problems_of(&report, &id)
            .iter()
            .any(|p| p.contains("under review past its expiry")),
        "{report}"
    );
    Ok(())
}

#[test]
fn money_the_gateway_moved_that_the_log_does_not_know_fails_naming_the_order() {
    let mut log = stocked();
    let order_id = placed(&mut log);
    cancelled(&mut log, order_id);
    let mut auditor = Auditor::default();
    for env in &log.events {
        auditor.observe(env);
    }
    // The gateway captured 1000 for the order (a worker died before recording it).
    let report = auditor
        .reconciling_with_gateway([(order_id, 1_000)].into_iter().collect())
        .finish(Utc::now(), &log.rows(), &log.stock());
    let problems = problems_of(&report, &order_id.to_string());
    assert!(
        problems
            .iter()
            .any(|p| p.contains("the gateway holds 1000 cents")),
        "{report}"
    );
}
