//! `order_milestones`: when each milestone of an order was reached, one row per
//! (order, milestone), `reached_at` being the `recorded_at` of the event that reached
//! it. A milestone is reached once: the first event that reaches it wins.
//!
//! | milestone | reached by |
//! | --- | --- |
//! | `placed` | `OrderPlaced` |
//! | `reviewed` | `OrderApproved`, or `OrderCancelled` with `review_rejected` |
//! | `accepted` | `OrderAccepted` (fulfilment starts) |
//! | `reserved` | the `OrderLineReserved` that leaves every line reserved while the order is still being fulfilled |
//! | `paid` | `OrderPaymentCaptured` while the order is still being fulfilled (a capture after a cancellation is refunded, not a milestone) |
//! | `confirmed` | `OrderConfirmed` |
//! | `shipped` | `ShipmentShipped` |
//! | `delivered` | `ShipmentDelivered` |
//! | `completed` | `OrderCompleted` (digital orders) |
//! | `cancelled` | `OrderCancelled` |
//! | `rejected` | `OrderRejected` |
//!
//! `reserved` and `paid` depend on the order's state before the event: the domain's own
//! `OrderState` folded over the order's stream up to that event, so live projection
//! and replay give the same rows whatever the pages. The part of that state they read
//! (status and lines) is kept per stream in `order_milestone_progress`, as of the
//! stream's last version applied: a page reads those rows and folds only its own
//! events. An event that does not follow its stream's progress row directly (no row
//! yet for a stream that began before, a version that was skipped or comes out of
//! order) gets its state the old way, by folding the stream from `events`.
use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::events::CancelReason;
use domain::order::LineStatus;
use domain::{DomainEvent, EventEnvelope, Evolve, OrderState, OrderStatus};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::{Projection, ProjectorError};

pub const PLACED: &str = "placed";
pub const REVIEWED: &str = "reviewed";
pub const ACCEPTED: &str = "accepted";
pub const RESERVED: &str = "reserved";
pub const PAID: &str = "paid";
pub const CONFIRMED: &str = "confirmed";
pub const SHIPPED: &str = "shipped";
pub const DELIVERED: &str = "delivered";
pub const COMPLETED: &str = "completed";
pub const CANCELLED: &str = "cancelled";
pub const REJECTED: &str = "rejected";

/// Every milestone, in the order of the course of an order.
pub const MILESTONES: [&str; 11] = [
    PLACED, REVIEWED, ACCEPTED, RESERVED, PAID, CONFIRMED, SHIPPED, DELIVERED, COMPLETED,
    CANCELLED, REJECTED,
];

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MilestoneRow {
    pub order_id: Uuid,
    pub milestone: String,
    pub reached_at: DateTime<Utc>,
    pub global_position: i64,
}

/// Whether the milestones `event` reaches depend on the order's state before it.
fn needs_order_state(event: &DomainEvent) -> bool {
    matches!(
        event,
        DomainEvent::OrderLineReserved(_) | DomainEvent::OrderPaymentCaptured(_)
    )
}

/// The milestones `event` reaches. `before` is the order's state just before the
/// event (folded from its stream); only events for which [`needs_order_state`] holds
/// look at it.
pub fn reached(before: &OrderState, event: &DomainEvent) -> &'static [&'static str] {
    use DomainEvent as E;
    let fulfilling = before.status == OrderStatus::Accepted;
    match event {
        E::OrderPlaced(_) => &[PLACED],
        E::OrderApproved(_) => &[REVIEWED],
        E::OrderAccepted(_) => &[ACCEPTED],
        E::OrderLineReserved(_) if fulfilling => {
            // Only the lines matter (a state loaded from progress has nothing else):
            // no copy of the placed order per reservation.
            let mut after = OrderState {
                status: before.status,
                lines: before.lines.clone(),
                ..OrderState::default()
            };
            after.apply(event);
            if after.lines.iter().all(|l| *l == LineStatus::Reserved) {
                &[RESERVED]
            } else {
                &[]
            }
        }
        E::OrderPaymentCaptured(_) if fulfilling => &[PAID],
        E::OrderConfirmed(_) => &[CONFIRMED],
        E::ShipmentShipped(_) => &[SHIPPED],
        E::ShipmentDelivered(_) => &[DELIVERED],
        E::OrderCompleted(_) => &[COMPLETED],
        E::OrderCancelled(e) if e.reason == CancelReason::ReviewRejected => &[REVIEWED, CANCELLED],
        E::OrderCancelled(_) => &[CANCELLED],
        E::OrderRejected(_) => &[REJECTED],
        _ => &[],
    }
}

