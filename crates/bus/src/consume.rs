//! The consume loop: prefetch-bounded deliveries, a semaphore-bounded number of handlers
//! at once, manual acks after the handler returns, in-process retries with backoff,
//! dead-lettering with a confirm before the ack, reconnecting when the connection dies.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Consumer};
use std::hash::{Hash, Hasher};

use lapin::BasicProperties;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::acks::Acks;
use crate::local::{Entry, Gate, HandedOver, Publishing, Sink, MARKER_TYPE};
use crate::message::{headers, short};
use crate::publish::Prepared;
use crate::topology::DEAD_LETTER_QUEUE;
use crate::{Bus, BusError, Incoming, Outcome, OutgoingMessage};

/// Handles one message. The handler commits its effects before returning; the bus acks
/// only then. It must be idempotent: a message can be delivered again after a crash or
/// a lost connection (`Incoming::redelivered` hints at it).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome>;

    /// Messages with the same key are handled one after another, in delivery order;
    /// messages with different keys (or none) run concurrently. The default: no key.
    fn ordering_key(&self, _msg: &Incoming) -> Option<String> {
        None
    }

    /// Called when the in-process retries of a transient failure have run out, before
    /// the delay tiers (which would let the entity's later messages overtake this one)
    /// and the dead-letter queue. A handler that can set the message aside durably
    /// (parking it behind its entity, e.g. its order) returns the future that does so;
    /// once it resolves `Ok`, the bus acks the message (store first, ack second:
    /// at-least-once, so parking must be idempotent). `Err` returns the message to the
    /// queue. The default, `None`, keeps the delay tiers and the dead-letter queue.
    fn park(
        &self,
        _msg: &Incoming,
        _reason: &str,
        _attempts: u32,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        None
    }
}

/// How [`consume`] runs.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Unacked deliveries the broker sends ahead (`basic.qos`): the back-pressure.
    pub prefetch: u16,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Retries after the first attempt for [`Outcome::Retry`] before dead-lettering.
    pub max_retries: u32,
    /// Consumer tags are `<prefix>-<uuid>`.
    pub consumer_tag_prefix: String,
    /// First pause between retries (doubling, with jitter).
    pub retry_initial_interval: Duration,
    /// Give up retrying (and dead-letter) once this much time has passed.
    pub retry_max_elapsed: Duration,
    /// On shutdown, how long in-flight handlers may take to finish.
    pub shutdown_grace: Duration,
    /// After the in-process retries, how many times a message that keeps failing
    /// transiently is retried later through the delay tiers (1 s, 5 s, 30 s, 30 s …)
    /// before it is dead-lettered. 0: dead-letter at once.
    pub delayed_retry_rounds: u32,
    /// How long one attempt of the handler may run. One that runs longer is abandoned
    /// (its task aborted, which releases whatever it held) and retried like a
    /// transient failure: a handler stuck on something that never answers must not
    /// hold its delivery, and every message queued behind it, for ever.
    pub handler_timeout: Duration,
    /// Take the messages this process forwards to this queue in process, without the
    /// broker, once the queue is drained (see `local`): for a queue only this
    /// process consumes while it does (a partition).
    pub local_hand_off: bool,
    /// This consumer's handler forwards (a router): each time it starts, the queues
    /// that take hand-offs here drain again, since another process's router may have
    /// forwarded to them until now.
    pub forwards: bool,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            prefetch: 32,
            concurrency: 8,
            max_retries: 3,
            consumer_tag_prefix: "orderflow".to_owned(),
            retry_initial_interval: Duration::from_millis(50),
            retry_max_elapsed: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            delayed_retry_rounds: 4,
            handler_timeout: Duration::from_secs(30),
            local_hand_off: false,
            forwards: false,
        }
    }
}

impl ConsumeOptions {
    fn validate(&self) -> Result<u32, BusError> {
        let invalid = |reason: &str| BusError::InvalidOptions {
            reason: reason.to_owned(),
        };
        if self.prefetch == 0 {
            return Err(invalid(
                "prefetch must be at least 1 (0 would mean unbounded)",
            ));
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency must be at least 1"));
        }
        let permits = u32::try_from(self.concurrency.min(Semaphore::MAX_PERMITS))
            .map_err(|_| invalid("concurrency is too large"))?;
        Ok(permits)
    }

    fn retry_schedule(&self) -> ExponentialBackoff {
        ExponentialBackoffBuilder::new()
            .with_initial_interval(self.retry_initial_interval)
            .with_multiplier(2.0)
            .with_randomization_factor(0.5)
            .with_max_interval(self.retry_max_elapsed)
            .with_max_elapsed_time(Some(self.retry_max_elapsed))
            .build()
    }
}

