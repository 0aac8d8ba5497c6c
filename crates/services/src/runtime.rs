//! `orderflow run`: starts the chosen workers in this process and stops them together,
//! with what every process has beside them: the HTTP endpoint (`health`), its row in
//! the worker registry (`registry`, with heartbeats) and the sampled gauges (`metrics`).
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bus::topology::{
    INVENTORY_QUEUE, NOTIFICATION_QUEUE, ORDER_QUEUE, PAYMENT_QUEUE, SHIPPING_QUEUE,
};
use bus::{
    Bus, ConsumeOptions, COMMAND_INTAKE_QUEUE, COMMAND_PARTITION_QUEUES,
    LEGACY_COMMAND_INTAKE_QUEUE,
};
use domain::Rules;
use eventstore::EventStore;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::commands::{CommandHandler, CommandService};
use crate::exec::SharedCaches;
use crate::gateway::Simulator;
use crate::health::Probes;
use crate::inventory::Inventory;
use crate::notification::Notifications;
use crate::parking::ParkingLot;
use crate::partitions::{ConsumeOne, Partitioned};
use crate::payment::Payments;
use crate::registry::Registration;
use crate::router::CommandRouter;
use crate::saga::OrderSaga;
use crate::settings::{redact_url, Settings};
use crate::shipping::Shipping;
use crate::timers::Scheduler;
use crate::worker::{EventHandler, EventService, PerOrder};
use crate::ServiceError;

/// Every worker `orderflow run` knows, in start order.
pub const ALL_WORKERS: [&str; 9] = [
    "projector",
    "relay",
    "timers",
    "commands",
    "order",
    "inventory",
    "payment",
    "shipping",
    "notification",
];

const BUS_WORKERS: [&str; 7] = [
    "relay",
    "commands",
    "order",
    "inventory",
    "payment",
    "shipping",
    "notification",
];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the event log at {url}: {source}")]
    Store {
        url: String,
        source: eventstore::StoreError,
    },
    #[error("cannot reach RabbitMQ at {url}: {source}")]
    Bus { url: String, source: bus::BusError },
    #[error("unknown worker '{0}'")]
    UnknownWorker(String),
    #[error("worker {worker} stopped: {reason}")]
    Worker { worker: String, reason: String },
    #[error("cannot serve HTTP on {addr} (ORDERFLOW_HTTP_ADDR): {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
}

/// How often the gauges sampled from the database (lag, orders by status, open
/// timers, live processes) are refreshed.
const SAMPLE_EVERY: Duration = Duration::from_secs(3);
/// On shutdown, how long the HTTP endpoint and the heartbeats may take to stop.
const BACKGROUND_GRACE: Duration = Duration::from_secs(5);

/// The business rules the settings configure.
pub fn rules(settings: &Settings) -> Rules {
    Rules {
        currency: settings.currency.clone(),
        review_threshold_cents: settings.review_threshold_cents,
        review_timeout: settings.review_timeout,
        payment_timeout: settings.payment_timeout,
        delivery_delay: settings.delivery_delay,
        express_delivery_delay: settings.express_delivery_delay,
        workflow_version: settings.workflow_version,
        fraud_max_orders_per_minute: settings.fraud_max_orders_per_minute,
        express_max_units: settings.express_max_units,
    }
}

fn consume_options(worker: &str) -> ConsumeOptions {
    let (prefetch, concurrency) = match worker {
        // A hung gateway holds a handler until the call times out: allow many at once.
        "payment" => (256, 128),
        "commands" | "order" => (128, 32),
        // Every order reserves and commits on the hot stock streams, and the decisions
        // queued for a stream are appended together: the more lanes, the more go in
        // one commit. In a burst the inventory's offers sat at their limit with 32
        // (5 Dec: full-scale bursts 1,103 and 1,143 orders/s with 32, 1,209 and 1,169
        // with 128).
        "inventory" => (256, 128),
        // Notification handlers mostly wait for the batch their row is in (its linger
        // and its commit): the more of them, the longer the batches.
        "notification" => (256, 128),
        _ => (64, 16),
    };
    ConsumeOptions {
        prefetch,
        concurrency,
        consumer_tag_prefix: format!("orderflow-{worker}"),
        // The services take the events the relay of their process hands over
        // (ADR 0005, "Events handed over").
        local_hand_off: matches!(
            worker,
            "order" | "inventory" | "payment" | "shipping" | "notification"
        ),
        ..ConsumeOptions::default()
    }
}