/// The rows a page of events adds. `states` holds, for each order stream with an
/// event that [`needs_order_state`], the order's events (stream_version, event) from
/// its start up to at least that event.
pub fn rows_of_page(
    events: &[EventEnvelope],
    states: &HashMap<String, Vec<(i64, DomainEvent)>>,
) -> Vec<MilestoneRow> {
    let mut page = PageFold::default();
    for env in events {
        let before = if needs_order_state(&env.event) {
            state_before(states.get(&env.stream_name), env.stream_version)
        } else {
            OrderState::default()
        };
        page.add(env, &before);
    }
    page.rows()
}

/// The milestone rows of a page, the first reach of each (order, milestone) in log
/// order winning.
#[derive(Default)]
struct PageFold {
    rows: BTreeMap<(Uuid, &'static str), MilestoneRow>,
}

impl PageFold {
    fn add(&mut self, env: &EventEnvelope, before: &OrderState) {
        let Some(order_id) = env.event.order_id() else {
            return;
        };
        for &milestone in reached(before, &env.event) {
            self.rows
                .entry((order_id, milestone))
                .or_insert_with(|| MilestoneRow {
                    order_id,
                    milestone: milestone.to_owned(),
                    reached_at: env.recorded_at,
                    global_position: env.global_position,
                });
        }
    }

    fn rows(self) -> Vec<MilestoneRow> {
        self.rows.into_values().collect()
    }
}

fn state_before(stream: Option<&Vec<(i64, DomainEvent)>>, version: i64) -> OrderState {
    let mut state = OrderState::default();
    for (_, event) in stream
        .into_iter()
        .flatten()
        .take_while(|(v, _)| *v < version)
    {
        state.apply(event);
    }
    state
}

/// A stream's fold as far as the milestones need it: `state` is `OrderState` folded
/// over the stream's versions `0..=version`. Only `status` and `lines`, all that
/// [`reached`] reads, are stored; the rest is default in a state loaded back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub version: i64,
    pub state: OrderState,
}

impl Progress {
    /// Before a stream's first event.
    fn start() -> Self {
        Progress {
            version: -1,
            state: OrderState::default(),
        }
    }
}

/// Whether the projection keeps progress for a stream: every order stream, and any
/// other stream with an event that needs it (none today; kept exact all the same).
fn tracked(env: &EventEnvelope) -> bool {
    is_order_stream(&env.stream_name) || needs_order_state(&env.event)
}