/// Consumes `queue` until `shutdown` resolves, then stops taking deliveries, lets the
/// in-flight handlers finish (up to `shutdown_grace`) and returns.
///
/// A lost connection or channel is re-opened with backoff and consuming resumes (the
/// broker redelivers what was not acked). Returns an error only for what retrying
/// cannot fix (bad options, a queue that does not exist, access refused).
pub async fn consume(
    bus: &Bus,
    queue: &str,
    options: ConsumeOptions,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BusError> {
    let permits = options.validate()?;
    let queue_name = short("queue", queue)?;
    let semaphore = Arc::new(Semaphore::new(permits as usize));
    let lanes = Lanes::start(permits as usize, bus, &handler, &options);
    let dispatcher = LocalConsumer {
        bus: bus.clone(),
        handler: handler.clone(),
        lanes,
        options: options.clone(),
        handed_over: metrics::counter!(MESSAGES_HANDED_OVER, "queue" => queue.to_owned()),
    };
    let queue_arc: Arc<str> = Arc::from(queue);
    let gate = options
        .local_hand_off
        .then(|| bus.local_queues().gate(queue));
    // What was handed over before the channel died: it goes through the queue, and
    // the next marker waits for it.
    let mut lost: Option<Arc<Sink<LocalConsumer>>> = None;
    let mut reconnect = crate::connection::reconnect_schedule(Duration::MAX);
    reconnect.max_elapsed_time = None;
    tokio::pin!(shutdown);

    loop {
        let started = tokio::select! {
            biased;
            () = &mut shutdown => break,
            started = answered("starting to consume", start(bus, &queue_name, &options)) => {
                started.and_then(|started| started)
            }
        };
        let (channel, mut consumer) = match started {
            Ok(started) => started,
            Err(err) if err.is_transient() => {
                let pause = reconnect.next_backoff().unwrap_or(Duration::from_secs(5));
                warn!(queue, error = %err, retry_in = ?pause, "cannot start consuming; retrying");
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
            Err(err) => return Err(err),
        };
        reconnect.reset();
        info!(queue, consumer_tag = %consumer.tag(), "consuming");
        let acks = Acks::start(options.prefetch);
        if let Some(gate) = &gate {
            gate.install(Arc::new(Sink::new(dispatcher.clone(), options.prefetch)));
            if let Some(stale) = lost.take() {
                stale.settled().await;
            }
            reopen_when_idle(bus, gate);
        }
        if options.forwards {
            bus.reopen_local_queues();
        }

        let stopped = loop {
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break true,
                permit = semaphore.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else {
                // the semaphore is never closed
                break true;
            };
            let next = tokio::select! {
                biased;
                () = &mut shutdown => break true,
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    if let Some(marker) = marker_of(&delivery) {
                        acks.delivered(delivery.delivery_tag);
                        acks.finished(delivery.delivery_tag, delivery.acker.clone());
                        if gate.as_ref().is_some_and(|gate| gate.arrived(marker)) {
                            info!(queue, "queue drained: messages forwarded to it in this process are handed over");
                        } else {
                            bounce_marker(bus, queue, &delivery);
                        }
                        continue;
                    }
                    let span = info_span!(
                        "delivery",
                        queue,
                        message_id = delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(ShortString::as_str),
                        correlation_id = delivery
                            .properties
                            .correlation_id()
                            .as_ref()
                            .map(ShortString::as_str),
                        routing_key = delivery.routing_key.as_str(),
                        redelivered = delivery.redelivered,
                    );
                    let incoming = Incoming::from_delivery(&delivery);
                    acks.delivered(delivery.delivery_tag);
                    let job = Job {
                        queue: queue_arc.clone(),
                        source: Source::Delivery {
                            acks: acks.clone(),
                            delivery,
                            _permit: permit,
                        },
                        incoming,
                        span,
                        handed_over: None,
                    };
                    dispatcher.dispatch(job);
                }
                Some(Err(err)) => {
                    warn!(queue, error = %err, "consumer failed; reconnecting");
                    break false;
                }
                None => {
                    warn!(
                        queue,
                        "consumer was cancelled by the broker; re-subscribing"
                    );
                    break false;
                }
            }
        };
        if stopped {
            let handed_to_us = gate.as_ref().and_then(|gate| gate.close(false));
            let tag = consumer.tag();
            let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
            match answered("cancelling the consumer", cancel).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => debug!(queue, error = %err, "cancelling the consumer failed"),
                Err(err) => debug!(queue, error = %err, "cancelling the consumer failed"),
            }
            drain(&semaphore, permits, options.shutdown_grace, queue).await;
            if let Some(sink) = handed_to_us {
                let settled = sink.settled();
                if tokio::time::timeout(options.shutdown_grace, settled)
                    .await
                    .is_err()
                {
                    warn!(queue, "messages handed over did not finish in time (the broker will redeliver them)");
                }
            }
            // The finished handlers' acks go out before the channel closes; closing
            // first would return their messages to the queue.
            let _ = answered("sending the last acks", acks.flush()).await;
            let _ = answered(
                "closing the channel",
                channel.close(200, "shutting down".into()),
            )
            .await;
            return Ok(());
        }
        if let Some(gate) = &gate {
            lost = gate.close(true);
        }
        drop(consumer);
        drop(channel);
    }
    drain(&semaphore, permits, options.shutdown_grace, queue).await;
    Ok(())
}

