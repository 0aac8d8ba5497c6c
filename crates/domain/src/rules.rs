//! Business rules: what makes an order valid, and the step plan an order follows.
//!
//! The rules are configuration (see the contract's settings table); the plan they
//! produce is recorded in `OrderPlaced`, so an order in flight keeps its plan even if
//! the rules change.
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::commands::{OrderLine, PlaceOrder, ShippingMethod};
use crate::events::{OrderPlaced, WorkflowPlan};
use crate::Cents;

/// The workflow version new orders start under unless configured otherwise.
pub const WORKFLOW_VERSION: u32 = 1;

/// Every workflow version `order.rs` can run. An order records its version in its plan
/// and finishes under it; a version is never removed while orders may be in flight.
///
/// - 1: review iff the total is at or above the review threshold; no checks.
/// - 2: as 1, plus the configured checks (today: [`FRAUD_VELOCITY`]), run when the
///   order is placed; a check that trips sends the order to review.
pub const WORKFLOW_VERSIONS: [u32; 2] = [1, 2];

/// The fraud check "too many orders of one customer in the last minute" (workflow 2,
/// when `fraud_max_orders_per_minute` is configured). Its name is recorded in
/// `WorkflowPlan::checks` and in `OrderSentForReview::rule`.
pub const FRAUD_VELOCITY: &str = "fraud_velocity";

/// Facts about the world the shell gathers before a placement is decided (the
/// domain does no IO). Only what the order's plan needs is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlacementFacts {
    /// Orders the same customer placed in the minute before this one (this one not
    /// counted). Needed only when [`Rules::needs_recent_orders`].
    pub recent_orders: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The shop's currency; orders in any other currency are invalid.
    pub currency: String,
    /// Orders whose total is at or above this wait for a human review.
    pub review_threshold_cents: Cents,
    pub review_timeout: Duration,
    /// Counted from the payment request.
    pub payment_timeout: Duration,
    /// Simulated carrier, shipped → delivered, standard shipping.
    pub delivery_delay: Duration,
    /// The same, express shipping.
    pub express_delivery_delay: Duration,
    /// The workflow version new orders start under (one of [`WORKFLOW_VERSIONS`]);
    /// orders in flight keep the version recorded in their plan.
    pub workflow_version: u32,
    /// Fraud rule (workflow 2 and later): an order whose customer placed more than
    /// this many orders within the last minute (this one included) goes to review.
    /// `None`: off, as the contract says of rules it does not list.
    pub fraud_max_orders_per_minute: Option<u32>,
    /// Express eligibility: an express order of more units than this is carried with
    /// the standard delivery delay. `None`: every express order is express.
    pub express_max_units: Option<u32>,
}

impl Default for Rules {
    /// The contract's defaults.
    fn default() -> Self {
        Rules {
            currency: "EUR".to_owned(),
            review_threshold_cents: 100_000,
            review_timeout: Duration::from_secs(24 * 60 * 60),
            payment_timeout: Duration::from_secs(30),
            delivery_delay: Duration::from_secs(2),
            express_delivery_delay: Duration::from_millis(500),
            workflow_version: WORKFLOW_VERSION,
            fraud_max_orders_per_minute: None,
            express_max_units: None,
        }
    }
}

/// Why an order waits for a human decision; recorded in `OrderSentForReview`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewCause {
    /// `review_threshold` or the name of the check that tripped.
    pub rule: &'static str,
    pub detail: String,
}

/// The rule name of the amount review, as `OrderSentForReview::rule` records it.
pub const REVIEW_THRESHOLD: &str = "review_threshold";

impl Rules {
    /// The checks a plan of this workflow version runs, from the configured rules.
    pub fn checks(&self) -> Vec<String> {
        let mut checks = Vec::new();
        if self.workflow_version >= 2 && self.fraud_max_orders_per_minute.is_some() {
            checks.push(FRAUD_VELOCITY.to_owned());
        }
        checks
    }

    /// Whether placing an order under these rules needs the customer's recent
    /// orders counted ([`PlacementFacts::recent_orders`]): the shell asks the log only
    /// then.
    pub fn needs_recent_orders(&self) -> bool {
        self.checks().iter().any(|c| c == FRAUD_VELOCITY)
    }

