//! The imperative shell around a pure decision: read the stream, fold, decide, append
//! with the expected version; on a concurrency conflict, read again and decide again.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use domain::{derive_event_id, DomainEvent, Evolve, OrderState, ShipmentState};
use eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent, StoreError, StreamAppend};
use tracing::debug;
use uuid::Uuid;

use crate::generations::Generations;
use crate::snapshots::Snapshots;
use crate::timers::Handover;
use crate::ServiceError;

/// Conflicts are retried at once, this many times, before the message is retried later.
const MAX_CONFLICT_RETRIES: usize = 20;

/// Who decided, in reaction to what. Event ids derive from it, so handling the same
/// message twice produces the same ids and the log refuses the second copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub causation_id: Uuid,
    pub correlation_id: Uuid,
    /// Names the decision point (e.g. `inventory.reserve.2`): one message may cause
    /// several independent decisions, each with its own ids.
    pub handler: String,
}

impl Cause {
    pub fn new(causation_id: Uuid, correlation_id: Uuid, handler: impl Into<String>) -> Cause {
        Cause {
            causation_id,
            correlation_id,
            handler: handler.into(),
        }
    }

    /// The same cause for another decision point.
    pub fn for_handler(&self, handler: impl Into<String>) -> Cause {
        Cause {
            handler: handler.into(),
            ..self.clone()
        }
    }

    fn metadata(&self) -> Metadata {
        Metadata {
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
        }
    }

    /// The id of the event at `index` of what this cause appends.
    pub fn event_id(&self, index: usize) -> Uuid {
        derive_event_id(self.causation_id, &self.handler, index)
    }

    /// The events of a decision, ready to append (ids numbered from `first_index`).
    pub fn new_events(&self, events: &[DomainEvent], first_index: usize) -> Vec<NewEvent> {
        events
            .iter()
            .enumerate()
            .map(|(i, event)| NewEvent {
                event_id: self.event_id(first_index + i),
                event_type: event.event_type().to_owned(),
                schema_version: event.schema_version(),
                payload: event.to_payload(),
                metadata: self.metadata(),
            })
            .collect()
    }
}

/// What became of a decision. The state is shared: decisions appended together (see
/// [`decide_together_on_cached`]) share the state after their append instead of each
/// cloning the state after its own events, which for a hot stock stream (every open
/// reservation of the SKU) was a copy per decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Decided<S> {
    /// The events were appended; the state after the append that carried them.
    Appended {
        events: Vec<DomainEvent>,
        state: Arc<S>,
    },
    /// The decision had no effect (no events), or the same message was handled before.
    Nothing { state: Arc<S> },
}

impl<S> Decided<S> {
    pub fn state(&self) -> &S {
        match self {
            Decided::Appended { state, .. } | Decided::Nothing { state } => state,
        }
    }

    pub fn events(&self) -> &[DomainEvent] {
        match self {
            Decided::Appended { events, .. } => events,
            Decided::Nothing { .. } => &[],
        }
    }
}

/// A stream folded into its state, with the version the next append must expect.
pub struct Loaded<S> {
    pub state: S,
    pub version: Option<i64>,
}

pub fn expected(version: Option<i64>) -> ExpectedVersion {
    version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
}

/// Folded stream states kept between messages, so that a long stream (a popular SKU)
/// is not read from its start for every message. Never stale: every use reads the
/// events after the cached version first (one indexed query), so the cache only saves
/// the fold of what was seen before. Bounded: when full it forgets the streams used
/// longest ago, about half of them at a time ([`Generations`]).
///
/// It also serialises decisions on one stream within this process (striped locks), so
/// that concurrent messages for a hot stream queue up here instead of racing each other
/// into optimistic-concurrency conflicts; other processes still meet them as conflicts.
pub struct StreamCache<S> {
    entries: Mutex<Generations<(S, Option<i64>)>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// How many times a stream was read from the log through this cache.
    reads: AtomicU64,
    /// Decisions waiting for their stream's turn ([`decide_together_on_cached`]).
    waiting: Mutex<HashMap<String, Vec<Waiting<S>>>>,
    /// Where a stream not in the cache starts from, and what it leaves for the next
    /// process (long streams only: [`crate::snapshots`]).
    snapshots: Option<Snapshots<S>>,
}