async fn start(
    bus: &Bus,
    queue: &ShortString,
    options: &ConsumeOptions,
) -> Result<(Channel, Consumer), BusError> {
    let channel = bus.open_channel().await?;
    channel
        .basic_qos(options.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| BusError::amqp(format!("setting prefetch on {queue}"), e))?;
    let tag = short(
        "consumer tag",
        &format!(
            "{}-{}",
            options.consumer_tag_prefix,
            uuid::Uuid::new_v4().simple()
        ),
    )?;
    let consumer = channel
        .basic_consume(
            queue.clone(),
            tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BusError::amqp(format!("consuming {queue}"), e))?;
    Ok((channel, consumer))
}

/// Waits until every in-flight handler has given its permit back, up to `grace`.
async fn drain(semaphore: &Semaphore, permits: u32, grace: Duration, queue: &str) {
    match tokio::time::timeout(grace, semaphore.acquire_many(permits)).await {
        Ok(_) => info!(queue, "stopped consuming; in-flight handlers finished"),
        Err(_) => warn!(
            queue,
            ?grace,
            "stopped consuming; some handlers did not finish in time (their messages will be redelivered)"
        ),
    }
}

/// One message on its way to the handler.
struct Job {
    /// The queue it was consumed from (delayed retries return it there).
    queue: Arc<str>,
    source: Source,
    incoming: Incoming,
    span: tracing::Span,
    /// Handed over to this consumer in process: forwarded by a router of this process
    /// (the delivery, acks and permit are the router's), or offered ([`Bus::offer`]).
    handed_over: Option<HandedOver<LocalConsumer>>,
}

/// Where a job came from, which says how it is settled.
enum Source {
    /// A broker delivery: acknowledged, or returned, on its channel.
    Delivery {
        /// Its channel's acknowledger.
        acks: Acks,
        delivery: Delivery,
        /// Its concurrency permit, given back when the job is dropped (settled).
        _permit: OwnedSemaphorePermit,
    },
    /// A message offered in process with no delivery behind it: its offerer is told
    /// how it ended.
    Offered {
        body: Vec<u8>,
        properties: BasicProperties,
        done: oneshot::Sender<Result<(), BusError>>,
    },
}

impl Source {
    fn body(&self) -> &[u8] {
        match self {
            Source::Delivery { delivery, .. } => &delivery.data,
            Source::Offered { body, .. } => body,
        }
    }

    fn properties(&self) -> &BasicProperties {
        match self {
            Source::Delivery { delivery, .. } => &delivery.properties,
            Source::Offered { properties, .. } => properties,
        }
    }
}

/// What a consumer runs its jobs with: those it takes from the broker and those handed
/// over to it in process.
#[derive(Clone)]
pub(crate) struct LocalConsumer {
    bus: Bus,
    handler: Arc<dyn Handler>,
    lanes: Lanes,
    options: ConsumeOptions,
    /// [`MESSAGES_HANDED_OVER`] of its queue.
    handed_over: metrics::Counter,
}

impl LocalConsumer {
    /// Runs a job on its key's lane, or at once when it has no key.
    fn dispatch(&self, job: Job) {
        match self.handler.ordering_key(&job.incoming) {
            Some(key) => self.lanes.push(&key, job),
            None => {
                let span = job.span.clone();
                tokio::spawn(
                    process(
                        self.bus.clone(),
                        self.handler.clone(),
                        job,
                        self.options.clone(),
                    )
                    .instrument(span),
                );
            }
        }
    }
}

/// Messages handed over to a consumer of this process instead of published to its
/// queue, per queue.
pub const MESSAGES_HANDED_OVER: &str = "orderflow_messages_handed_over_total";

/// How long a forward waits for a queue's marker before it gives up handing over to
/// it (until the next drain) and publishes. The marker is behind the queue's backlog,
/// which its consumer takes at full speed: this only guards against one lost.
const DRAIN_PATIENCE: Duration = Duration::from_secs(60);

/// Forwards `job` to `queue`: to this process's consumer of it when its gate is open,
/// else published (returned with the publish's result, to be settled).
async fn hand_over(bus: &Bus, queue: &str, job: Job) -> Option<(Job, Result<(), BusError>)> {
    match ready_entry(bus, queue, false).await {
        Ok(mut handed) => {
            // The forwarder's lane waits for the message as it waited for a publish's
            // confirm: its key's next message must not pass this one, which, should the
            // consumer lose its channel, still goes to the queue.
            let settled = handed.settled();
            let mut job = job;
            let consumer = handed.sink.clone();
            job.handed_over = Some(handed);
            consumer.consumer.handed_over.increment(1);
            consumer.consumer.dispatch(job);
            drop(consumer);
            settled.await;
            None
        }
        Err(publishing) => {
            let published = forward(bus, &job.source, &job.incoming, queue).await;
            drop(publishing);
            Some((job, published))
        }
    }
}

