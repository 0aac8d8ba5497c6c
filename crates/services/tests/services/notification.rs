//! Notifications handled at the same moment share one INSERT (group commit); each is
//! still written exactly once, also when the same event arrives twice at once.
use std::sync::Arc;

use chrono::Utc;
use domain::events::OrderConfirmed;
use domain::{DomainEvent, EventEnvelope};
use services::notification::Notifications;
use testkit::TestDb;

use crate::support::{append, line, placement, DEADLINE};
use uuid::Uuid;

fn confirmed(order_id: Uuid) -> EventEnvelope {
    envelope(
        order_id,
        DomainEvent::OrderConfirmed(OrderConfirmed {
            order_id,
            items: Vec::new(),
            shipping: None,
            delivery_delay_ms: 0,
        }),
    )
}

fn envelope(order_id: Uuid, event: DomainEvent) -> EventEnvelope {
    EventEnvelope {
        event_id: Uuid::new_v4(),
        stream_name: domain::streams::order(order_id),
        stream_version: 3,
        global_position: 1,
        recorded_at: Utc::now(),
        correlation_id: order_id,
        causation_id: order_id,
        event,
    }
}

/// A new order's `OrderPlaced`: it names its customer, so its notification needs no
/// lookup and is queued at once.
fn placed() -> anyhow::Result<EventEnvelope> {
    let order_id = Uuid::new_v4();
    let expires = Utc::now() + chrono::Duration::hours(24);
    let placed = placement(order_id, "tok_ok", &[line("SKU-N", 1, 100)], true, expires)?
        .into_iter()
        .find(|e| matches!(e, DomainEvent::OrderPlaced(_)))
        .ok_or_else(|| anyhow::anyhow!("the placement has no OrderPlaced"))?;
    Ok(envelope(order_id, placed))
}

#[tokio::test]
async fn concurrent_notifications_are_each_written_once_even_when_delivered_twice(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let service = Arc::new(Notifications::new(db.store.clone()));
    let events: Vec<EventEnvelope> = (0..30).map(|_| confirmed(Uuid::new_v4())).collect();
    let mut handlers = tokio::task::JoinSet::new();
    // Each event twice (a redelivery racing the first delivery), all at once.
    for env in events.iter().chain(events.iter()) {
        let (service, env) = (service.clone(), env.clone());
        handlers.spawn(async move { service.react(&env).await });
    }
    while let Some(handled) = handlers.join_next().await {
        handled??;
    }
    let rows: Vec<(Uuid, Uuid, String)> =
        sqlx::query_as("SELECT event_id, order_id, kind FROM notifications ORDER BY event_id")
            .fetch_all(db.pool())
            .await?;
    let mut want: Vec<(Uuid, Uuid, String)> = events
        .iter()
        .filter_map(|e| Some((e.event_id, e.event.order_id()?, "confirmed".to_owned())))
        .collect();
    want.sort();
    assert_eq!(rows, want);
    Ok(())
}

/// Transactions that wrote the notifications: rows inserted together share their `xmin`.
async fn insert_transactions(db: &TestDb) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM notifications")
            .fetch_one(db.pool())
            .await?,
    )
}

#[tokio::test]
async fn notifications_handled_within_the_linger_share_one_insert() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let service = Arc::new(Notifications::new(db.store.clone()));
    let mut handlers = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (service, env) = (service.clone(), placed()?);
        handlers.spawn(async move { service.react(&env).await });
    }
    while let Some(handled) = handlers.join_next().await {
        handled??;
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(rows, 40);
    // Without the linger, the first four handlers each write their row alone (a free
    // writer takes what is queued at once) and the rest follow: five inserts at least.
    let transactions = insert_transactions(&db).await?;
    assert_eq!(
        transactions, 1,
        "40 notifications took {transactions} inserts"
    );
    Ok(())
}

/// A backlog: as many handlers at once as the consumer runs lanes, each handling its
/// lane's notifications one after another, as the consumer's lanes do.
async fn drain_in_lanes(
    service: Arc<Notifications>,
    lanes: usize,
    per_lane: usize,
) -> anyhow::Result<()> {
    let mut handlers = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        let service = service.clone();
        let events = (0..per_lane)
            .map(|_| placed())
            .collect::<anyhow::Result<Vec<_>>>()?;
        handlers.spawn(async move {
            for env in events {
                service.react(&env).await?;
            }
            Ok::<_, services::ServiceError>(())
        });
    }
    while let Some(handled) = handlers.join_next().await {
        handled??;
    }
    Ok(())
}

#[tokio::test]
async fn a_backlog_is_written_without_waiting_out_the_linger() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // A linger far longer than the test's deadline: only a batch written without
    // waiting it out lets the handlers finish in time.
    let service = Arc::new(Notifications::new(db.store.clone()).with_linger(DEADLINE * 10));
    let (lanes, per_lane) = (40, 5);
    tokio::time::timeout(DEADLINE, drain_in_lanes(service, lanes, per_lane))
        .await
        .map_err(|_| anyhow::anyhow!("the backlog waited for the linger"))??;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(rows, (lanes * per_lane) as i64);
    // Rows still share inserts: far fewer than one each.
    let transactions = insert_transactions(&db).await?;
    assert!(
        transactions <= (lanes * per_lane / 10) as i64,
        "{rows} notifications took {transactions} inserts"
    );
    Ok(())
}

#[tokio::test]
async fn a_handler_cancelled_while_its_row_waits_leaves_the_row_to_the_next_batch(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let service = Notifications::new(db.store.clone());
    let (cancelled, next) = (placed()?, placed()?);
    // Cancelled long before the linger is up: its row is queued and nobody wrote it.
    let outcome = tokio::time::timeout(
        std::time::Duration::from_millis(1),
        service.react(&cancelled),
    )
    .await;
    assert!(outcome.is_err(), "the first handler finished within 1 ms");
    tokio::time::timeout(DEADLINE, service.react(&next)).await??;
    let mut written: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM notifications")
        .fetch_all(db.pool())
        .await?;
    let mut want = vec![cancelled.event_id, next.event_id];
    want.sort();
    written.sort();
    assert_eq!(written, want);
    Ok(())
}

#[tokio::test]
async fn an_order_placed_before_this_service_started_is_notified_to_its_customer(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let order_id = Uuid::new_v4();
    let expires = Utc::now() + chrono::Duration::hours(24);
    let events = placement(order_id, "tok_ok", &[line("SKU-N", 1, 100)], true, expires)?;
    append(&db.store, &domain::streams::order(order_id), &events).await?;
    // Other orders' OrderPlaced too: the lookup must find this order's, not any.
    for _ in 0..3 {
        let other = Uuid::new_v4();
        let mut events = placement(other, "tok_ok", &[line("SKU-N", 1, 100)], true, expires)?;
        if let Some(DomainEvent::OrderPlaced(placed)) = events.first_mut() {
            placed.customer_id = format!("customer-of-{other}");
        }
        append(&db.store, &domain::streams::order(other), &events).await?;
    }
    // A fresh service (a restart) never saw the OrderPlaced.
    let service = Notifications::new(db.store.clone());
    tokio::time::timeout(DEADLINE, service.react(&confirmed(order_id))).await??;
    let customer: Option<String> =
        sqlx::query_scalar("SELECT customer_id FROM notifications WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(db.pool())
            .await?;
    assert_eq!(customer.as_deref(), Some("customer-1"));
    Ok(())
}
