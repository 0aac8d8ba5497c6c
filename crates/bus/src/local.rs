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
//! A consumer that starts leaves its gate closed until its queue has no message ready
//! (and nothing offered to it is unsettled), then drains it: the marker then passes an
//! empty queue, and a forward waits for it only a moment, never for a backlog.
//! A forwarder that starts (a router taking over the intake, a relay taking over) closes
//! every open gate the same way, since the one before it, in another process, may have
//! queued messages. Messages offered (by the relay) that a consumer has not settled are
//! bounded by its prefetch, as the broker bounds deliveries: past that, the gate closes
//! and offers are published to the queue until the consumer has caught up.
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

/// Offered messages a consumer may hold unsettled, per message of its prefetch: a
/// consumer in a burst keeps more than its prefetch in its lanes (with 1×, bursts at
/// 0.5 scale went 839 → 714 orders/s: the relay waited on the busiest service while the
/// others ran dry), and a few thousand events are a few megabytes.
pub(crate) const OFFERS_PER_PREFETCH: u32 = 8;

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
    /// A task waits for the queue to be idle to drain it ([`Gate::to_reopen`]).
    reopening: bool,
}

impl<S> State<S> {
    fn serves(&self, sink: &Arc<Sink<S>>) -> bool {
        self.sink.as_ref().is_some_and(|now| Arc::ptr_eq(now, sink))
    }
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
    /// Of those, the offered ones, at most `offer_limit`.
    offered: Arc<Semaphore>,
    offer_limit: u32,
}

impl<S> Sink<S> {
    /// `prefetch`: the consumer's; it may hold [`OFFERS_PER_PREFETCH`] times as many
    /// offered messages unsettled.
    pub(crate) fn new(consumer: S, prefetch: u16) -> Self {
        let offer_limit = u32::from(prefetch.max(1)) * OFFERS_PER_PREFETCH;
        Sink {
            consumer,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_LIMIT as usize)),
            offered: Arc::new(Semaphore::new(offer_limit as usize)),
            offer_limit,
        }
    }

    /// Waits until every message handed over to this consumer is settled.
    pub(crate) async fn settled(&self) {
        let _ = self.in_flight.acquire_many(IN_FLIGHT_LIMIT).await;
    }

    /// Waits until every message offered to this consumer is settled.
    pub(crate) async fn offers_settled(&self) {
        let _ = self.offered.acquire_many(self.offer_limit).await;
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
    /// An offer found the consumer with its offer limit reached: wait for it to
    /// settle one, or, if it does not soon, publish ([`Gate::overflow`]).
    Busy(Arc<Semaphore>),
}