/// Enters `queue`'s gate once it is not draining: `Ok` to hand a message over, `Err` to
/// publish it (the guard counts the publish until it is dropped).
async fn ready_entry(
    bus: &Bus,
    queue: &str,
    offer: bool,
) -> Result<HandedOver<LocalConsumer>, Publishing<LocalConsumer>> {
    let gate = bus.local_queues().gate(queue);
    let patience = tokio::time::sleep(DRAIN_PATIENCE);
    tokio::pin!(patience);
    loop {
        let changed = gate.changed();
        let entry = if offer {
            gate.enter_offer()
        } else {
            gate.enter()
        };
        match entry {
            Entry::HandOver(handed) => return Ok(handed),
            Entry::Publish(publishing) => return Err(publishing),
            Entry::Busy(offered) => {
                tokio::select! {
                    permit = offered.acquire() => drop(permit),
                    () = tokio::time::sleep(OFFER_PATIENCE) => {
                        if let Some(publishing) = gate.overflow() {
                            info!(queue, ?OFFER_PATIENCE, "the consumer settled none of the messages offered to it for a while; they go through its queue until it has caught up");
                            reopen_when_idle(bus, &gate);
                            return Err(publishing);
                        }
                    }
                }
            }
            Entry::Wait(marker) => {
                tokio::select! {
                    () = changed => {}
                    () = &mut patience => {
                        warn!(queue, ?DRAIN_PATIENCE, "the queue's hand-off marker did not come back; forwarding through the queue");
                        gate.abandon(marker);
                        reopen_when_idle(bus, &gate);
                    }
                }
            }
            Entry::Full(in_flight) => {
                let _ = in_flight.acquire().await;
            }
        }
    }
}

/// How long an offer waits for a consumer that has as many offered messages unsettled
/// as it may hold (`local::OFFERS_PER_PREFETCH` × its prefetch) before it goes through
/// the queue instead: a consumer that works
/// settles one long before (the wait is the back-pressure a busy one puts on the
/// relay), one that hangs (payment on a gateway that never answers) must not hold the
/// relay, and every other service, back.
const OFFER_PATIENCE: Duration = Duration::from_secs(1);

/// How often a closed gate's task looks whether its queue is idle.
const REOPEN_POLL: Duration = Duration::from_millis(200);

/// Drains `gate`'s queue once it is idle: nothing offered to its consumer unsettled
/// and no message ready in the queue, so that the marker passes an empty queue and
/// forwards wait for it only a moment (see `local`). One task per gate at a time. A
/// marker that does not come back within [`MARKER_PATIENCE`] (another process's
/// consumer of a queue with competing consumers sent it on too often) is given up, and
/// the task starts again.
fn reopen_when_idle(bus: &Bus, gate: &Arc<Gate<LocalConsumer>>) {
    let Some(sink) = gate.to_reopen() else {
        return;
    };
    let (bus, gate) = (bus.clone(), Arc::clone(gate));
    tokio::spawn(async move {
        let mut channel = None;
        loop {
            wait_until_idle(&bus, &gate, &sink, &mut channel).await;
            let Some(marker) = gate.reopen(&sink) else {
                break;
            };
            if drain_through(&bus, &gate, marker).await {
                if came_back(&gate, marker).await {
                    break;
                }
                debug!(
                    queue = gate.queue(),
                    "the hand-off marker did not come back; draining again"
                );
                gate.abandon(marker);
            } else {
                tokio::time::sleep(REOPEN_POLL).await;
            }
            if gate.to_reopen().is_none() {
                break;
            }
        }
        if let Some(channel) = channel {
            let _ = answered("closing a channel", channel.close(200, "done".into())).await;
        }
    });
}

/// How long a reopening waits for its marker before it sends another.
const MARKER_PATIENCE: Duration = Duration::from_secs(5);

/// Whether the gate stopped waiting for `marker` (it came back, or the gate changed
/// otherwise) within [`MARKER_PATIENCE`].
async fn came_back(gate: &Gate<LocalConsumer>, marker: uuid::Uuid) -> bool {
    let patience = tokio::time::sleep(MARKER_PATIENCE);
    tokio::pin!(patience);
    loop {
        let changed = gate.changed();
        if !gate.awaits(marker) {
            return true;
        }
        tokio::select! {
            () = changed => {}
            () = &mut patience => return !gate.awaits(marker),
        }
    }
}

/// Returns once nothing offered to `sink` is unsettled and `gate`'s queue has no
/// message ready, or once `sink` no longer consumes it.
async fn wait_until_idle(
    bus: &Bus,
    gate: &Gate<LocalConsumer>,
    sink: &Arc<Sink<LocalConsumer>>,
    channel: &mut Option<Channel>,
) {
    while gate.serves(sink) {
        sink.offers_settled().await;
        match ready_messages(bus, channel, gate.queue()).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) => {
                debug!(queue = gate.queue(), %error, "cannot count the queue's messages");
                *channel = None;
            }
        }
        tokio::time::sleep(REOPEN_POLL).await;
    }
}

/// Messages ready in `queue`, on `channel`, opened first if it is `None`.
async fn ready_messages(
    bus: &Bus,
    channel: &mut Option<Channel>,
    queue: &str,
) -> Result<u32, BusError> {
    let open = match channel {
        Some(open) => open,
        None => channel.insert(bus.open_channel().await?),
    };
    crate::topology::ready_count(open, queue).await
}

/// What [`Bus::offer`] made of a message for a queue.
pub enum Offer {
    /// Handed over to this process's consumer of the queue.
    Handed(HandOff),
    /// No consumer of this process takes it now: the offerer publishes it so that it
    /// reaches the queue, and keeps the guard until the broker has confirmed it (a
    /// consumer that starts sends its drain marker only after such publishes).
    Publish(PublishGuard),
}