/// `streams::category(stream) == streams::ORDER`, without splitting the name: a replay
/// asks it of every event, several times.
fn is_order_stream(stream: &str) -> bool {
    stream
        .strip_prefix(domain::streams::ORDER)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// Folds a page with the streams' progress. `progress` holds the stored rows of the
/// page's tracked streams (missing: none stored); `history` the stream events
/// loaded for [`streams_to_load`]. Returns the page's milestone rows and the
/// streams' progress after it.
pub fn fold_page(
    events: &[EventEnvelope],
    mut progress: HashMap<String, Progress>,
    history: &HashMap<String, Vec<(i64, DomainEvent)>>,
) -> (Vec<MilestoneRow>, HashMap<String, Progress>) {
    let mut page = PageFold::default();
    let empty = OrderState::default();
    for env in events.iter() {
        if !tracked(env) {
            page.add(env, &empty);
            continue;
        }
        // Looked up before inserting: the name is copied once per stream, not per event.
        if !progress.contains_key(&env.stream_name) {
            progress.insert(env.stream_name.clone(), Progress::start());
        }
        let Some(current) = progress.get_mut(&env.stream_name) else {
            continue;
        };
        if current.version + 1 != env.stream_version {
            // Not the next version: the state before it, folded from the log.
            current.state = state_before(history.get(&env.stream_name), env.stream_version);
        }
        page.add(env, &current.state);
        current.state.apply(&env.event);
        current.version = env.stream_version;
    }
    (page.rows(), progress)
}

/// The streams [`fold_page`] has to fold from `events`: those with an event that does
/// not directly follow the progress before it (stored, or from earlier in the page).
pub fn streams_to_load(events: &[EventEnvelope], stored: &HashMap<String, i64>) -> Vec<String> {
    let mut versions: HashMap<&str, i64> = HashMap::new();
    let mut load: HashSet<&str> = HashSet::new();
    for env in events.iter().filter(|e| tracked(e)) {
        let stream = env.stream_name.as_str();
        let last = versions
            .entry(stream)
            .or_insert_with(|| stored.get(stream).copied().unwrap_or(-1));
        if *last + 1 != env.stream_version {
            load.insert(stream);
        }
        *last = env.stream_version;
    }
    load.into_iter().map(str::to_owned).collect()
}

pub struct MilestonesProjection;

impl Projection for MilestonesProjection {
    fn name(&self) -> &'static str {
        "order_milestones"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["order_milestones"]
    }

    fn state_tables(&self) -> &'static [&'static str] {
        &["order_milestone_progress"]
    }

    fn first_wins_tables(&self) -> &'static [&'static str] {
        &["order_milestones"]
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>> {
        Box::pin(async move {
            let stored = load_progress(conn, events).await?;
            let versions: HashMap<String, i64> = stored
                .iter()
                .map(|(stream, p)| (stream.clone(), p.version))
                .collect();
            let history = load_streams(conn, &streams_to_load(events, &versions)).await?;
            let (rows, mut progress) = fold_page(events, stored, &history);
            // An order that ended (or shipped) keeps no progress: most orders begin
            // and end within a replay's page and never need a row, and the rare
            // event on an ended order's stream (a refused command, a late
            // compensation) is folded from the log, as for any stream without a row.
            let forget: Vec<String> = progress
                .iter()
                .filter(|(stream, p)| ended(p) && versions.contains_key(*stream))
                .map(|(stream, _)| stream.clone())
                .collect();
            progress.retain(|_, p| !ended(p));
            write(conn, &rows, &progress, &forget).await
        })
    }
}

/// The stored progress of the page's tracked streams that did not begin in it (a
/// stream whose version 0 is in the page needs none).
async fn load_progress(
    conn: &mut PgConnection,
    events: &[EventEnvelope],
) -> Result<HashMap<String, Progress>, ProjectorError> {
    let mut first: HashMap<&str, i64> = HashMap::new();
    for env in events.iter().filter(|e| tracked(e)) {
        first
            .entry(env.stream_name.as_str())
            .or_insert(env.stream_version);
    }
    let streams: Vec<&str> = first
        .into_iter()
        .filter(|(_, version)| *version != 0)
        .map(|(stream, _)| stream)
        .collect();
    if streams.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, i64, String, String)> = sqlx::query_as(
        "SELECT stream_name, version, status, lines FROM order_milestone_progress
          WHERE stream_name = ANY($1)",
    )
    .bind(&streams)
    .fetch_all(conn)
    .await?;
    // A row this build cannot read counts as missing: the stream is folded from the log.
    Ok(rows
        .into_iter()
        .filter_map(|(stream, version, status, lines)| {
            Some((
                stream,
                Progress {
                    version,
                    state: decode_state(&status, &lines)?,
                },
            ))
        })
        .collect())
}