/// A message handed over: the consumer it went to, and the gate's generation then.
pub(crate) struct HandedOver<S> {
    pub(crate) gate: Arc<Gate<S>>,
    pub(crate) sink: Arc<Sink<S>>,
    generation: u64,
    _in_flight: OwnedSemaphorePermit,
    /// An offered message's share of the offer limit.
    _offered: Option<OwnedSemaphorePermit>,
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
                reopening: false,
            }),
            changed: Notify::new(),
        }
    }

    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// What a forward to this queue does now.
    pub(crate) fn enter(self: &Arc<Self>) -> Entry<S> {
        self.enter_with(false)
    }

    /// What an offer to this queue does now: as a forward, within the offer limit.
    pub(crate) fn enter_offer(self: &Arc<Self>) -> Entry<S> {
        self.enter_with(true)
    }

    fn enter_with(self: &Arc<Self>, offer: bool) -> Entry<S> {
        let mut state = lock(&self.state);
        match (state.mode, state.sink.clone()) {
            (Mode::Open, Some(sink)) => {
                let offered = if offer {
                    match sink.offered.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => return Entry::Busy(sink.offered.clone()),
                    }
                } else {
                    None
                };
                match sink.in_flight.clone().try_acquire_owned() {
                    Ok(permit) => Entry::HandOver(HandedOver {
                        gate: self.clone(),
                        sink,
                        generation: state.generation,
                        _in_flight: permit,
                        _offered: offered,
                        settled: None,
                    }),
                    Err(_) => Entry::Full(sink.in_flight.clone()),
                }
            }
            (Mode::Draining(marker), Some(_)) => Entry::Wait(marker),
            _ => Entry::Publish(self.publishing(&mut state)),
        }
    }

    /// Counts one more publish to the queue, until the guard is dropped.
    fn publishing(self: &Arc<Self>, state: &mut State<S>) -> Publishing<S> {
        state.publishing += 1;
        Publishing(self.clone())
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

    /// A consumer of the queue starts: forwards are published until it is reopened.
    pub(crate) fn install(&self, sink: Arc<Sink<S>>) {
        let mut state = lock(&self.state);
        state.mode = Mode::Closed;
        state.sink = Some(sink);
        self.changed.notify_waiters();
    }

    /// A forwarder starts: a consumed gate closes, to be reopened (see the module's
    /// documentation).
    pub(crate) fn close_to_reopen(&self) {
        let mut state = lock(&self.state);
        if state.sink.is_some() {
            state.mode = Mode::Closed;
            self.changed.notify_waiters();
        }
    }

    /// The consumer to reopen the gate for, unless a task already does, or it has none.
    pub(crate) fn to_reopen(&self) -> Option<Arc<Sink<S>>> {
        let mut state = lock(&self.state);
        if state.reopening || state.mode != Mode::Closed {
            return None;
        }
        let sink = state.sink.clone()?;
        state.reopening = true;
        Some(sink)
    }

    /// Drains the closed gate of `sink` (the marker returned is to be published once
    /// [`Gate::quiet`] resolves), or ends the reopening when `sink` is gone. `None`:
    /// nothing to drain.
    pub(crate) fn reopen(&self, sink: &Arc<Sink<S>>) -> Option<Uuid> {
        let mut state = lock(&self.state);
        state.reopening = false;
        if !state.serves(sink) || state.mode != Mode::Closed {
            return None;
        }
        let marker = Uuid::new_v4();
        state.mode = Mode::Draining(marker);
        self.changed.notify_waiters();
        Some(marker)
    }

    /// The consumer stays busy with what it was offered: an open gate closes (to be
    /// reopened, [`Gate::to_reopen`]) and the offer is published. `None`: the gate is
    /// not open any more; enter again.
    pub(crate) fn overflow(self: &Arc<Self>) -> Option<Publishing<S>> {
        let mut state = lock(&self.state);
        if state.mode != Mode::Open {
            return None;
        }
        state.mode = Mode::Closed;
        self.changed.notify_waiters();
        Some(self.publishing(&mut state))
    }

    /// Whether the gate still waits for `marker`.
    pub(crate) fn awaits(&self, marker: Uuid) -> bool {
        lock(&self.state).mode == Mode::Draining(marker)
    }

    /// Whether `sink` is still this gate's consumer.
    pub(crate) fn serves(&self, sink: &Arc<Sink<S>>) -> bool {
        lock(&self.state).serves(sink)
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

    /// Installs a consumer (with an offer limit of `limit`) and opens the gate for it.
    fn open(gate: &Arc<Gate<()>>, limit: u16) -> Arc<Sink<()>> {
        let sink = Arc::new(Sink::new((), limit));
        gate.install(sink.clone());
        let Some(to_reopen) = gate.to_reopen() else {
            panic!("a new consumer's gate is to be reopened");
        };
        let Some(marker) = gate.reopen(&to_reopen) else {
            panic!("a closed gate drains");
        };
        assert!(gate.arrived(marker));
        sink
    }

    #[tokio::test]
    async fn forwards_are_published_until_the_marker_sent_after_them_comes_back() {
        let gate = gate();
        let before = gate.enter();
        assert!(is_publish(&before), "no consumer: published");
        let sink = Arc::new(Sink::new((), 8));
        gate.install(sink.clone());
        let during = gate.enter();
        assert!(is_publish(&during), "installed: published until reopened");
        let Some(to_reopen) = gate.to_reopen() else {
            panic!("to be reopened");
        };
        assert!(gate.to_reopen().is_none(), "one reopening at a time");
        let Some(marker) = gate.reopen(&to_reopen) else {
            panic!("drains");
        };
        assert!(
            matches!(gate.enter(), Entry::Wait(_)),
            "draining: forwards wait"
        );
        let quiet = gate.quiet();
        futures::pin_mut!(quiet);
        assert!(
            futures::poll!(quiet.as_mut()).is_pending(),
            "the marker waits for the publishes in flight"
        );
        drop(before);
        assert!(futures::poll!(quiet.as_mut()).is_pending());
        drop(during);
        assert!(futures::poll!(quiet).is_ready());
        assert!(
            !gate.arrived(Uuid::new_v4()),
            "another marker opens nothing"
        );
        assert!(gate.arrived(marker));
        assert!(matches!(gate.enter(), Entry::HandOver(_)));
    }

    #[tokio::test]
    async fn offers_past_the_limit_close_the_gate_until_the_consumer_has_caught_up() {
        let gate = gate();
        let sink = open(&gate, 1);
        let offered: Vec<_> = (0..OFFERS_PER_PREFETCH)
            .map(|_| gate.enter_offer())
            .collect();
        assert!(offered
            .iter()
            .all(|entry| matches!(entry, Entry::HandOver(_))));
        assert!(
            matches!(gate.enter_offer(), Entry::Busy(_)),
            "over the limit"
        );
        assert!(
            matches!(gate.enter(), Entry::HandOver(_)),
            "a forward is not an offer"
        );
        let Some(overflowed) = gate.overflow() else {
            panic!("an open gate overflows");
        };
        assert!(gate.overflow().is_none(), "once");
        drop(overflowed);
        assert!(is_publish(&gate.enter_offer()), "closed: published");
        assert!(is_publish(&gate.enter()), "forwards too");
        let settled = sink.offers_settled();
        futures::pin_mut!(settled);
        assert!(futures::poll!(settled.as_mut()).is_pending());
        drop(offered);
        assert!(futures::poll!(settled).is_ready());
        let Some(to_reopen) = gate.to_reopen() else {
            panic!("to be reopened");
        };
        assert!(gate.reopen(&to_reopen).is_some());
    }

    #[tokio::test]
    async fn a_lost_consumer_makes_what_was_handed_over_stale_and_closes_the_gate() {
        let gate = gate();
        open(&gate, 8);
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
        assert!(gate.to_reopen().is_none(), "no consumer: nothing to reopen");
    }

    #[tokio::test]
    async fn a_stopped_consumer_keeps_what_was_handed_over_and_a_new_forwarder_closes_the_gate() {
        let gate = gate();
        let first = open(&gate, 8);
        gate.close_to_reopen();
        assert!(is_publish(&gate.enter()), "closed for a new forwarder");
        let Some(to_reopen) = gate.to_reopen() else {
            panic!("to be reopened");
        };
        let Some(marker) = gate.reopen(&to_reopen) else {
            panic!("drains");
        };
        gate.abandon(marker);
        assert!(is_publish(&gate.enter()), "an abandoned drain publishes");
        assert!(Arc::ptr_eq(&to_reopen, &first));

        let second = open(&gate, 8);
        assert!(!gate.serves(&first), "the new consumer replaced it");
        assert!(
            gate.reopen(&first).is_none(),
            "a stale reopening does nothing"
        );
        let Entry::HandOver(handed) = gate.enter() else {
            panic!("open again");
        };
        let sink = gate.close(false);
        assert!(sink.as_ref().is_some_and(|sink| Arc::ptr_eq(sink, &second)));
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
