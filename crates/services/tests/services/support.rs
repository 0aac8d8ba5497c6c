use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::commands::OrderLine;
use domain::{order, streams, EventEnvelope, Evolve, OrderInput, OrderState};
use eventstore::{EventStore, RecordedEvent};
use projector::Projection;
use uuid::Uuid;

/// Generous: `read_all` waits for every transaction on the server that began before,
/// including other tests' databases.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub use testkit::fixtures::{append, line, placement};

/// Places an order (see `placement`); under review it expires in 24 hours.
pub async fn place(
    store: &EventStore,
    token: &str,
    items: Vec<OrderLine>,
) -> anyhow::Result<(Uuid, OrderState)> {
    place_expiring(
        store,
        token,
        items,
        Utc::now() + chrono::Duration::hours(24),
    )
    .await
}

pub async fn place_expiring(
    store: &EventStore,
    token: &str,
    items: Vec<OrderLine>,
    review_expires_at: DateTime<Utc>,
) -> anyhow::Result<(Uuid, OrderState)> {
    let order_id = Uuid::new_v4();
    let events = placement(order_id, token, &items, true, review_expires_at)?;
    append(store, &streams::order(order_id), &events).await?;
    Ok((order_id, domain::fold(&events)))
}

/// Decides `input` on the order and appends the decision.
pub async fn decide_order(
    store: &EventStore,
    order_id: Uuid,
    mut state: OrderState,
    input: OrderInput<'_>,
) -> anyhow::Result<OrderState> {
    let events = order::decide(&state, input);
    anyhow::ensure!(!events.is_empty(), "the order decided nothing");
    append(store, &streams::order(order_id), &events).await?;
    for e in &events {
        state.apply(e);
    }
    Ok(state)
}

pub async fn stream(store: &EventStore, name: &str) -> anyhow::Result<Vec<RecordedEvent>> {
    Ok(store.read_stream(name, 0).await?)
}

pub async fn types(store: &EventStore, name: &str) -> anyhow::Result<Vec<String>> {
    Ok(stream(store, name)
        .await?
        .into_iter()
        .map(|r| r.event_type)
        .collect())
}

/// The last `event_type` event of the stream, as services receive it.
pub async fn envelope(
    store: &EventStore,
    name: &str,
    event_type: &str,
) -> anyhow::Result<EventEnvelope> {
    let rec = stream(store, name)
        .await?
        .into_iter()
        .rev()
        .find(|r| r.event_type == event_type)
        .ok_or_else(|| anyhow::anyhow!("no {event_type} on {name}"))?;
    Ok(projector::to_envelope(&rec)?)
}

async fn behind(store: &EventStore, checkpoint: &str) -> anyhow::Result<i64> {
    let at = store.load_checkpoint(checkpoint).await?;
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (transaction_id, global_position) > ($1, $2)",
    )
    .bind(at.transaction_id)
    .bind(at.global_position)
    .fetch_one(store.pool())
    .await?)
}

pub async fn catch_up(store: &EventStore, projection: &dyn Projection) -> anyhow::Result<()> {
    let checkpoint = format!("projection:{}", projection.name());
    testkit::wait_until(
        &format!("{} to catch up", projection.name()),
        DEADLINE,
        || async {
            while projector::run_once(store, projection).await? > 0 {}
            Ok((behind(store, &checkpoint).await? == 0).then_some(()))
        },
    )
    .await
}

pub async fn catch_up_all(store: &EventStore) -> anyhow::Result<()> {
    for projection in projector::all_projections() {
        catch_up(store, projection.as_ref()).await?;
    }
    Ok(())
}

/// Runs the relay until its checkpoint is at the end of the log; returns how many it
/// published.
pub async fn relay_all(store: &EventStore, bus: &bus::Bus) -> anyhow::Result<usize> {
    let published = std::sync::atomic::AtomicUsize::new(0);
    testkit::wait_until("the relay to catch up", DEADLINE, || async {
        let n = services::relay::relay_page(store, bus).await?;
        published.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        Ok((behind(store, services::relay::CHECKPOINT).await? == 0).then_some(()))
    })
    .await?;
    Ok(published.into_inner())
}

pub async fn timers(
    store: &EventStore,
) -> anyhow::Result<Vec<(Uuid, String, Uuid, DateTime<Utc>)>> {
    Ok(
        sqlx::query_as("SELECT timer_id, kind, order_id, due_at FROM timers ORDER BY timer_id")
            .fetch_all(store.pool())
            .await?,
    )
}

/// (kind, outcome, amount) of the gateway's ledger rows for `key`.
pub async fn ledger(store: &EventStore, key: &str) -> anyhow::Result<Vec<(String, String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT kind, outcome, amount_cents FROM gateway_ledger WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_all(store.pool())
    .await?)
}

/// Runs `scheduler` until the returned sender is dropped or sent to, once it takes
/// hand-overs through `caches`.
pub async fn running(
    scheduler: std::sync::Arc<services::timers::Scheduler>,
    caches: &services::exec::SharedCaches,
) -> anyhow::Result<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), services::ServiceError>>,
)> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(scheduler.run(async move {
        let _ = stopped.await;
    }));
    testkit::wait_until("the scheduler to take hand-overs", DEADLINE, || async {
        Ok(caches.timers.attached().then_some(()))
    })
    .await?;
    Ok((stop, task))
}