/// Connects to the log, retrying with backoff for a while: a database that is starting,
/// or a connection killed while the migrations ran, should not stop a worker for good.
async fn open_store(url: &str, pool: u32) -> Result<EventStore, eventstore::StoreError> {
    let schedule = backoff::ExponentialBackoff {
        initial_interval: std::time::Duration::from_millis(200),
        max_interval: std::time::Duration::from_secs(5),
        max_elapsed_time: Some(STORE_CONNECT_PATIENCE),
        ..backoff::ExponentialBackoff::default()
    };
    backoff::future::retry_notify(
        schedule,
        || async {
            eventstore::connect_with(url, pool)
                .await
                .map_err(backoff::Error::transient)
        },
        |error, pause| tracing::warn!(%error, ?pause, "cannot open the event log yet; retrying"),
    )
    .await
}

/// How long a starting worker keeps trying to reach the database.
const STORE_CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Database connections for a process running `workers` workers: enough that the
/// workers do not queue for connections, few enough that several processes (and the
/// tests' parallel systems) stay well under PostgreSQL's default 100. More
/// connections than cores mostly add PostgreSQL's work per statement: all workers in
/// one process on 2 cores (5 Dec, 0.5-scale bursts, A B A B) ran at 550–561 orders/s
/// with 24, 554–586 with 16 (PostgreSQL's CPU per order 1.37 → 1.29 ms; at 270
/// orders/s p50 37–39 → 34–38 ms), 488–539 with 40.
fn pool_size(workers: usize) -> u32 {
    u32::try_from(4 + 4 * workers).unwrap_or(u32::MAX).min(16)
}

/// The pool size: `ORDERFLOW_DB_POOL_SIZE` when set, else [`pool_size`].
fn pool_for(settings: &Settings, workers: usize) -> u32 {
    settings.db_pool_size.unwrap_or_else(|| pool_size(workers))
}

/// Runs `workers` until `shutdown` resolves or one of them fails for good.
pub async fn run(
    settings: Settings,
    workers: &[&str],
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    if let Some(unknown) = workers.iter().find(|w| !ALL_WORKERS.contains(w)) {
        return Err(RunError::UnknownWorker((*unknown).to_owned()));
    }
    let store = open_store(&settings.database_url, pool_for(&settings, workers.len()))
        .await
        .map_err(|source| RunError::Store {
            url: redact_url(&settings.database_url),
            source,
        })?;
    let store = match settings.append_slots {
        0 => store,
        slots => store.with_group_commit(slots),
    };
    let bus = if workers.iter().any(|w| BUS_WORKERS.contains(w)) {
        Some(
            Bus::connect(&settings.amqp_url)
                .await
                .map_err(|source| RunError::Bus {
                    url: redact_url(&settings.amqp_url),
                    source,
                })?,
        )
    } else {
        None
    };
    let metrics = crate::metrics::install();
    let listener = crate::health::bind(settings.http_addr)
        .await
        .map_err(|source| RunError::Http {
            addr: format!("{:?}", settings.http_addr),
            source,
        })?;
    let http_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(addr) = http_addr {
        info!(%addr, "HTTP endpoint: /metrics, /healthz, /readyz");
    }
    let me = Registration::this_process(
        workers,
        settings.heartbeat_interval,
        http_addr.map(|a| a.to_string()),
    );
    if let Err(error) = crate::registry::register(store.pool(), &me).await {
        warn!(%error, "cannot register in the workers table; running anyway");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = JoinSet::new();
    if let Some(listener) = listener {
        let probes = Probes {
            store: store.clone(),
            bus: bus.clone(),
        };
        let shutdown = stopped(stop_rx.clone());
        let metrics = metrics.clone();
        background.spawn(async move {
            if let Err(error) = crate::health::serve(listener, metrics, probes, shutdown).await {
                error!(%error, "the HTTP endpoint stopped");
            }
        });
    }
    background.spawn(heartbeats(
        store.clone(),
        me.clone(),
        stopped(stop_rx.clone()),
    ));
    background.spawn(sampling(
        store.clone(),
        metrics.clone(),
        stopped(stop_rx.clone()),
    ));

    let mut tasks = JoinSet::new();
    let caches = SharedCaches::default();
    for worker in workers {
        let worker = (*worker).to_owned();
        let fut = start(
            &worker,
            &settings,
            &store,
            bus.as_ref(),
            &caches,
            stopped(stop_rx.clone()),
        );
        tasks.spawn(async move { (worker, fut.await) });
    }
    info!(workers = ?workers, "orderflow running");
    tokio::pin!(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => Ok(()),
        Some(joined) = tasks.join_next() => match joined {
            Ok((worker, Ok(()))) => Err(RunError::Worker { worker, reason: "ended unexpectedly".into() }),
            Ok((worker, Err(e))) => Err(RunError::Worker { worker, reason: e.to_string() }),
            Err(e) => Err(RunError::Worker { worker: "?".into(), reason: e.to_string() }),
        },
    };
    let _ = stop_tx.send(true);
    while let Some(joined) = tasks.join_next().await {
        if let Ok((worker, Err(e))) = joined {
            error!(%worker, error = %e, "worker failed while stopping");
        }
    }
    if tokio::time::timeout(BACKGROUND_GRACE, async {
        while background.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        background.abort_all();
    }
    if let Err(error) = crate::registry::deregister(store.pool(), me.id).await {
        warn!(%error, "cannot remove this process from the workers table");
    }
    info!("orderflow stopped");
    result
}

/// Refreshes this process's row in `workers` every heartbeat interval.
async fn heartbeats(store: EventStore, me: Registration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(me.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: the row was just written
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {
                if let Err(error) = crate::registry::heartbeat(store.pool(), &me).await {
                    warn!(%error, "heartbeat failed; trying again at the next one");
                }
            }
        }
    }
}

/// Refreshes the gauges sampled from the database.
async fn sampling(
    store: EventStore,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {
                if let Err(error) = crate::metrics::sample(&store).await {
                    warn!(%error, "cannot sample the gauges from the database");
                }
                metrics.run_upkeep();
            }
        }
    }
}