/// A decision's rule, boxed so that whoever holds the stream's turn can decide it.
type Rule<S> = Box<dyn Fn(&S) -> Vec<DomainEvent> + Send>;

/// A decision waiting for its stream's turn, and where its outcome goes: what was
/// decided, or its rule back when it is to be decided alone.
struct Waiting<S> {
    cause: Cause,
    rule: Rule<S>,
    done: tokio::sync::oneshot::Sender<Result<Decided<S>, Rule<S>>>,
}

/// Lock stripes per cache: streams hash onto them. Unrelated streams that share a
/// stripe wait for each other, so there are several times more stripes than decisions
/// in flight at once (the order cache serves the intake, the saga and shipping).
const STRIPES: usize = 256;

/// Order streams kept folded at once (a few KiB each).
const CACHED_ORDERS: usize = 10_000;

/// Shipment streams kept folded at once (a few hundred bytes each).
const CACHED_SHIPMENTS: usize = 10_000;

/// The folded streams that several workers of one process decide on, shared between
/// them: the saga decides on the order state the intake left, shipping on the saga's,
/// the delivery timer on the shipment shipping started. Each would otherwise read the
/// stream from the log at its first message about an order, because the one before it
/// ran in another worker. Workers in other processes still meet each other's appends
/// as conflicts, as they always did. Shipping also hands the delivery timers it sets
/// to the process's scheduler through it ([`Handover`]).
#[derive(Clone)]
pub struct SharedCaches {
    pub orders: Arc<StreamCache<OrderState>>,
    pub shipments: Arc<StreamCache<ShipmentState>>,
    pub timers: Handover,
}

impl Default for SharedCaches {
    fn default() -> SharedCaches {
        SharedCaches {
            orders: Arc::new(StreamCache::new(CACHED_ORDERS)),
            shipments: Arc::new(StreamCache::new(CACHED_SHIPMENTS)),
            timers: Handover::default(),
        }
    }
}

impl<S: Clone> StreamCache<S> {
    pub fn new(capacity: usize) -> StreamCache<S> {
        StreamCache {
            entries: Mutex::new(Generations::new(capacity)),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            reads: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            snapshots: None,
        }
    }

