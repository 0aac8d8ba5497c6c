//! In-process hand-off (ADR 0005, "The hand-off in process"): a message a router
//! forwards to a queue that this very process consumes goes straight to that consumer's
//! lanes instead of through the broker, saving a publish, its confirm, a delivery and
//! its ack. Nothing is acked before its handler finished: the handed-over message is
//! still the router's delivery, acked by the consumer's lane when the handler is done.
//!
//! What must not change is the order of one key's messages. A queue may still hold
//! messages forwarded before (by this process before it consumed the queue, or by
//! another process's router); a message handed over before those were delivered would
//! overtake them. So each consumed queue has a [`Gate`]:
//! - `Closed`: forwards are published to the queue, as without hand-off;
//! - `Draining(marker)`: the consumer has published a marker to its own queue after
//!   every forward in flight was confirmed; forwards wait (publishing them now would
//!   put them behind the marker, handing them over would overtake the queue);
//! - `Open`: the marker came back, so everything queued before it is in the lanes, in
//!   queue order; forwards are handed over, behind it.
//!
//! A forwarder that starts (a router taking over the intake) re-drains every open
//! gate, since the router before it, in another process, may have queued messages.
//! A consumer that loses its channel bumps the gate's generation: messages handed over
//! before then are published to the queue when their turn comes (behind what the
//! broker requeued), and the next marker waits for them.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// Handed-over messages in flight per consumer, at most: far more than a router's
/// prefetch, so the bound is the router's, never this one.
pub(crate) const IN_FLIGHT_LIMIT: u32 = 1 << 16;

/// The AMQP `type` of a hand-off marker; its `message_id` is the marker.
pub const MARKER_TYPE: &str = "orderflow.hand-off-marker";

/// Every queue of this process that a consumer may take forwarded messages for.
pub(crate) struct LocalQueues<S> {
    gates: Mutex<HashMap<String, Arc<Gate<S>>>>,
    /// Names this process's markers, so that a consumer of another process that
    /// receives one sends it on.
    id: Uuid,
}

impl<S> Default for LocalQueues<S> {
    fn default() -> Self {
        LocalQueues {
            gates: Mutex::new(HashMap::new()),
            id: Uuid::new_v4(),
        }
    }
}

impl<S> LocalQueues<S> {
    pub(crate) fn id(&self) -> Uuid {
        self.id
    }

    /// The gate of `queue` (closed until a consumer installs itself).
    pub(crate) fn gate(&self, queue: &str) -> Arc<Gate<S>> {
        let mut gates = lock(&self.gates);
        // Looked up on every forward: the queue's name is copied only the first time.
        if let Some(gate) = gates.get(queue) {
            return gate.clone();
        }
        let gate = Arc::new(Gate::new(queue));
        gates.insert(queue.to_owned(), gate.clone());
        gate
    }

    /// Gates with a consumer behind them.
    pub(crate) fn consumed(&self) -> Vec<Arc<Gate<S>>> {
        lock(&self.gates)
            .values()
            .filter(|gate| lock(&gate.state).sink.is_some())
            .cloned()
            .collect()
    }
}

/// One queue's gate: see the module's documentation.
pub(crate) struct Gate<S> {
    queue: String,
    state: Mutex<State<S>>,
    changed: Notify,
}

struct State<S> {
    mode: Mode,
    sink: Option<Arc<Sink<S>>>,
    generation: u64,
    publishing: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Closed,
    Draining(Uuid),
    Open,
}

/// The consumer behind an open gate, and the handed-over messages it has in flight.
pub(crate) struct Sink<S> {
    pub(crate) consumer: S,
    in_flight: Arc<Semaphore>,
}

impl<S> Sink<S> {
    pub(crate) fn new(consumer: S) -> Self {
        Sink {
            consumer,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_LIMIT as usize)),
        }
    }

    /// Waits until every message handed over to this consumer is settled.
    pub(crate) async fn settled(&self) {
        let _ = self.in_flight.acquire_many(IN_FLIGHT_LIMIT).await;
    }
}

