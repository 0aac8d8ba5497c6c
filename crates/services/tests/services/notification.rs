//! Notifications handled at the same moment share one INSERT (group commit); each is
//! still written exactly once, also when the same event arrives twice at once.
use std::sync::Arc;

use chrono::Utc;
use domain::events::OrderConfirmed;
use domain::{DomainEvent, EventEnvelope};
use services::notification::Notifications;
use testkit::TestDb;
use uuid::Uuid;

fn confirmed(order_id: Uuid) -> EventEnvelope {
    EventEnvelope {
        event_id: Uuid::new_v4(),
        stream_name: domain::streams::order(order_id),
        stream_version: 3,
        global_position: 1,
        recorded_at: Utc::now(),
        correlation_id: order_id,
        causation_id: order_id,
        event: DomainEvent::OrderConfirmed(OrderConfirmed {
            order_id,
            items: Vec::new(),
            shipping: None,
            delivery_delay_ms: 0,
        }),
    }
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