/// A message [`Bus::offer`] handed over, until its consumer settles it.
#[must_use = "a hand-off is done only once it is settled"]
pub struct HandOff(oneshot::Receiver<Result<(), BusError>>);

impl HandOff {
    /// Resolves once the consumer is done with the message: `Ok` when it was handled,
    /// dead-lettered, parked, or sent on through the broker (a delayed retry, or its
    /// consumer lost its channel meanwhile); `Err` when it could not be moved on, and
    /// is the offerer's again.
    pub async fn settled(self) -> Result<(), BusError> {
        self.0.await.unwrap_or_else(|_| {
            Err(BusError::HandOff {
                reason: "its consumer stopped before it was settled".to_owned(),
            })
        })
    }
}

/// Counts a publish that [`Bus::offer`] left to its offerer, until dropped.
pub struct PublishGuard {
    _publishing: Publishing<LocalConsumer>,
}

impl Bus {
    /// A forwarder starts (a router, or the relay): every queue that a consumer of this
    /// process takes hand-offs for is closed and drained again once idle, since
    /// another process's forwarder may have published to it until now.
    pub fn reopen_local_queues(&self) {
        for consumed in self.local_queues().consumed() {
            consumed.close_to_reopen();
            reopen_when_idle(self, &consumed);
        }
    }

    /// Whether a message offered for `queue` now would be handed over: a consumer of
    /// this process takes hand-offs for it and has drained it.
    pub fn hands_over_to(&self, queue: &str) -> bool {
        self.local_queues().gate(queue).is_open()
    }

    /// Offers `message` to this process's consumer of `queue` (ADR 0005, "The hand-off
    /// in process"): handed over when that consumer has drained the queue, with no
    /// broker in between; otherwise left to the offerer to publish. Waits while the
    /// queue drains.
    pub async fn offer(&self, queue: &str, message: &OutgoingMessage) -> Result<Offer, BusError> {
        match ready_entry(self, queue, true).await {
            Ok(handed) => offered(queue, handed, message),
            Err(publishing) => Ok(Offer::Publish(PublishGuard {
                _publishing: publishing,
            })),
        }
    }

    /// [`Bus::offer`] without waiting: `None` while the queue drains, or while its
    /// consumer has as many offered messages unsettled as its prefetch.
    pub fn try_offer(
        &self,
        queue: &str,
        message: &OutgoingMessage,
    ) -> Result<Option<Offer>, BusError> {
        match self.local_queues().gate(queue).enter_offer() {
            Entry::HandOver(handed) => offered(queue, handed, message).map(Some),
            Entry::Publish(publishing) => Ok(Some(Offer::Publish(PublishGuard {
                _publishing: publishing,
            }))),
            Entry::Wait(_) | Entry::Full(_) | Entry::Busy(_) => Ok(None),
        }
    }
}

/// Hands `message` to the consumer behind `handed`.
fn offered(
    queue: &str,
    handed: HandedOver<LocalConsumer>,
    message: &OutgoingMessage,
) -> Result<Offer, BusError> {
    // As the broker would deliver it: the relay's BCC of other queues (added when an
    // earlier queue of the same event was published to) is not this consumer's.
    let properties = message.properties.as_delivered()?;
    let incoming = Incoming::from_parts(
        &message.exchange,
        &message.routing_key,
        &message.body,
        &properties,
        false,
    );
    let span = info_span!(
        "offered",
        queue,
        message_id = incoming.message_id.as_deref(),
        correlation_id = incoming.correlation_id.as_deref(),
        routing_key = incoming.routing_key.as_str(),
    );
    let (done, settled) = oneshot::channel();
    let consumer = handed.sink.clone();
    let job = Job {
        queue: Arc::from(queue),
        source: Source::Offered {
            body: message.body.clone(),
            properties,
            done,
        },
        incoming,
        span,
        handed_over: Some(handed),
    };
    consumer.consumer.handed_over.increment(1);
    consumer.consumer.dispatch(job);
    Ok(Offer::Handed(HandOff(settled)))
}

/// Sends `marker` to the gate's queue once no forward to it is being published; one
/// that cannot be sent leaves the gate closed (forwards are published). Whether sent.
async fn drain_through(bus: &Bus, gate: &Gate<LocalConsumer>, marker: uuid::Uuid) -> bool {
    gate.quiet().await;
    let mut owner = FieldTable::default();
    owner.insert(
        ShortString::from(MARKER_OWNER),
        AMQPValue::LongString(LongString::from(bus.local_queues().id().to_string())),
    );
    let properties = lapin::BasicProperties::default()
        .with_type(ShortString::from(MARKER_TYPE))
        .with_message_id(ShortString::from(marker.to_string()))
        .with_headers(owner);
    let sent = match Prepared::new("", gate.queue(), &[], properties, true) {
        Ok(message) => bus.publish_prepared(&message).await,
        Err(error) => Err(error),
    };
    if let Err(error) = &sent {
        warn!(queue = gate.queue(), %error, "cannot send the hand-off marker; forwarding through the queue");
        gate.abandon(marker);
    }
    sent.is_ok()
}