    /// Why a valid order with this plan waits for review, if it does: the amount
    /// first, then the plan's checks in their order. Runs once, at placement; later
    /// steps follow the recorded outcome and never read the rules again.
    pub fn review_cause(
        &self,
        placed: &OrderPlaced,
        facts: &PlacementFacts,
    ) -> Option<ReviewCause> {
        if placed.plan.review {
            return Some(ReviewCause {
                rule: REVIEW_THRESHOLD,
                detail: format!(
                    "total {} is at or above the review threshold {}",
                    placed.total_cents, self.review_threshold_cents
                ),
            });
        }
        for check in &placed.plan.checks {
            if check == FRAUD_VELOCITY {
                let max = self.fraud_max_orders_per_minute.unwrap_or(u32::MAX);
                let orders = facts.recent_orders.saturating_add(1);
                if orders > max {
                    return Some(ReviewCause {
                        rule: FRAUD_VELOCITY,
                        detail: format!(
                            "customer '{}' placed {orders} orders within a minute (at most {max} pass without review)",
                            placed.customer_id
                        ),
                    });
                }
            }
        }
        None
    }

    /// The steps this order will take: review iff its total is at or above the
    /// threshold (an overflowing total counts as above); shipping iff it has a
    /// shipping address; the delivery delay of its shipping method; the checks of the
    /// configured workflow version.
    pub fn plan_for(&self, cmd: &PlaceOrder) -> WorkflowPlan {
        let total = order_total(&cmd.items).unwrap_or(Cents::MAX);
        let delivery_delay = match cmd.shipping.as_ref().map(|s| s.method) {
            Some(ShippingMethod::Express) if self.express_eligible(cmd) => {
                self.express_delivery_delay
            }
            Some(ShippingMethod::Express | ShippingMethod::Standard) | None => self.delivery_delay,
        };
        WorkflowPlan {
            workflow_version: self.workflow_version,
            review: total >= self.review_threshold_cents,
            ship: cmd.shipping.is_some(),
            review_timeout_ms: millis(self.review_timeout),
            payment_timeout_ms: millis(self.payment_timeout),
            delivery_delay_ms: millis(delivery_delay),
            checks: self.checks(),
        }
    }

    /// Whether the order may travel express (see [`Rules::express_max_units`]).
    pub fn express_eligible(&self, cmd: &PlaceOrder) -> bool {
        match self.express_max_units {
            Some(max) => item_count(&cmd.items).is_some_and(|units| units <= i64::from(max)),
            None => true,
        }
    }