/// How `order_milestone_progress.status` names an `OrderStatus`.
pub fn status_code(status: OrderStatus) -> &'static str {
    match status {
        OrderStatus::New => "new",
        OrderStatus::Rejected => "rejected",
        OrderStatus::UnderReview => "under_review",
        OrderStatus::Accepted => "accepted",
        OrderStatus::Confirmed => "confirmed",
        OrderStatus::Completed => "completed",
        OrderStatus::Shipped => "shipped",
        OrderStatus::Cancelled => "cancelled",
    }
}

/// How `order_milestone_progress.lines` writes a line's status, one letter a line.
pub fn line_code(line: LineStatus) -> char {
    match line {
        LineStatus::Pending => 'p',
        LineStatus::Reserved => 'r',
        LineStatus::OutOfStock => 'o',
        LineStatus::ReleaseRequested => 'x',
    }
}

/// The state a progress row holds; `None` for a code this build does not know.
pub fn decode_state(status: &str, lines: &str) -> Option<OrderState> {
    let status = OrderStatus::ALL
        .into_iter()
        .find(|s| status_code(*s) == status)?;
    let lines = lines
        .chars()
        .map(|c| {
            [
                LineStatus::Pending,
                LineStatus::Reserved,
                LineStatus::OutOfStock,
                LineStatus::ReleaseRequested,
            ]
            .into_iter()
            .find(|l| line_code(*l) == c)
        })
        .collect::<Option<Vec<_>>>()?;
    Some(OrderState {
        status,
        lines,
        ..OrderState::default()
    })
}

/// The order streams named, decoded (upcast) in stream order. An event this version
/// cannot decode is left out, as the runner leaves it out of the page.
async fn load_streams(
    conn: &mut PgConnection,
    streams: &[String],
) -> Result<HashMap<String, Vec<(i64, DomainEvent)>>, ProjectorError> {
    let mut loaded: HashMap<String, Vec<(i64, DomainEvent)>> = HashMap::new();
    if streams.is_empty() {
        return Ok(loaded);
    }
    let records: Vec<(String, i64, String, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT stream_name, stream_version, event_type, schema_version, payload
           FROM events WHERE stream_name = ANY($1)
          ORDER BY stream_name, stream_version",
    )
    .bind(streams)
    .fetch_all(conn)
    .await?;
    for (stream, version, event_type, schema_version, payload) in records {
        if let Ok(event) = DomainEvent::decode(&event_type, schema_version, &payload) {
            loaded.entry(stream).or_default().push((version, event));
        }
    }
    Ok(loaded)
}

/// Whether the order is past every event that looks at its state (a reservation or a
/// capture, before confirmation, see [`needs_order_state`]) and few events of its
/// stream are still to come: it ended, or shipped (its delivery is on the shipment
/// stream). A later event is folded from the log all the same, so this decides only
/// what is cheaper, never what is right.
fn ended(progress: &Progress) -> bool {
    matches!(
        progress.state.status,
        OrderStatus::Rejected
            | OrderStatus::Completed
            | OrderStatus::Cancelled
            | OrderStatus::Shipped
    )
}