/// What a forward does now.
pub(crate) enum Entry<S> {
    /// Hand it to this consumer; the permit counts it in flight until dropped.
    HandOver(HandedOver<S>),
    /// Publish it; the guard counts the publish until its confirm.
    Publish(Publishing<S>),
    /// This marker is on its way: wait for the gate to change.
    Wait(Uuid),
    /// The consumer has [`IN_FLIGHT_LIMIT`] hand-offs in flight (never in practice):
    /// wait for one to finish, then enter again.
    Full(Arc<Semaphore>),
}

/// A message handed over: the consumer it went to, and the gate's generation then.
pub(crate) struct HandedOver<S> {
    pub(crate) gate: Arc<Gate<S>>,
    pub(crate) sink: Arc<Sink<S>>,
    generation: u64,
    _in_flight: OwnedSemaphorePermit,
    /// Dropped with the message once it is settled, which wakes [`HandedOver::settled`].
    settled: Option<oneshot::Sender<()>>,
}

impl<S> HandedOver<S> {
    /// Resolves once the message is settled (handled and acknowledged, or returned).
    pub(crate) fn settled(&mut self) -> impl std::future::Future<Output = ()> {
        let (settled, done) = oneshot::channel();
        self.settled = Some(settled);
        async move {
            let _ = done.await;
        }
    }

    /// The consumer lost its channel since: the message must go through the queue.
    pub(crate) fn is_stale(&self) -> bool {
        lock(&self.gate.state).generation != self.generation
    }
}

/// A forward being published to the queue (a marker waits for it).
pub(crate) struct Publishing<S>(Arc<Gate<S>>);

impl<S> Drop for Publishing<S> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.publishing = state.publishing.saturating_sub(1);
        if state.publishing == 0 {
            self.0.changed.notify_waiters();
        }
    }
}

impl<S> Gate<S> {
    fn new(queue: &str) -> Self {
        Gate {
            queue: queue.to_owned(),
            state: Mutex::new(State {
                mode: Mode::Closed,
                sink: None,
                generation: 0,
                publishing: 0,
            }),
            changed: Notify::new(),
        }
    }

    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// What a forward to this queue does now.
    pub(crate) fn enter(self: &Arc<Self>) -> Entry<S> {
        let mut state = lock(&self.state);
        match (state.mode, state.sink.clone()) {
            (Mode::Open, Some(sink)) => match sink.in_flight.clone().try_acquire_owned() {
                Ok(permit) => Entry::HandOver(HandedOver {
                    gate: self.clone(),
                    sink,
                    generation: state.generation,
                    _in_flight: permit,
                    settled: None,
                }),
                Err(_) => Entry::Full(sink.in_flight.clone()),
            },
            (Mode::Draining(marker), Some(_)) => Entry::Wait(marker),
            _ => {
                state.publishing += 1;
                Entry::Publish(Publishing(self.clone()))
            }
        }
    }

    /// Whether a forward now would be handed over.
    pub(crate) fn is_open(&self) -> bool {
        let state = lock(&self.state);
        state.mode == Mode::Open && state.sink.is_some()
    }

    /// Resolves when the gate changes after this call (create it before looking).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// A consumer of the queue starts: forwards wait from now on, and the marker
    /// returned is to be published once [`Gate::quiet`] resolves.
    pub(crate) fn install(&self, sink: Arc<Sink<S>>) -> Uuid {
        let marker = Uuid::new_v4();
        let mut state = lock(&self.state);
        state.mode = Mode::Draining(marker);
        state.sink = Some(sink);
        self.changed.notify_waiters();
        marker
    }

    /// A forwarder starts: an open gate drains again (see the module's documentation).
    /// The marker returned is to be published once [`Gate::quiet`] resolves.
    pub(crate) fn redrain(&self) -> Option<Uuid> {
        let mut state = lock(&self.state);
        state.sink.as_ref()?;
        let marker = Uuid::new_v4();
        state.mode = Mode::Draining(marker);
        self.changed.notify_waiters();
        Some(marker)
    }

    /// Resolves once no forward is being published to the queue.
    pub(crate) async fn quiet(&self) {
        loop {
            let changed = self.changed();
            if lock(&self.state).publishing == 0 {
                return;
            }
            changed.await;
        }
    }

    /// The consumer received `marker`: open, if it is the one awaited.
    pub(crate) fn arrived(&self, marker: Uuid) -> bool {
        let mut state = lock(&self.state);
        if state.mode != Mode::Draining(marker) {
            return false;
        }
        state.mode = Mode::Open;
        self.changed.notify_waiters();
        true
    }