/// Resolves once the stop flag is raised.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn start(
    worker: &str,
    settings: &Settings,
    store: &EventStore,
    bus: Option<&Bus>,
    caches: &SharedCaches,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> futures::future::BoxFuture<'static, Result<(), ServiceError>> {
    let store = store.clone();
    let caches = caches.clone();
    let bus = bus.cloned();
    let settings = settings.clone();
    let worker = worker.to_owned();
    Box::pin(async move {
        let bus_or_err = || bus.clone().ok_or(ServiceError::NoBus);
        match worker.as_str() {
            "projector" => Ok(projector::run(store, projector::all_projections(), shutdown).await?),
            "relay" => {
                crate::relay::run(
                    store,
                    bus_or_err()?,
                    settings.database_url.clone(),
                    shutdown,
                )
                .await
            }
            "timers" => Scheduler::sharing(store, &caches).run(shutdown).await,
            "commands" => {
                consume_commands(bus_or_err()?, store, &settings, &caches, shutdown).await
            }
            "order" => {
                let pool = store.pool().clone();
                consume_events(
                    bus_or_err()?,
                    pool,
                    ORDER_QUEUE,
                    OrderSaga::sharing(store, &caches),
                    shutdown,
                )
                .await
            }
            "inventory" => {
                let pool = store.pool().clone();
                consume_events(
                    bus_or_err()?,
                    pool,
                    INVENTORY_QUEUE,
                    Inventory::new(store),
                    shutdown,
                )
                .await
            }
            "payment" => {
                let gateway = Arc::new(Simulator::beside(
                    store.pool(),
                    settings.gateway_latency,
                    settings.gateway_failure_rate,
                ));
                let pool = store.pool().clone();
                consume_events(
                    bus_or_err()?,
                    pool,
                    PAYMENT_QUEUE,
                    Payments::new(store, gateway),
                    shutdown,
                )
                .await
            }
            "shipping" => {
                let pool = store.pool().clone();
                consume_events(
                    bus_or_err()?,
                    pool,
                    SHIPPING_QUEUE,
                    Shipping::sharing(store, &caches),
                    shutdown,
                )
                .await
            }
            "notification" => {
                let pool = store.pool().clone();
                consume_events(
                    bus_or_err()?,
                    pool,
                    NOTIFICATION_QUEUE,
                    Notifications::new(store),
                    shutdown,
                )
                .await
            }
            _ => Ok(()),
        }
    })
}

/// Consume options of one command partition: a process may own all of them, so each
/// gets a share of what the intake had alone (8 × 8 handlers at most per process).
/// Commands the router of this process forwards to a partition it owns are handed
/// over in process (ADR 0005, "The hand-off in process").
fn partition_options() -> ConsumeOptions {
    ConsumeOptions {
        prefetch: 32,
        concurrency: 8,
        consumer_tag_prefix: "orderflow-commands".to_owned(),
        local_hand_off: true,
        ..ConsumeOptions::default()
    }
}

/// The router's options: the intake's one consumer, forwarding many orders' commands
/// at once. A command handed over in process holds its router permit until handled:
/// enough permits for every partition's handlers (8 × 8) and as many on their way.
fn router_options() -> ConsumeOptions {
    ConsumeOptions {
        prefetch: 256,
        concurrency: 128,
        consumer_tag_prefix: "orderflow-router".to_owned(),
        forwards: true,
        ..ConsumeOptions::default()
    }
}