/// Writes a page's milestone rows and its streams' progress in one statement (the
/// progress upsert, and the removal of the rows of orders that ended, as
/// data-modifying CTEs: they touch different rows).
async fn write(
    conn: &mut PgConnection,
    rows: &[MilestoneRow],
    progress: &HashMap<String, Progress>,
    forget: &[String],
) -> Result<(), ProjectorError> {
    if rows.is_empty() && progress.is_empty() && forget.is_empty() {
        return Ok(());
    }
    let mut streams = Vec::with_capacity(progress.len());
    let mut versions = Vec::with_capacity(progress.len());
    let mut statuses = Vec::with_capacity(progress.len());
    let mut lines = Vec::with_capacity(progress.len());
    for (stream, p) in progress {
        streams.push(stream.as_str());
        versions.push(p.version);
        statuses.push(status_code(p.state.status));
        lines.push(
            p.state
                .lines
                .iter()
                .map(|l| line_code(*l))
                .collect::<String>(),
        );
    }
    sqlx::query(
        "WITH progress AS (
             INSERT INTO order_milestone_progress (stream_name, version, status, lines)
             SELECT * FROM UNNEST($5::text[], $6::bigint[], $7::text[], $8::text[])
             ON CONFLICT (stream_name) DO UPDATE SET
                 version = EXCLUDED.version, status = EXCLUDED.status, lines = EXCLUDED.lines
         ), ended AS (
             DELETE FROM order_milestone_progress WHERE stream_name = ANY($9::text[])
         )
         INSERT INTO order_milestones (order_id, milestone, reached_at, global_position)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::bigint[])
         ON CONFLICT DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.order_id).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.milestone.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.reached_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.global_position).collect::<Vec<_>>())
    .bind(&streams)
    .bind(&versions)
    .bind(&statuses)
    .bind(&lines)
    .bind(forget)
    .execute(conn)
    .await?;
    Ok(())
}

