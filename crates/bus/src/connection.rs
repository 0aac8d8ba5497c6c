//! The shared connection: connect with backoff, re-declare the topology on every
//! (re)connect, hand out live channels.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};
use lapin::options::ConfirmSelectOptions;
use lapin::types::LongString;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::consume::{answered, LocalConsumer};
use crate::local::LocalQueues;
use crate::topology::declare_topology;
use crate::BusError;

/// Tunables of a [`Bus`]; `BusOptions::default()` suits production.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// How long [`Bus::connect`] (and each reconnect) keeps trying before failing.
    pub connect_timeout: Duration,
    /// How long a publish keeps retrying transient failures (reconnecting meanwhile).
    pub publish_timeout: Duration,
    /// Shown in the broker's connection list.
    pub connection_name: String,
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            connect_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(30),
            connection_name: "orderflow".to_owned(),
        }
    }
}

/// A cloneable handle on one RabbitMQ connection (re-opened when it dies) and one
/// confirm-mode publishing channel. Consumers open channels of their own.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    /// Holds the password: never logged, never in an error.
    uri: AMQPUri,
    /// `host:port/vhost`, for logs and errors.
    endpoint: String,
    options: BusOptions,
    state: Mutex<State>,
    /// Connections established so far (1 after `connect`, +1 per reconnect).
    connects: AtomicU64,
    /// Taken around each `basic_publish` on a shared channel. lapin numbers a publish
    /// (its delivery tag) and queues its frames in two steps; two tasks interleaving
    /// them send their messages in the other order than they were numbered, and the
    /// broker's confirm of one resolves the other's promise. A message could then pass
    /// as confirmed while the broker had only confirmed its neighbour.
    send_turn: Mutex<()>,
    /// Leases on the channels for mandatory publishes (see [`Bus::lease_returning_channel`]).
    returning_slots: Arc<Semaphore>,
    /// The queues this process's consumers take forwarded messages for in process.
    local: LocalQueues<LocalConsumer>,
}

/// How many mandatory publishes may be in flight at once, each on a channel of its own.
const RETURNING_CHANNELS: usize = 32;

/// A confirm channel lent to one mandatory publish at a time.
pub(crate) struct Lease {
    pub(crate) channel: Channel,
    _slot: OwnedSemaphorePermit,
}

#[derive(Default)]
struct State {
    connection: Option<Connection>,
    publisher: Option<Channel>,
    /// Channels for mandatory publishes, idle between leases.
    returning_idle: Vec<Channel>,
}

impl State {
    fn forget_channels(&mut self) {
        self.publisher = None;
        self.returning_idle.clear();
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects (retrying with backoff for up to 30 s) and declares the topology.
    pub async fn connect(amqp_url: &str) -> Result<Bus, BusError> {
        Bus::connect_with(amqp_url, BusOptions::default()).await
    }

    pub async fn connect_with(amqp_url: &str, options: BusOptions) -> Result<Bus, BusError> {
        let uri: AMQPUri = amqp_url
            .parse()
            .map_err(|reason: String| BusError::InvalidUrl {
                // the parser may quote the whole URL, password included
                reason: reason.replace(amqp_url, "<the URL>"),
            })?;
        let endpoint = format!(
            "{}:{}/{}",
            uri.authority.host, uri.authority.port, uri.vhost
        );
        let bus = Bus {
            inner: Arc::new(Inner {
                uri,
                endpoint,
                options,
                state: Mutex::new(State::default()),
                connects: AtomicU64::new(0),
                send_turn: Mutex::new(()),
                returning_slots: Arc::new(Semaphore::new(RETURNING_CHANNELS)),
                local: LocalQueues::default(),
            }),
        };
        let mut state = bus.inner.state.lock().await;
        bus.ensure_connected(&mut state).await?;
        drop(state);
        Ok(bus)
    }

    pub(crate) fn local_queues(&self) -> &LocalQueues<LocalConsumer> {
        &self.inner.local
    }

    /// `host:port/vhost` of the broker (no credentials).
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// How many connections this bus has established: 1 after [`Bus::connect`], one
    /// more per reconnect.
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> &BusOptions {
        &self.inner.options
    }

    /// A new channel on the live connection (reconnecting first if it died). The
    /// caller owns it; dropping the last clone closes it.
    pub async fn open_channel(&self) -> Result<Channel, BusError> {
        let mut state = self.inner.state.lock().await;
        let connection = self.ensure_connected(&mut state).await?;
        let opening = async {
            connection
                .create_channel()
                .await
                .map_err(|e| BusError::amqp("opening a channel", e))
        };
        let answer = answered("opening a channel", opening).await;
        forget_if_unanswered(&mut state, answer)
    }

    /// Forgets the publishing channel if it is still `channel`: the next publish opens
    /// a fresh one.
    pub(crate) async fn discard_publish_channel(&self, channel: &Channel) {
        let mut state = self.inner.state.lock().await;
        if state
            .publisher
            .as_ref()
            .is_some_and(|current| current.id() == channel.id())
        {
            state.publisher = None;
        }
    }

    /// Whose turn it is to hand a message to lapin on the shared channel (see
    /// `Inner::send_turn`).
    pub(crate) async fn send_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.send_turn.lock().await
    }