/// The commands worker (ADR 0005, "Per-order ordering"): the router (active in one
/// process at a time) forwards each command to its order's partition; this process
/// consumes the partitions it owns, with parking around the handler, and drains the
/// parked commands beside them.
async fn consume_commands(
    bus: Bus,
    store: EventStore,
    settings: &Settings,
    caches: &SharedCaches,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    use futures::FutureExt;
    let shutdown = shutdown.boxed().shared();
    // Parked commands keep the queue name they were parked under before partitioning.
    let lot = ParkingLot::new(
        store.pool().clone(),
        LEGACY_COMMAND_INTAKE_QUEUE,
        "commands",
    );
    let inner: Arc<dyn bus::Handler> = Arc::new(CommandHandler(Arc::new(CommandService::sharing(
        store,
        rules(settings),
        caches,
    ))));
    let handler = crate::parking::parked_handler(&lot, inner.clone(), crate::commands::order_of);
    let mut drainer = tokio::spawn(crate::parking::drain(
        lot.with_dead_letter_copies(bus.clone()),
        inner,
        shutdown.clone(),
    ));
    let consume_one: ConsumeOne = {
        let bus = bus.clone();
        Arc::new(move |queue, stop| {
            let (bus, handler) = (bus.clone(), handler.clone());
            Box::pin(async move {
                Ok(bus::consume(&bus, queue, partition_options(), handler, stop).await?)
            })
        })
    };
    let partitioned = Partitioned {
        worker: "commands",
        queues: &COMMAND_PARTITION_QUEUES,
        database_url: settings.database_url.clone(),
    };
    // One router at a time, owned like a partition: the next owner subscribes only
    // after the previous one closed its channel, so what it had prefetched is back at
    // the front of the queue first (with single active consumer alone, a waiting
    // router would become active at the cancel, before those return).
    let routing: Arc<dyn bus::Handler> = Arc::new(crate::metrics::Metered::new(
        "router",
        Arc::new(CommandRouter),
    ));
    let route_one: ConsumeOne = {
        let bus = bus.clone();
        let routing = routing.clone();
        Arc::new(move |queue, stop| {
            let bus = bus.clone();
            let routing = routing.clone();
            Box::pin(async move {
                Ok(bus::consume(&bus, queue, router_options(), routing, stop).await?)
            })
        })
    };
    let router = crate::partitions::consume_owned(
        Partitioned {
            worker: "commands-router",
            queues: &[COMMAND_INTAKE_QUEUE],
            database_url: settings.database_url.clone(),
        },
        route_one,
        shutdown.clone(),
    );
    // What an older build left in the old intake is routed too, by every process: the
    // order of commands in flight during the upgrade is not kept (it was not before).
    let legacy = bus::consume(
        &bus,
        LEGACY_COMMAND_INTAKE_QUEUE,
        router_options(),
        routing,
        shutdown.clone(),
    );
    let owned = crate::partitions::consume_owned(partitioned, consume_one, shutdown.clone());
    let (routed, legacy, owned) = tokio::join!(router, legacy, owned);
    if tokio::time::timeout(partition_options().shutdown_grace, &mut drainer)
        .await
        .is_err()
    {
        drainer.abort();
    }
    routed?;
    legacy?;
    owned
}

async fn consume_events<S: EventService>(
    bus: Bus,
    pool: sqlx::PgPool,
    queue: &'static str,
    service: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let worker = service.name();
    let handler: Arc<dyn bus::Handler> = Arc::new(EventHandler(Arc::new(service)));
    // Payment calls the gateway and may hang until its timeout: a lane shared with
    // other orders would hold them too (the bulkhead). Its events stay unordered.
    let handler: Arc<dyn bus::Handler> = if worker == "payment" {
        handler
    } else {
        Arc::new(PerOrder(handler))
    };
    crate::parking::consume_with_parking(
        &bus,
        ParkingLot::new(pool, queue, worker),
        consume_options(worker),
        handler,
        crate::worker::event_order,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_grows_with_the_workers_up_to_a_cap_unless_set() {
        let unset = Settings::default();
        assert_eq!(pool_for(&unset, 1), 8);
        assert_eq!(pool_for(&unset, ALL_WORKERS.len()), 16);
        let set = Settings {
            db_pool_size: Some(6),
            ..Settings::default()
        };
        assert_eq!(pool_for(&set, ALL_WORKERS.len()), 6);
    }
}