    /// The marker could not be sent, or did not come back in time: forwards are
    /// published until the next drain.
    pub(crate) fn abandon(&self, marker: Uuid) {
        let mut state = lock(&self.state);
        if state.mode == Mode::Draining(marker) {
            state.mode = Mode::Closed;
            self.changed.notify_waiters();
        }
    }

    /// The consumer stops (`lost`: its channel died, and what it had is requeued).
    /// Returns its sink, to wait for what was handed over to it.
    pub(crate) fn close(&self, lost: bool) -> Option<Arc<Sink<S>>> {
        let mut state = lock(&self.state);
        state.mode = Mode::Closed;
        if lost {
            state.generation += 1;
        }
        self.changed.notify_waiters();
        state.sink.take()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here only assigns fields: a panic cannot leave one half done.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Arc<Gate<()>> {
        LocalQueues::default().gate("q")
    }

    fn is_publish(entry: &Entry<()>) -> bool {
        matches!(entry, Entry::Publish(_))
    }

    #[tokio::test]
    async fn forwards_are_published_until_the_marker_sent_after_them_comes_back() {
        let gate = gate();
        let before = gate.enter();
        assert!(is_publish(&before), "no consumer: published");
        let marker = gate.install(Arc::new(Sink::new(())));
        assert!(
            matches!(gate.enter(), Entry::Wait(_)),
            "draining: forwards wait"
        );
        let quiet = gate.quiet();
        futures::pin_mut!(quiet);
        assert!(
            futures::poll!(quiet.as_mut()).is_pending(),
            "the marker waits for the publish in flight"
        );
        drop(before);
        assert!(futures::poll!(quiet).is_ready());
        assert!(
            !gate.arrived(Uuid::new_v4()),
            "another marker opens nothing"
        );
        assert!(gate.arrived(marker));
        assert!(matches!(gate.enter(), Entry::HandOver(_)));
    }

    #[tokio::test]
    async fn a_lost_consumer_makes_what_was_handed_over_stale_and_closes_the_gate() {
        let gate = gate();
        let marker = gate.install(Arc::new(Sink::new(())));
        gate.arrived(marker);
        let Entry::HandOver(handed) = gate.enter() else {
            panic!("an open gate hands over");
        };
        assert!(!handed.is_stale());
        let sink = gate.close(true);
        assert!(sink.is_some());
        assert!(handed.is_stale(), "requeued messages now come first");
        let mut handed = handed;
        let settled = handed.settled();
        futures::pin_mut!(settled);
        assert!(futures::poll!(settled.as_mut()).is_pending());
        drop(handed);
        assert!(
            futures::poll!(settled).is_ready(),
            "the forwarder goes on once the message is settled"
        );
        assert!(is_publish(&gate.enter()));
        assert!(gate.redrain().is_none(), "no consumer: nothing to drain");
    }

    #[tokio::test]
    async fn a_stopped_consumer_keeps_what_was_handed_over_and_a_new_forwarder_drains_again() {
        let gate = gate();
        let first = gate.install(Arc::new(Sink::new(())));
        gate.arrived(first);
        let redrained = gate.redrain();
        assert!(matches!(gate.enter(), Entry::Wait(_)));
        assert!(!gate.arrived(first), "the old marker no longer opens");
        let Some(marker) = redrained else {
            panic!("a consumed gate drains again");
        };
        gate.abandon(marker);
        assert!(is_publish(&gate.enter()), "an abandoned drain publishes");
        let marker = gate.install(Arc::new(Sink::new(())));
        gate.arrived(marker);
        let Entry::HandOver(handed) = gate.enter() else {
            panic!("open again");
        };
        let sink = gate.close(false);
        assert!(
            !handed.is_stale(),
            "a clean stop settles what it was handed"
        );
        let settled = sink.map(|s| async move { s.settled().await });
        let Some(settled) = settled else {
            panic!("the sink comes back");
        };
        futures::pin_mut!(settled);
        assert!(futures::poll!(settled.as_mut()).is_pending());
        drop(handed);
        assert!(futures::poll!(settled).is_ready());
    }
}