/// The header naming the process (its bus) whose consumer sent a marker.
const MARKER_OWNER: &str = "x-orderflow-marker-of";
/// How many times a marker is sent on after reaching another process's consumer.
const MARKER_HOPS: &str = "x-orderflow-marker-hops";
/// At most this many hops: with N consumers a marker reaches its own after N on
/// average; one that keeps missing leaves its gate to [`DRAIN_PATIENCE`].
const MAX_MARKER_HOPS: i64 = 32;

/// A marker another process's consumer sent (the queue has competing consumers): it
/// goes back to the queue, behind everything queued so far, until it reaches its own.
/// A marker of this process that is no longer awaited is dropped.
fn bounce_marker(bus: &Bus, queue: &str, delivery: &Delivery) {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let field = |name: &str| {
        headers
            .inner()
            .get(&ShortString::from(name))
            .map(crate::message::render_value)
    };
    let ours = bus.local_queues().id().to_string();
    if field(MARKER_OWNER).is_none_or(|owner| owner == ours) {
        return;
    }
    let hops = field(MARKER_HOPS)
        .and_then(|hops| hops.parse::<i64>().ok())
        .unwrap_or(0)
        + 1;
    if hops > MAX_MARKER_HOPS {
        debug!(
            queue,
            hops, "dropping a hand-off marker that keeps missing its consumer"
        );
        return;
    }
    let mut table = headers;
    table.insert(ShortString::from(MARKER_HOPS), AMQPValue::LongLongInt(hops));
    let properties = delivery.properties.clone().with_headers(table);
    let (bus, queue) = (bus.clone(), queue.to_owned());
    // After a pause of a few milliseconds, different each time: markers sent on at
    // once by consumers served in turn could each keep reaching the same wrong one.
    let pause = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 16));
    tokio::spawn(async move {
        tokio::time::sleep(pause).await;
        let sent = match Prepared::new("", &queue, &[], properties, true) {
            Ok(message) => bus.publish_prepared(&message).await,
            Err(error) => Err(error),
        };
        if let Err(error) = sent {
            debug!(queue, %error, "could not send another process's hand-off marker on");
        }
    });
}

/// The marker, if the delivery is one.
fn marker_of(delivery: &Delivery) -> Option<uuid::Uuid> {
    let properties = &delivery.properties;
    if properties.kind().as_ref().map(ShortString::as_str) != Some(MARKER_TYPE) {
        return None;
    }
    properties
        .message_id()
        .as_ref()
        .and_then(|id| id.as_str().parse().ok())
}

/// Sequential lanes for keyed messages: a key always maps to the same lane, and a lane
/// handles its jobs one after another in the order they were delivered.
#[derive(Clone)]
struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Job>>,
}

impl Lanes {
    fn start(
        count: usize,
        bus: &Bus,
        handler: &Arc<dyn Handler>,
        options: &ConsumeOptions,
    ) -> Lanes {
        let senders = (0..count.max(1))
            .map(|_| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
                let (bus, handler, options) = (bus.clone(), handler.clone(), options.clone());
                tokio::spawn(async move {
                    while let Some(job) = rx.recv().await {
                        let span = job.span.clone();
                        process(bus.clone(), handler.clone(), job, options.clone())
                            .instrument(span)
                            .await;
                    }
                });
                tx
            })
            .collect();
        Lanes { senders }
    }

    /// Queues the job on its key's lane. The number of queued jobs is bounded by the
    /// permits they hold.
    fn push(&self, key: &str, job: Job) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let lane = (hasher.finish() % self.senders.len() as u64) as usize;
        if let Some(tx) = self.senders.get(lane) {
            // A closed lane (only at shutdown) drops the job unacked: the broker
            // redelivers it.
            let _ = tx.send(job).is_ok();
        }
    }
}

/// What finally becomes of one delivery.
enum Verdict {
    Ack,
    DeadLetter {
        reason: String,
        attempts: u32,
    },
    Forward {
        queue: String,
    },
    /// In-process retries ran out on a transient failure: try again after a delay.
    RetryLater {
        reason: String,
        attempts: u32,
    },
}

/// Runs the handler (retrying as asked), then acks or dead-letters. Holds its
/// semaphore permit until the delivery is settled.
async fn process(bus: Bus, handler: Arc<dyn Handler>, job: Job, options: ConsumeOptions) {
    if let Source::Delivery { acks, delivery, .. } = &job.source {
        if delivery.acker.poisoned() {
            // Its channel died while it waited in a lane: the broker has requeued it
            // and delivers it again on the new channel. Handling it here would do the
            // work twice, and its ack could not reach the broker anyway.
            debug!("the delivery's channel is gone; left for redelivery");
            acks.settled(delivery.delivery_tag);
            return;
        }
    }
    let stale = job.handed_over.as_ref().filter(|handed| handed.is_stale());
    let verdict = match stale {
        // Its consumer lost its channel: the messages the broker requeued come first,
        // so this one goes behind them, through the queue.
        Some(handed) => {
            let queue = handed.gate.queue().to_owned();
            debug!(
                queue,
                "handed over before the consumer's channel died; publishing it to its queue"
            );
            let published = forward(&bus, &job.source, &job.incoming, &queue).await;
            return settle(job, published).await;
        }
        None => run_handler(&handler, &job.incoming, &options).await,
    };
    let (job, settled) = match verdict {
        Verdict::Forward { queue } => match hand_over(&bus, &queue, job).await {
            Some(published) => published,
            None => return,
        },
        verdict => {
            let settled = conclude(&bus, &handler, &job, &options, verdict).await;
            (job, settled)
        }
    };
    settle(job, settled).await;
}