    /// Checks an `order.place` against the contract's rules. `Err` holds a
    /// human-readable description of every problem found, separated by `; `.
    pub fn validate(
        &self,
        cmd: &PlaceOrder,
        is_known_sku: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let mut problems = Vec::new();
        if cmd.items.is_empty() {
            problems.push("the order has no items".to_owned());
        }
        if cmd.currency != self.currency {
            problems.push(format!(
                "currency '{}' is not the shop's currency '{}'",
                cmd.currency, self.currency
            ));
        }
        for (index, line) in cmd.items.iter().enumerate() {
            problems.extend(line_problems(index, line, &is_known_sku));
        }
        if order_total(&cmd.items).is_none() || item_count(&cmd.items).is_none() {
            problems.push("the order total is too large".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

fn line_problems(
    index: usize,
    line: &OrderLine,
    is_known_sku: &impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if line.quantity < 1 {
        problems.push(format!(
            "line {index} ({}): quantity {} is below 1",
            line.sku, line.quantity
        ));
    }
    if line.unit_price_cents < 0 {
        problems.push(format!(
            "line {index} ({}): unit price {} is negative",
            line.sku, line.unit_price_cents
        ));
    }
    if !is_known_sku(&line.sku) {
        problems.push(format!("line {index}: unknown SKU '{}'", line.sku));
    }
    problems
}

/// Sum of quantity × unit price over the lines; `None` on overflow.
pub fn order_total(items: &[OrderLine]) -> Option<Cents> {
    items.iter().try_fold(0, |sum: Cents, line| {
        line.quantity
            .checked_mul(line.unit_price_cents)
            .and_then(|amount| sum.checked_add(amount))
    })
}

/// Sum of the lines' quantities (the read model's `item_count`); `None` on overflow.
pub fn item_count(items: &[OrderLine]) -> Option<i64> {
    items
        .iter()
        .try_fold(0, |sum: i64, line| sum.checked_add(line.quantity))
}

/// A duration in whole milliseconds, saturating.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `now` plus `ms` milliseconds, saturating at the latest representable instant.
pub fn after(now: DateTime<Utc>, ms: u64) -> DateTime<Utc> {
    i64::try_from(ms)
        .ok()
        .and_then(TimeDelta::try_milliseconds)
        .and_then(|delta| now.checked_add_signed(delta))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Shipping;
    use uuid::Uuid;

    fn line(sku: &str, quantity: i64, unit_price_cents: Cents) -> OrderLine {
        OrderLine {
            sku: sku.into(),
            quantity,
            unit_price_cents,
        }
    }

    fn place(items: Vec<OrderLine>, shipping: Option<ShippingMethod>) -> PlaceOrder {
        PlaceOrder {
            order_id: Uuid::from_u128(1),
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            items,
            payment_token: "tok_ok".into(),
            shipping: shipping.map(|method| Shipping {
                method,
                address: "1 Main St".into(),
            }),
        }
    }

    fn known(sku: &str) -> bool {
        sku == "A" || sku == "B"
    }

    #[test]
    fn defaults_are_the_contract_defaults() {
        let rules = Rules::default();
        assert_eq!(rules.currency, "EUR");
        assert_eq!(rules.review_threshold_cents, 100_000);
        assert_eq!(rules.review_timeout, Duration::from_secs(86_400));
        assert_eq!(rules.payment_timeout, Duration::from_secs(30));
        assert_eq!(rules.delivery_delay, Duration::from_secs(2));
        assert_eq!(rules.express_delivery_delay, Duration::from_millis(500));
        assert_eq!(rules.workflow_version, 1);
    }

    #[test]
    fn totals_and_item_counts_sum_the_lines() {
        let items = [line("A", 2, 500), line("B", 3, 100)];
        assert_eq!(order_total(&items), Some(1_300));
        assert_eq!(item_count(&items), Some(5));
        assert_eq!(order_total(&[]), Some(0));
    }

    #[test]
    fn overflowing_totals_are_none() {
        assert_eq!(order_total(&[line("A", 2, i64::MAX)]), None);
        assert_eq!(
            order_total(&[line("A", 1, i64::MAX), line("B", 1, 1)]),
            None
        );
        assert_eq!(item_count(&[line("A", i64::MAX, 0), line("B", 1, 0)]), None);
    }

    #[test]
    fn orders_at_the_threshold_are_reviewed_and_below_are_not() {
        let rules = Rules::default();
        assert!(
            rules
                .plan_for(&place(vec![line("A", 2, 50_000)], None))
                .review
        );
        assert!(
            !rules
                .plan_for(&place(vec![line("A", 1, 99_999)], None))
                .review
        );
    }

    #[test]
    fn the_plan_ships_only_orders_with_shipping_and_picks_the_method_delay() {
        let rules = Rules::default();
        let digital = rules.plan_for(&place(vec![line("A", 1, 1)], None));
        let standard = rules.plan_for(&place(
            vec![line("A", 1, 1)],
            Some(ShippingMethod::Standard),
        ));
        let express = rules.plan_for(&place(vec![line("A", 1, 1)], Some(ShippingMethod::Express)));
        assert!(!digital.ship);
        assert!(standard.ship && express.ship);
        assert_eq!(standard.delivery_delay_ms, 2_000);
        assert_eq!(express.delivery_delay_ms, 500);
        assert_eq!(standard.payment_timeout_ms, 30_000);
        assert_eq!(standard.review_timeout_ms, 86_400_000);
        assert_eq!(standard.workflow_version, 1);
    }

    #[test]
    fn checks_come_with_workflow_2_and_a_configured_fraud_rule_only() {
        let with = |workflow_version, fraud| Rules {
            workflow_version,
            fraud_max_orders_per_minute: fraud,
            ..Rules::default()
        };
        assert_eq!(with(1, Some(3)).checks(), Vec::<String>::new());
        assert_eq!(with(2, None).checks(), Vec::<String>::new());
        assert_eq!(with(2, Some(3)).checks(), ["fraud_velocity"]);
        assert!(with(2, Some(3)).needs_recent_orders());
        assert!(!with(1, Some(3)).needs_recent_orders());
        assert!(!Rules::default().needs_recent_orders());
        let plan = with(2, Some(3)).plan_for(&place(vec![line("A", 1, 1)], None));
        assert_eq!((plan.workflow_version, plan.checks.len()), (2, 1));
    }

    #[test]
    fn the_fraud_check_trips_above_the_configured_orders_per_minute() {
        let rules = Rules {
            workflow_version: 2,
            fraud_max_orders_per_minute: Some(3),
            ..Rules::default()
        };
        let cmd = place(vec![line("A", 1, 1)], None);
        let placed = OrderPlaced {
            order_id: cmd.order_id,
            customer_id: cmd.customer_id.clone(),
            currency: cmd.currency.clone(),
            items: cmd.items.clone(),
            payment_token: cmd.payment_token.clone(),
            shipping: None,
            total_cents: 1,
            item_count: 1,
            plan: rules.plan_for(&cmd),
        };
        let cause = |recent_orders| rules.review_cause(&placed, &PlacementFacts { recent_orders });
        assert_eq!(cause(2), None, "the third order of the minute passes");
        assert!(matches!(cause(3), Some(c) if c.rule == FRAUD_VELOCITY));
    }

    #[test]
    fn a_well_formed_order_is_valid() {
        let cmd = place(vec![line("A", 1, 0), line("B", 2, 300)], None);
        assert_eq!(Rules::default().validate(&cmd, known), Ok(()));
    }

    #[test]
    fn an_order_without_items_is_invalid() {
        let detail = Rules::default().validate(&place(vec![], None), known);
        assert!(matches!(detail, Err(d) if d.contains("no items")));
    }

    #[test]
    fn quantities_below_one_negative_prices_and_unknown_skus_are_invalid() {
        let rules = Rules::default();
        let zero = rules.validate(&place(vec![line("A", 0, 1)], None), known);
        assert!(matches!(zero, Err(d) if d.contains("quantity 0")));
        let negative = rules.validate(&place(vec![line("A", 1, -1)], None), known);
        assert!(matches!(negative, Err(d) if d.contains("negative")));
        let unknown = rules.validate(&place(vec![line("Z", 1, 1)], None), known);
        assert!(matches!(unknown, Err(d) if d.contains("unknown SKU 'Z'")));
    }

    #[test]
    fn another_currency_than_the_shops_is_invalid() {
        let mut cmd = place(vec![line("A", 1, 1)], None);
        cmd.currency = "USD".into();
        let detail = Rules::default().validate(&cmd, known);
        assert!(matches!(detail, Err(d) if d.contains("USD")));
    }

    #[test]
    fn an_overflowing_total_is_invalid_and_reviewed() {
        let cmd = place(vec![line("A", 3, i64::MAX / 2)], None);
        let rules = Rules::default();
        assert!(matches!(rules.validate(&cmd, known), Err(d) if d.contains("too large")));
        assert!(rules.plan_for(&cmd).review);
    }

    #[test]
    fn after_adds_milliseconds_and_saturates() {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        assert_eq!(after(now, 1_500), now + TimeDelta::milliseconds(1_500));
        assert_eq!(after(now, u64::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(millis(Duration::from_secs(2)), 2_000);
    }
}

#[cfg(test)]
mod express_tests {
    use super::*;
    use crate::commands::{OrderLine, Shipping};

    fn express_order(units: i64) -> PlaceOrder {
        PlaceOrder {
            order_id: uuid::Uuid::nil(),
            customer_id: "c".into(),
            currency: "EUR".into(),
            items: vec![OrderLine {
                sku: "A".into(),
                quantity: units,
                unit_price_cents: 100,
            }],
            payment_token: "tok_ok".into(),
            shipping: Some(Shipping {
                method: ShippingMethod::Express,
                address: "a".into(),
            }),
        }
    }

    #[test]
    fn express_is_for_orders_within_the_configured_units_and_for_all_when_off() {
        let off = Rules::default();
        assert_eq!(off.plan_for(&express_order(50)).delivery_delay_ms, 500);
        let rules = Rules {
            express_max_units: Some(3),
            ..Rules::default()
        };
        assert_eq!(rules.plan_for(&express_order(3)).delivery_delay_ms, 500);
        assert_eq!(
            rules.plan_for(&express_order(4)).delivery_delay_ms,
            2_000,
            "too big for express: the standard carrier delay"
        );
    }
}