    /// The shared confirm-mode channel used for publishing.
    pub(crate) async fn publish_channel(&self) -> Result<Channel, BusError> {
        let mut state = self.inner.state.lock().await;
        if let Some(channel) = &state.publisher {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let channel = self
            .open_confirm_channel(&mut state, "opening the publishing channel")
            .await?;
        state.publisher = Some(channel.clone());
        Ok(channel)
    }

    /// A confirm channel for one mandatory publish at a time. lapin hands a returned
    /// message to whichever pending confirm completes next (in a multiple ack, any of
    /// them), so a message that can be returned must be alone in flight on its channel
    /// for its return to reach it; leases keep up to `RETURNING_CHANNELS` of them in
    /// flight at once (the router forwards every command this way).
    pub(crate) async fn lease_returning_channel(&self) -> Result<Lease, BusError> {
        let slot = self
            .inner
            .returning_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BusError::NoAnswer {
                operation: "leasing a channel for a mandatory publish (closed)".to_owned(),
                waited: Duration::ZERO,
            })?;
        let mut state = self.inner.state.lock().await;
        while let Some(channel) = state.returning_idle.pop() {
            if channel.status().connected() {
                return Ok(Lease {
                    channel,
                    _slot: slot,
                });
            }
        }
        let channel = self
            .open_confirm_channel(&mut state, "opening a channel for mandatory publishes")
            .await?;
        Ok(Lease {
            channel,
            _slot: slot,
        })
    }

    /// Returns a leased channel for the next mandatory publish (`retire`: it is not to
    /// be used again).
    pub(crate) async fn give_back(&self, lease: Lease, retire: bool) {
        if !retire && lease.channel.status().connected() {
            self.inner
                .state
                .lock()
                .await
                .returning_idle
                .push(lease.channel);
        }
    }

    /// A new channel in confirm mode on the live connection.
    async fn open_confirm_channel(
        &self,
        state: &mut State,
        what: &'static str,
    ) -> Result<Channel, BusError> {
        let connection = self.ensure_connected(state).await?;
        let opening = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| BusError::amqp(what, e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| BusError::amqp("enabling publisher confirms", e))?;
            Ok(channel)
        };
        let answer = answered(what, opening).await;
        forget_if_unanswered(state, answer)
    }

    /// The live connection, re-opened with backoff (bounded by `connect_timeout`) and
    /// the topology re-declared if it died.
    async fn ensure_connected<'a>(&self, state: &'a mut State) -> Result<&'a Connection, BusError> {
        let alive = state
            .connection
            .as_ref()
            .is_some_and(|connection| connection.status().connected());
        if !alive {
            if state.connection.is_some() {
                warn!(endpoint = %self.inner.endpoint, "RabbitMQ connection lost; reconnecting");
            }
            state.forget_channels();
            state.connection = None;
            state.connection = Some(self.connect_with_backoff().await?);
        }
        match &state.connection {
            Some(connection) => Ok(connection),
            None => unreachable!("a connection was just stored"),
        }
    }

    async fn connect_with_backoff(&self) -> Result<Connection, BusError> {
        let timeout = self.inner.options.connect_timeout;
        let mut schedule = reconnect_schedule(timeout);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.connect_once_within(timeout).await {
                Ok(connection) => {
                    info!(endpoint = %self.inner.endpoint, attempt, "connected to RabbitMQ");
                    return Ok(connection);
                }
                Err(err) if !err.is_transient() => return Err(err),
                Err(err) => match schedule.next_backoff() {
                    Some(pause) => {
                        warn!(
                            endpoint = %self.inner.endpoint,
                            attempt,
                            error = %err,
                            retry_in = ?pause,
                            "cannot connect to RabbitMQ"
                        );
                        tokio::time::sleep(pause).await;
                    }
                    None => {
                        return Err(BusError::Connect {
                            endpoint: self.inner.endpoint.clone(),
                            waited: timeout,
                            source: Box::new(err),
                        })
                    }
                },
            }
        }
    }

    /// One attempt, bounded: a handshake the broker closes half-way may otherwise never
    /// answer, and this attempt holds the bus's connection state while it waits.
    async fn connect_once_within(&self, timeout: Duration) -> Result<Connection, BusError> {
        let limit = timeout.min(CONNECT_ATTEMPT_LIMIT);
        tokio::time::timeout(limit, self.connect_once())
            .await
            .unwrap_or_else(|_| {
                Err(BusError::NoAnswer {
                    operation: format!("connecting to {}", self.inner.endpoint),
                    waited: limit,
                })
            })
    }

    async fn connect_once(&self) -> Result<Connection, BusError> {
        let properties = ConnectionProperties::default().with_connection_name(LongString::from(
            self.inner.options.connection_name.as_bytes(),
        ));
        let connection = Connection::connect_uri(self.inner.uri.clone(), properties)
            .await
            .map_err(|e| BusError::amqp(format!("connecting to {}", self.inner.endpoint), e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| BusError::amqp("opening a channel", e))?;
        declare_topology(&channel).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        self.inner.connects.fetch_add(1, Ordering::Relaxed);
        Ok(connection)
    }
}

/// A request to the live connection, as [`answered`] saw it. A connection that did not
/// answer is dropped (its I/O loop may be gone while its status still says
/// connected), so the next request connects again.
fn forget_if_unanswered<T>(
    state: &mut State,
    answer: Result<Result<T, BusError>, BusError>,
) -> Result<T, BusError> {
    if answer.is_err() {
        warn!("RabbitMQ connection stopped answering; reconnecting");
        state.forget_channels();
        state.connection = None;
    }
    answer?
}

/// The longest one connection attempt (handshake, channel, topology) may take.
const CONNECT_ATTEMPT_LIMIT: Duration = Duration::from_secs(10);

/// Exponential backoff with jitter: 100 ms doubling up to 5 s, for `max_elapsed` in all.
pub(crate) fn reconnect_schedule(max_elapsed: Duration) -> ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(100))
        .with_multiplier(2.0)
        .with_randomization_factor(0.3)
        .with_max_interval(Duration::from_secs(5))
        .with_max_elapsed_time(Some(max_elapsed))
        .build()
}