/// Carries out a verdict other than a forward.
async fn conclude(
    bus: &Bus,
    handler: &Arc<dyn Handler>,
    job: &Job,
    options: &ConsumeOptions,
    verdict: Verdict,
) -> Result<(), BusError> {
    let Job {
        queue,
        source,
        incoming,
        ..
    } = job;
    match verdict {
        Verdict::Ack => Ok(()),
        // Forwards are carried out by `hand_over`; this one only if called with one.
        Verdict::Forward { queue } => forward(bus, source, incoming, &queue).await,
        Verdict::RetryLater { reason, attempts } => {
            let round = retry_round(incoming).saturating_add(1);
            if let Some(parking) = handler.park(incoming, &reason, attempts) {
                park(parking, &reason, attempts).await
            } else if round <= options.delayed_retry_rounds {
                let tier = crate::topology::retry_tier(round);
                warn!(reason = %reason, attempts, round, tier, "retrying later");
                delay(bus, queue, source, incoming, tier, round, attempts).await
            } else {
                let reason = format!(
                    "{reason} (gave up after {attempts} attempts and {} delayed retries)",
                    round - 1
                );
                warn!(reason = %reason, attempts, "dead-lettering message");
                dead_letter(bus, queue, source, incoming, &reason, attempts).await
            }
        }
        Verdict::DeadLetter { reason, attempts } => {
            warn!(reason = %reason, attempts, "dead-lettering message");
            dead_letter(bus, queue, source, incoming, &reason, attempts).await
        }
    }
}

/// Acks the delivery once what became of it is done, or returns it to its queue; tells
/// the offerer of an offered message.
async fn settle(job: Job, settled: Result<(), BusError>) {
    let (acks, delivery) = match job.source {
        Source::Delivery { acks, delivery, .. } => (acks, delivery),
        Source::Offered { done, .. } => {
            if let Err(error) = &settled {
                error!(%error, "could not move the offered message on; its offerer takes it back");
            }
            let _ = done.send(settled);
            return;
        }
    };
    match settled {
        Ok(()) => acks.finished(delivery.delivery_tag, delivery.acker.clone()),
        Err(err) => {
            error!(error = %err, "could not move the message on; returning it to the queue");
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            match answered("nacking a delivery", delivery.acker.nack(requeue)).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => warn!(error = %err, "nack failed (the broker will redeliver)"),
                Err(err) => warn!(error = %err, "nack unanswered (the broker will redeliver)"),
            }
            acks.settled(delivery.delivery_tag);
        }
    }
}

/// Waits until the handler has set the message aside (see [`Handler::park`]).
async fn park(
    parking: BoxFuture<'static, Result<(), String>>,
    reason: &str,
    attempts: u32,
) -> Result<(), BusError> {
    match parking.await {
        Ok(()) => {
            warn!(reason = %reason, attempts, "retries exhausted; message parked");
            Ok(())
        }
        Err(cause) => Err(BusError::Park { reason: cause }),
    }
}