/// An order's milestones, in the order they were reached.
pub async fn of_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<MilestoneRow>, ProjectorError> {
    Ok(sqlx::query_as(
        "SELECT order_id, milestone, reached_at, global_position FROM order_milestones
          WHERE order_id = $1 ORDER BY global_position, milestone",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::commands::{OrderLine, PlaceOrder};
    use domain::events::{
        OrderCancelled, OrderLineReserved, OrderPaymentCaptured, ShipmentDelivered,
    };
    use domain::{order, OrderInput, PlacementFacts, Rules};
    use std::collections::BTreeSet;

    const ORDER: Uuid = Uuid::from_u128(0xA11CE);

    fn env(version: i64, stream: &str, event: DomainEvent) -> EventEnvelope {
        crate::test_events::envelope(stream, version, 100 + version, event)
    }

    /// A two-line digital order, placed and accepted.
    fn placed_and_accepted() -> Vec<DomainEvent> {
        let skus: BTreeSet<String> = ["A", "B"].into_iter().map(String::from).collect();
        let line = |sku: &str| OrderLine {
            sku: sku.into(),
            quantity: 1,
            unit_price_cents: 100,
        };
        order::decide(
            &OrderState::default(),
            OrderInput::Place {
                cmd: PlaceOrder {
                    order_id: ORDER,
                    customer_id: "c".into(),
                    currency: "EUR".into(),
                    items: vec![line("A"), line("B")],
                    payment_token: "tok_ok".into(),
                    shipping: None,
                },
                rules: &Rules::default(),
                known_skus: &skus,
                facts: PlacementFacts::default(),
                now: Utc::now(),
            },
        )
    }

    fn reserved(line: u32) -> DomainEvent {
        DomainEvent::OrderLineReserved(OrderLineReserved {
            order_id: ORDER,
            line,
            sku: if line == 0 { "A" } else { "B" }.into(),
            quantity: 1,
        })
    }

    fn captured() -> DomainEvent {
        DomainEvent::OrderPaymentCaptured(OrderPaymentCaptured {
            order_id: ORDER,
            amount_cents: 200,
        })
    }

    fn cancelled(reason: CancelReason) -> DomainEvent {
        DomainEvent::OrderCancelled(OrderCancelled {
            order_id: ORDER,
            reason,
            detail: String::new(),
            by: None,
        })
    }

    /// The milestones of an order stream, with the stream itself as the state source.
    fn milestones_of(events: Vec<DomainEvent>) -> Vec<(String, i64)> {
        let stream = format!("order-{ORDER}");
        let envs: Vec<EventEnvelope> = (0..).zip(events).map(|(v, e)| env(v, &stream, e)).collect();
        let states = HashMap::from([(
            stream,
            envs.iter()
                .map(|e| (e.stream_version, e.event.clone()))
                .collect(),
        )]);
        let mut rows = rows_of_page(&envs, &states);
        rows.sort_by_key(|r| r.global_position);
        rows.into_iter()
            .map(|r| (r.milestone, r.global_position - 100))
            .collect()
    }

    fn names(rows: &[(String, i64)]) -> Vec<&str> {
        rows.iter().map(|(m, _)| m.as_str()).collect()
    }

    #[test]
    fn reserved_is_reached_by_the_last_line_and_paid_by_the_capture() {
        let mut events = placed_and_accepted();
        events.extend([reserved(1), captured(), reserved(0)]);
        let rows = milestones_of(events);
        assert_eq!(
            rows,
            [
                ("placed".into(), 0),
                ("accepted".into(), 1),
                ("paid".into(), 3),
                ("reserved".into(), 4)
            ]
        );
    }

    #[test]
    fn reservations_and_captures_after_a_cancellation_are_no_milestones() {
        let mut events = placed_and_accepted();
        events.extend([
            reserved(0),
            cancelled(CancelReason::CustomerCancelled),
            reserved(1),
            captured(),
        ]);
        assert_eq!(
            names(&milestones_of(events)),
            ["placed", "accepted", "cancelled"]
        );
    }

    #[test]
    fn a_review_rejection_is_both_reviewed_and_cancelled() {
        let placed = placed_and_accepted().remove(0);
        let rows = milestones_of(vec![placed, cancelled(CancelReason::ReviewRejected)]);
        assert_eq!(names(&rows), ["placed", "cancelled", "reviewed"]);
    }

    #[test]
    fn shipment_events_reach_shipped_and_delivered_without_order_state() {
        let delivered = env(
            3,
            &format!("shipment-{ORDER}"),
            DomainEvent::ShipmentDelivered(ShipmentDelivered { order_id: ORDER }),
        );
        let rows = rows_of_page(&[delivered], &HashMap::new());
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].milestone.as_str(), rows[0].order_id),
            ("delivered", ORDER)
        );
    }

    /// The stream and its events as envelopes, versions 0, 1, 2 … in log order.
    fn stream_envs(events: Vec<DomainEvent>) -> Vec<EventEnvelope> {
        let stream = format!("order-{ORDER}");
        (0..).zip(events).map(|(v, e)| env(v, &stream, e)).collect()
    }

    fn whole_streams(envs: &[EventEnvelope]) -> HashMap<String, Vec<(i64, DomainEvent)>> {
        let mut streams: HashMap<String, Vec<(i64, DomainEvent)>> = HashMap::new();
        for e in envs {
            streams
                .entry(e.stream_name.clone())
                .or_default()
                .push((e.stream_version, e.event.clone()));
        }
        for events in streams.values_mut() {
            events.sort_by_key(|(v, _)| *v);
        }
        streams
    }

    /// Applies `envs` in pages of `size` as `apply_page` does, with a map standing in
    /// for each table: progress is loaded for the streams that did not begin in the
    /// page, and the first row of a milestone wins (ON CONFLICT DO NOTHING).
    fn paged(envs: &[EventEnvelope], size: usize) -> Vec<MilestoneRow> {
        let log = whole_streams(envs);
        let mut table: BTreeMap<(Uuid, String), MilestoneRow> = BTreeMap::new();
        let mut stored: HashMap<String, Progress> = HashMap::new();
        for page in envs.chunks(size) {
            let mut first: HashMap<&str, i64> = HashMap::new();
            for e in page {
                first
                    .entry(e.stream_name.as_str())
                    .or_insert(e.stream_version);
            }
            let loaded: HashMap<String, Progress> = stored
                .iter()
                .filter(|(s, _)| first.get(s.as_str()).is_some_and(|v| *v != 0))
                .map(|(s, p)| (s.clone(), p.clone()))
                .collect();
            let versions = loaded.iter().map(|(s, p)| (s.clone(), p.version)).collect();
            let history: HashMap<String, Vec<(i64, DomainEvent)>> =
                streams_to_load(page, &versions)
                    .into_iter()
                    .filter_map(|s| log.get(&s).map(|events| (s, events.clone())))
                    .collect();
            let (rows, progress) = fold_page(page, loaded, &history);
            for row in rows {
                table
                    .entry((row.order_id, row.milestone.clone()))
                    .or_insert(row);
            }
            stored.extend(progress);
        }
        table.into_values().collect()
    }

    fn assert_pages_agree(envs: &[EventEnvelope]) {
        let whole = rows_of_page(envs, &whole_streams(envs));
        assert!(!whole.is_empty());
        for size in 1..=envs.len() {
            assert_eq!(paged(envs, size), whole, "pages of {size}");
        }
    }

    #[test]
    fn stored_progress_gives_the_rows_of_folding_the_stream_whatever_the_pages() {
        let mut happy = placed_and_accepted();
        happy.extend([reserved(1), captured(), reserved(0)]);
        assert_pages_agree(&stream_envs(happy));

        let mut late = placed_and_accepted();
        late.extend([
            reserved(0),
            cancelled(CancelReason::CustomerCancelled),
            reserved(1),
            captured(),
        ]);
        assert_pages_agree(&stream_envs(late));
    }

    #[test]
    fn an_event_out_of_its_streams_order_gets_the_state_of_the_versions_before_it() {
        // Versions 3 then 2 in log order (a transaction with the older id committed
        // later): the state before version 3 has line 0 reserved by version 2.
        let mut events = placed_and_accepted();
        events.extend([reserved(0), reserved(1)]);
        let mut envs = stream_envs(events);
        envs.swap(2, 3);
        for (position, e) in (100..).zip(envs.iter_mut()) {
            e.global_position = position;
        }
        let rows = rows_of_page(&envs, &whole_streams(&envs));
        let reserved_at = rows.iter().find(|r| r.milestone == RESERVED);
        assert_eq!(reserved_at.map(|r| r.global_position), Some(102));
        assert_pages_agree(&envs);
    }

    #[test]
    fn a_stream_without_stored_progress_is_folded_from_the_log() {
        let mut events = placed_and_accepted();
        events.extend([reserved(0), reserved(1), captured()]);
        let envs = stream_envs(events);
        // Only the last three events in the page, nothing stored (as after upgrading
        // a database whose projection ran before the progress table existed).
        let page = &envs[2..];
        let load = streams_to_load(page, &HashMap::new());
        assert_eq!(load, [format!("order-{ORDER}")]);
        let (rows, progress) = fold_page(page, HashMap::new(), &whole_streams(&envs));
        let names: Vec<&str> = rows.iter().map(|r| r.milestone.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&RESERVED) && names.contains(&PAID));
        let after = progress.get(&format!("order-{ORDER}"));
        assert_eq!(after.map(|p| p.version), Some(4));
    }

    #[test]
    fn progress_codes_read_back_and_unknown_codes_are_refused() {
        for status in OrderStatus::ALL {
            let lines = [
                LineStatus::Pending,
                LineStatus::Reserved,
                LineStatus::OutOfStock,
                LineStatus::ReleaseRequested,
            ];
            let code: String = lines.iter().map(|l| line_code(*l)).collect();
            let state = decode_state(status_code(status), &code);
            assert_eq!(
                state.map(|s| (s.status, s.lines)),
                Some((status, lines.to_vec()))
            );
        }
        assert_eq!(decode_state("paused", ""), None);
        assert_eq!(decode_state("accepted", "rq"), None);
    }

    #[test]
    fn the_first_reach_of_a_milestone_wins() {
        let mut events = placed_and_accepted();
        events.push(events[0].clone());
        assert_eq!(
            milestones_of(events),
            [("placed".into(), 0), ("accepted".into(), 1)]
        );
    }
}