    /// A cache whose streams start from their snapshot when they are not cached, and
    /// leave one every [`crate::snapshots::SNAPSHOT_EVERY`] events.
    pub fn with_snapshots(capacity: usize, snapshots: Snapshots<S>) -> StreamCache<S> {
        StreamCache {
            snapshots: Some(snapshots),
            ..StreamCache::new(capacity)
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Waiting<S>>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many times a stream was read from the log through this cache (a decision
    /// on a cached state reads nothing).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Holds the stream's stripe: one decision at a time per stream in this process.
    pub(crate) async fn serialise(&self, stream: &str) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        stream.hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % STRIPES as u64).unwrap_or(0);
        match self.stripes.get(index) {
            Some(stripe) => Some(stripe.lock().await),
            None => None,
        }
    }

    /// For a stream the caller expects to be new (the decision about to be made is
    /// normally its first): the next [`decide_on_cached`] decides on the empty state
    /// without reading. A stream that exists after all is refused as a conflict on
    /// append, then read; a stream already cached is left as it is.
    pub fn assume_new(&self, stream: &str)
    where
        S: Default,
    {
        let mut entries = self.lock();
        if entries.contains_key(stream) {
            return;
        }
        entries.insert(stream.to_owned(), (S::default(), None));
    }

    /// The cached state of `stream`, if any, and its version.
    pub fn cached(&self, stream: &str) -> Option<(S, Option<i64>)> {
        self.lock().get(stream).cloned()
    }

    pub(crate) fn put(&self, stream: &str, state: &S, version: Option<i64>) {
        self.lock()
            .insert(stream.to_owned(), (state.clone(), version));
    }

    /// Keeps `state`, the stream folded to `version` (read or just appended), and
    /// snapshots it when that is due.
    async fn settle(&self, store: &EventStore, stream: &str, state: &S, version: Option<i64>) {
        self.put(stream, state, version);
        if let (Some(snapshots), Some(version)) = (&self.snapshots, version) {
            snapshots.take_if_due(store, stream, state, version).await;
        }
    }

    /// Where a stream that is not cached starts: its snapshot, else its beginning.
    async fn start_of(
        &self,
        store: &EventStore,
        stream: &str,
    ) -> Result<(S, Option<i64>), ServiceError>
    where
        S: Default,
    {
        if let Some(snapshots) = &self.snapshots {
            if let Some((state, version)) = snapshots.load(store, stream).await? {
                return Ok((state, Some(version)));
            }
        }
        Ok((S::default(), None))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations<(S, Option<i64>)>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads and folds a stream.
pub async fn load<S: Evolve>(store: &EventStore, stream: &str) -> Result<Loaded<S>, ServiceError> {
    fold_from(store, stream, S::default(), None).await
}

/// Reads and folds a stream, starting from the cached state when there is one, else
/// from the stream's snapshot when the cache keeps them.
pub async fn load_cached<S: Evolve + Clone>(
    store: &EventStore,
    cache: &StreamCache<S>,
    stream: &str,
) -> Result<Loaded<S>, ServiceError> {
    let (state, version) = match cache.cached(stream) {
        Some(cached) => cached,
        None => cache.start_of(store, stream).await?,
    };
    cache.reads.fetch_add(1, Ordering::Relaxed);
    let loaded = fold_from(store, stream, state, version).await?;
    cache
        .settle(store, stream, &loaded.state, loaded.version)
        .await;
    Ok(loaded)
}

/// Events a fold reads at a time: a stream folded from far back (no cached state, no
/// snapshot) is read in pages, so its length does not set the memory used.
const FOLD_PAGE: i64 = 1_000;

/// Folds the events after `version` into `state`.
async fn fold_from<S: Evolve>(
    store: &EventStore,
    stream: &str,
    mut state: S,
    mut version: Option<i64>,
) -> Result<Loaded<S>, ServiceError> {
    let mut pages = store.stream_pages(stream, version.map_or(0, |v| v + 1), FOLD_PAGE);
    while let Some(records) = pages.next().await? {
        for rec in &records {
            let event = DomainEvent::decode(&rec.event_type, rec.schema_version, &rec.payload)
                .map_err(|e| ServiceError::CorruptStream {
                    stream: stream.to_owned(),
                    reason: e.to_string(),
                })?;
            state.apply(&event);
            version = Some(rec.stream_version);
        }
    }
    Ok(Loaded { state, version })
}

/// Like [`decide_on`], deciding on the cached state when there is one, without
/// reading the stream first: the append expects the cached version, so a stream that
/// moved on elsewhere (another process, another cache) is refused as a conflict, and
/// only then read and decided again. A cached state is a prefix of the stream, never
/// ahead of it; a decision of "nothing" on it could miss what the newer events would
/// make due, so it is confirmed on a read before it counts. In the common case (this
/// process wrote the stream last) a decision costs one statement, the append.
pub async fn decide_on_cached<S, F>(
    store: &EventStore,
    cache: &StreamCache<S>,
    stream: &str,
    cause: &Cause,
    decide: F,
) -> Result<Decided<S>, ServiceError>
where
    S: Evolve + Clone,
    F: Fn(&S) -> Vec<DomainEvent>,
{
    let _turn = cache.serialise(stream).await;
    decide_in_turn(store, cache, stream, cause, decide).await
}

/// [`decide_on_cached`] for a caller that holds the stream's turn.
async fn decide_in_turn<S, F>(
    store: &EventStore,
    cache: &StreamCache<S>,
    stream: &str,
    cause: &Cause,
    decide: F,
) -> Result<Decided<S>, ServiceError>
where
    S: Evolve + Clone,
    F: Fn(&S) -> Vec<DomainEvent>,
{
    let mut must_read = false;
    for attempt in 0..MAX_CONFLICT_RETRIES {
        let (mut state, mut version, read) =
            cached_or_read(store, cache, stream, must_read).await?;
        let mut events = decide(&state);
        if events.is_empty() && !read {
            let loaded = load_cached(store, cache, stream).await?;
            (state, version) = (loaded.state, loaded.version);
            events = decide(&state);
        }
        if events.is_empty() {
            return Ok(Decided::Nothing {
                state: Arc::new(state),
            });
        }
        match append_decision(store, stream, cause, version, state, events).await? {
            Attempt::Appended {
                events,
                state,
                version,
            } => {
                cache.settle(store, stream, &state, Some(version)).await;
                return Ok(Decided::Appended {
                    events,
                    state: Arc::new(state),
                });
            }
            Attempt::Duplicate => {
                let Loaded { state, .. } = load_cached(store, cache, stream).await?;
                return Ok(Decided::Nothing {
                    state: Arc::new(state),
                });
            }
            Attempt::Conflict => {
                must_read = true;
                thin_out(attempt).await;
            }
        }
    }
    Err(ServiceError::Contended {
        stream: stream.to_owned(),
    })
}

/// Like [`decide_on_cached`], for a hot stream: the decisions that queue for the
/// stream's turn while another holds it are decided together by the next holder, in
/// the order they queued, each on the state the ones before it leave, and appended in
/// one append (each with the event ids of its own cause, as alone). A stream takes
/// one commit per turn instead of one per decision, which is what bounds a stream
/// many orders reserve on. Whatever is not plainly appended together (a decision of
/// nothing, which must be confirmed on a read; a conflict; a duplicate; an error) is
/// handed back and decided alone, exactly as [`decide_on_cached`] decides it.
pub async fn decide_together_on_cached<S, F>(
    store: &EventStore,
    cache: &StreamCache<S>,
    stream: &str,
    cause: &Cause,
    rule: F,
) -> Result<Decided<S>, ServiceError>
where
    S: Evolve + Clone + Send + 'static,
    F: Fn(&S) -> Vec<DomainEvent> + Send + 'static,
{
    let (done, mut outcome) = tokio::sync::oneshot::channel();
    cache
        .waiting()
        .entry(stream.to_owned())
        .or_default()
        .push(Waiting {
            cause: cause.clone(),
            rule: Box::new(rule),
            done,
        });
    let _turn = cache.serialise(stream).await;
    let queued = cache.waiting().remove(stream).unwrap_or_default();
    decide_queued(store, cache, stream, queued).await;
    // Whoever took this decision from the queue (this task just now, or the holder
    // before it) answered it before giving up the turn. One handed back is decided
    // in this same turn.
    match outcome.try_recv() {
        Ok(Ok(decided)) => Ok(decided),
        Ok(Err(rule)) => decide_in_turn(store, cache, stream, cause, rule).await,
        Err(_) => Err(ServiceError::BatchedWrite(
            "the holder of the stream's turn stopped before it decided".to_owned(),
        )),
    }
}

/// Decides the queued decisions on the cached state and appends them together; hands
/// back those it does not append (see [`decide_together_on_cached`]). The caller
/// holds the stream's turn.
async fn decide_queued<S: Evolve + Clone>(
    store: &EventStore,
    cache: &StreamCache<S>,
    stream: &str,
    queued: Vec<Waiting<S>>,
) {
    let hand_back = |waiting: Waiting<S>| {
        let _ = waiting.done.send(Err(waiting.rule));
    };
    let cached = match cache.cached(stream) {
        Some(cached) if queued.len() > 1 => cached,
        // One decision, or no cached state: deciding alone costs the same.
        _ => return queued.into_iter().for_each(hand_back),
    };
    let (mut state, version) = cached;
    let mut together = Vec::new();
    let mut alone = Vec::new();
    let mut new_events = Vec::new();
    for waiting in queued {
        let events = (waiting.rule)(&state);
        if events.is_empty() {
            alone.push(waiting);
            continue;
        }
        new_events.extend(waiting.cause.new_events(&events, 0));
        for event in &events {
            state.apply(event);
        }
        together.push((waiting, events));
    }
    if !together.is_empty() {
        let count = new_events.len();
        match store.append(stream, expected(version), new_events).await {
            Ok(appended) => {
                crate::metrics::events_appended(count);
                cache
                    .settle(store, stream, &state, Some(appended.next_expected_version))
                    .await;
                let state = Arc::new(state);
                for (waiting, events) in together {
                    let state = Arc::clone(&state);
                    let _ = waiting.done.send(Ok(Decided::Appended { events, state }));
                }
            }
            Err(error) => {
                debug!(%error, stream, "decisions appended together were refused; each is decided alone");
                together
                    .into_iter()
                    .for_each(|(waiting, _)| hand_back(waiting));
            }
        }
    }
    alone.into_iter().for_each(hand_back);
}

/// The cached state of `stream` and its version, or (with `must_read`, or when nothing
/// is cached) the stream read from the log; and whether it was read.
pub(crate) async fn cached_or_read<S: Evolve + Clone>(
    store: &EventStore,
    cache: &StreamCache<S>,
    stream: &str,
    must_read: bool,
) -> Result<(S, Option<i64>, bool), ServiceError> {
    if !must_read {
        if let Some((state, version)) = cache.cached(stream) {
            return Ok((state, version, false));
        }
    }
    let loaded = load_cached(store, cache, stream).await?;
    Ok((loaded.state, loaded.version, true))
}

/// Folds `stream`, asks `decide`, appends what it decided; retries on conflicts.
pub async fn decide_on<S, F>(
    store: &EventStore,
    stream: &str,
    cause: &Cause,
    decide: F,
) -> Result<Decided<S>, ServiceError>
where
    S: Evolve,
    F: Fn(&S) -> Vec<DomainEvent>,
{
    decide_with(store, stream, cause, decide, || load::<S>(store, stream)).await
}

async fn decide_with<S, F, L, Fut>(
    store: &EventStore,
    stream: &str,
    cause: &Cause,
    decide: F,
    load_state: L,
) -> Result<Decided<S>, ServiceError>
where
    S: Evolve,
    F: Fn(&S) -> Vec<DomainEvent>,
    L: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Loaded<S>, ServiceError>>,
{
    for attempt in 0..MAX_CONFLICT_RETRIES {
        let Loaded { state, version } = load_state().await?;
        let events = decide(&state);
        if events.is_empty() {
            return Ok(Decided::Nothing {
                state: Arc::new(state),
            });
        }
        match append_decision(store, stream, cause, version, state, events).await? {
            Attempt::Appended { events, state, .. } => {
                return Ok(Decided::Appended {
                    events,
                    state: Arc::new(state),
                })
            }
            Attempt::Duplicate => {
                let Loaded { state, .. } = load_state().await?;
                return Ok(Decided::Nothing {
                    state: Arc::new(state),
                });
            }
            Attempt::Conflict => thin_out(attempt).await,
        }
    }
    Err(ServiceError::Contended {
        stream: stream.to_owned(),
    })
}

/// What became of one attempt to append a decision.
enum Attempt<S> {
    /// Appended; the state after the events and the stream's new version.
    Appended {
        events: Vec<DomainEvent>,
        state: S,
        version: i64,
    },
    /// The same message was handled before (its event ids are in the log).
    Duplicate,
    /// The stream is no longer at the version the decision was made on.
    Conflict,
}

/// Appends `events`, decided on `state` at `version`.
async fn append_decision<S: Evolve>(
    store: &EventStore,
    stream: &str,
    cause: &Cause,
    version: Option<i64>,
    mut state: S,
    events: Vec<DomainEvent>,
) -> Result<Attempt<S>, ServiceError> {
    match store
        .append(stream, expected(version), cause.new_events(&events, 0))
        .await
    {
        Ok(appended) => {
            crate::metrics::events_appended(events.len());
            for e in &events {
                state.apply(e);
            }
            Ok(Attempt::Appended {
                events,
                state,
                version: appended.next_expected_version,
            })
        }
        Err(StoreError::Duplicate { event_id }) => {
            debug!(%event_id, stream, "already handled; nothing more to do");
            Ok(Attempt::Duplicate)
        }
        Err(StoreError::Conflict { .. }) => Ok(Attempt::Conflict),
        Err(other) => Err(other.into()),
    }
}

/// After a conflict: another writer won; let the crowd thin out before reading again.
async fn thin_out(attempt: usize) {
    let pause = rand::random_range(0..=attempt.min(10) as u64 * 2);
    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
}

/// Appends to several streams atomically (each with its expected version).
pub async fn append_together(
    store: &EventStore,
    cause: &Cause,
    parts: Vec<(String, Option<i64>, Vec<DomainEvent>)>,
) -> Result<bool, ServiceError> {
    let mut index = 0;
    let count: usize = parts.iter().map(|(_, _, events)| events.len()).sum();
    let appends = parts
        .into_iter()
        .map(|(stream_name, version, events)| {
            let new = cause.new_events(&events, index);
            index += events.len();
            StreamAppend {
                stream_name,
                expected_version: expected(version),
                events: new,
            }
        })
        .collect();
    match store.append_batch(appends).await {
        Ok(_) => {
            crate::metrics::events_appended(count);
            Ok(true)
        }
        Err(StoreError::Duplicate { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