/// How many delayed-retry rounds the message has been through.
fn retry_round(incoming: &Incoming) -> u32 {
    incoming
        .headers
        .get(headers::RETRY_ROUND)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

async fn run_handler(
    handler: &Arc<dyn Handler>,
    incoming: &Incoming,
    options: &ConsumeOptions,
) -> Verdict {
    let mut schedule = options.retry_schedule();
    let mut attempts: u32 = 0;
    loop {
        attempts = attempts.saturating_add(1);
        let task_handler = handler.clone();
        let msg = incoming.clone();
        // The handler runs in a task of its own so that a panic ends up here as a
        // JoinError instead of unwinding through the consumer, and so that an attempt
        // that overruns can be aborted.
        let task = tokio::spawn(async move { task_handler.handle(msg).await });
        match attempt_within(task, options.handler_timeout, attempts).await {
            Ok(Outcome::Ack) => return Verdict::Ack,
            Ok(Outcome::Forward { queue }) => return Verdict::Forward { queue },
            Ok(Outcome::DeadLetter { reason }) => return Verdict::DeadLetter { reason, attempts },
            Ok(Outcome::Retry { reason }) => {
                let pause = if attempts > options.max_retries {
                    None
                } else {
                    schedule.next_backoff()
                };
                match pause {
                    Some(pause) => {
                        debug!(reason = %reason, attempts, retry_in = ?pause, "handler asked to retry");
                        tokio::time::sleep(pause).await;
                    }
                    None => return Verdict::RetryLater { reason, attempts },
                }
            }
            Err(join_error) => {
                let detail = if join_error.is_panic() {
                    let payload = join_error.into_panic();
                    payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .map_or_else(
                            || "handler panicked".to_owned(),
                            |m| format!("handler panicked: {m}"),
                        )
                } else {
                    "handler task was cancelled".to_owned()
                };
                error!(reason = %detail, attempts, "handler failed");
                return Verdict::DeadLetter {
                    reason: detail,
                    attempts,
                };
            }
        }
    }
}

/// Awaits one attempt for at most `limit`; an overrun aborts it and asks for a retry.
async fn attempt_within(
    mut task: tokio::task::JoinHandle<Outcome>,
    limit: Duration,
    attempts: u32,
) -> Result<Outcome, tokio::task::JoinError> {
    match tokio::time::timeout(limit, &mut task).await {
        Ok(joined) => joined,
        Err(_) => {
            task.abort();
            let reason = format!("the handler did not finish within {limit:?}");
            warn!(reason = %reason, attempts, "handler attempt abandoned");
            Ok(Outcome::Retry { reason })
        }
    }
}

/// The longest wait for the client library to carry out one request to the broker.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// Awaits a request to the broker for at most [`ANSWER_LIMIT`]. lapin resolves a
/// request on a connection whose I/O loop already ended (the broker closed it) never,
/// neither with an answer nor with an error: an ack awaited without a limit held its
/// lane, and every message queued behind it, for ever.
pub(crate) async fn answered<T>(
    operation: &str,
    request: impl Future<Output = T>,
) -> Result<T, BusError> {
    tokio::time::timeout(ANSWER_LIMIT, request)
        .await
        .map_err(|_| BusError::NoAnswer {
            operation: operation.to_owned(),
            waited: ANSWER_LIMIT,
        })
}

/// Publishes the message to `orderflow.dead-letter` through the default exchange with
/// its body and properties as received plus the `x-orderflow-*` headers, and waits for
/// the confirm.
async fn dead_letter(
    bus: &Bus,
    queue: &str,
    source: &Source,
    incoming: &Incoming,
    reason: &str,
    attempts: u32,
) -> Result<(), BusError> {
    let properties = with_origin(
        source,
        incoming,
        &[
            (
                headers::ERROR,
                AMQPValue::LongString(LongString::from(reason.as_bytes())),
            ),
            (
                headers::ATTEMPTS,
                AMQPValue::LongLongInt(i64::from(attempts)),
            ),
            (
                headers::DEAD_LETTERED_FROM,
                AMQPValue::LongString(LongString::from(queue.as_bytes())),
            ),
        ],
    );
    let message = Prepared::new("", DEAD_LETTER_QUEUE, source.body(), properties, true)?;
    bus.publish_prepared(&message).await
}

/// Publishes the message to `queue` through the default exchange with its body and
/// properties as received plus its origin, and waits for the confirm (mandatory: a
/// missing queue is an error, and the message goes back to where it came from).
async fn forward(
    bus: &Bus,
    source: &Source,
    incoming: &Incoming,
    queue: &str,
) -> Result<(), BusError> {
    let properties = with_origin(
        source,
        incoming,
        &[(
            headers::ROUTED_TO,
            AMQPValue::LongString(LongString::from(queue.as_bytes())),
        )],
    );
    let message = Prepared::new("", queue, source.body(), properties, true)?;
    bus.publish_prepared(&message).await
}

/// Publishes the message to a delay tier, addressed back to the queue it came from.
async fn delay(
    bus: &Bus,
    queue: &str,
    source: &Source,
    incoming: &Incoming,
    tier: &str,
    round: u32,
    attempts: u32,
) -> Result<(), BusError> {
    let properties = with_origin(
        source,
        incoming,
        &[
            (
                headers::RETRY_ROUND,
                AMQPValue::LongLongInt(i64::from(round)),
            ),
            (
                headers::ATTEMPTS,
                AMQPValue::LongLongInt(i64::from(attempts)),
            ),
        ],
    );
    // The tier dead-letters it through the default exchange: its routing key is the
    // name of the queue it returns to.
    let message = Prepared::new(tier, queue, source.body(), properties, true)?;
    bus.publish_prepared(&message).await
}

/// The message's properties with its origin (first exchange and routing key) and
/// `extra` headers added.
fn with_origin(
    source: &Source,
    incoming: &Incoming,
    extra: &[(&str, AMQPValue)],
) -> lapin::BasicProperties {
    let mut table = source.properties().headers().clone().unwrap_or_default();
    let mut put = |name: &str, value: AMQPValue| {
        table.insert(ShortString::from(name), value);
    };
    put(
        headers::ORIGINAL_EXCHANGE,
        AMQPValue::LongString(LongString::from(incoming.exchange.as_bytes())),
    );
    put(
        headers::ORIGINAL_ROUTING_KEY,
        AMQPValue::LongString(LongString::from(incoming.routing_key.as_bytes())),
    );
    for (name, value) in extra {
        put(name, value.clone());
    }
    source.properties().clone().with_headers(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_the_broker_never_answers_is_given_up() {
        let answer = answered("acking a delivery", std::future::pending::<()>()).await;
        assert!(
            matches!(answer, Err(BusError::NoAnswer { waited, .. }) if waited == ANSWER_LIMIT),
            "{answer:?}"
        );
        let answer = answered("acking a delivery", async { 7 }).await;
        assert!(matches!(answer, Ok(7)), "{answer:?}");
    }
}
