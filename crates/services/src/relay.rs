//! The outbox relay: the event log is the outbox. It follows the log with the gap-safe
//! reader and routes each committed event to the service queues that take it: handed
//! over in process to this process's consumer of a queue when there is one
//! (`Bus::offer`, ADR 0005 "Events handed over"), else published to `orderflow.events`
//! with publisher confirms, addressed to the queue by its name (a `BCC` routing key).
//! The event's own routing key reaches the queues outside programs bind; events of a
//! key that no such queue is bound to are not sent when no service queue needs a
//! publish either (`Bindings`): the broker would drop them. The checkpoint moves only
//! past events that are confirmed and settled by the consumers they were handed to. A
//! crash in between routes them again; consumers dedupe by event id, so that is
//! harmless.
//!
//! One relay routes at a time: it holds a session advisory lock on a connection of
//! its own; other instances wait as hot standbys and take over when that connection
//! goes away.
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::{Bus, Offer};
use eventstore::{EventStore, LogPosition, RecordedEvent};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tracing::{debug, info, warn};

use crate::message::{event_routing_key, keyed_event_message};
use crate::ServiceError;

/// The relay's checkpoint. Relays before 5 Dec (which published to the events' own
/// routing keys, to which service queues were bound) used [`LEGACY_CHECKPOINT`] and
/// [`LEGACY_LOCK_KEY`]: see [`lead`].
pub const CHECKPOINT: &str = "relay.v2";
const LEGACY_CHECKPOINT: &str = "relay";
const PAGE: i64 = 1_000;
const FALLBACK_POLL: Duration = Duration::from_millis(500);
/// How often an idle relay checks that its lock's connection is alive. Checking on every
/// idle wake-up was a round trip per append at a moderate rate (a third of a statement
/// per order at 200 orders/s).
const LOCK_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Arbitrary, fixed: the advisory lock key that elects the active relay.
const RELAY_LOCK_KEY: i64 = 0x6f72_6465_7266_6c32;
/// The lock of the relays before 5 Dec.
const LEGACY_LOCK_KEY: i64 = 0x6f72_6465_7266_6c6f;

/// Runs the relay until `shutdown` resolves.
pub async fn run(
    store: EventStore,
    bus: Bus,
    database_url: String,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            result = lead(&store, &bus, &database_url) => {
                if let Err(error) = result {
                    warn!(%error, "relay interrupted; starting again");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Becomes the active relay (waiting for the lock), then relays until an error.
///
/// Upgrading from a build before 5 Dec: its relay (another lock) may still be active,
/// publishing to the events' routing keys, which this build's service queues are no
/// longer bound to; this relay routes every event itself from its own checkpoint
/// (starting from the old one), so the two only duplicate events. While this relay
/// also holds the old lock, no old relay can become active, and it keeps the old
/// checkpoint with its own, so that one that takes over later starts from there.
async fn lead(store: &EventStore, bus: &Bus, database_url: &str) -> Result<(), ServiceError> {
    let mut lock_conn = PgConnection::connect(database_url).await?;
    while !try_lock(&mut lock_conn, RELAY_LOCK_KEY).await? {
        debug!("another relay is active; standing by");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    info!("relay active");
    let mut cursor = Cursor {
        legacy: try_lock(&mut lock_conn, LEGACY_LOCK_KEY).await?,
        ..Cursor::default()
    };
    // Another process's relay may have published to the queues this process's
    // consumers take hand-offs for.
    bus.reopen_local_queues();
    let mut wakeups = store.follow().await?;
    let mut flight = Flight::default();
    let mut lock_checked = tokio::time::Instant::now();
    loop {
        let read = flight.send_next(store, bus, &mut cursor).await?;
        // The checkpoint is written at most every CHECKPOINT_EVERY, not after every
        // page: its commit was on every hop's path. Nor at once when caught up: at a
        // moderate rate the relay is caught up after almost every page, and saving
        // then delayed the next event by a commit. A relay that stays idle saves on
        // its next look (within FALLBACK_POLL). Events published since the last save
        // are published again after a crash, which consumers make harmless (derived
        // event ids).
        settle_and_save(&mut flight, &mut cursor, store).await?;
        let limit = match next_read(read) {
            NextRead::AtOnce => continue,
            NextRead::OnAppendOrAfter(limit) => limit,
        };
        wait_for_the_log(&mut wakeups, &mut flight, &mut cursor, store, limit).await?;
        if limit == FALLBACK_POLL && lock_checked.elapsed() >= LOCK_CHECK_EVERY {
            // Notice a lost lock connection (another relay may have taken over).
            if cursor.legacy {
                sqlx::query("SELECT 1").execute(&mut lock_conn).await?;
            } else {
                cursor.legacy = try_lock(&mut lock_conn, LEGACY_LOCK_KEY).await?;
            }
            lock_checked = tokio::time::Instant::now();
        }
    }
}

async fn try_lock(conn: &mut PgConnection, key: i64) -> Result<bool, ServiceError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await?)
}

/// Waits for an append (or `limit`), settling the pages in flight as their confirms
/// come: a confirm moves the checkpoint but brings nothing new to read. Reading on
/// every confirm (as until 5 Dec) found nothing most of the time.
async fn wait_for_the_log(
    wakeups: &mut eventstore::Wakeups,
    flight: &mut Flight,
    cursor: &mut Cursor,
    store: &EventStore,
    limit: Duration,
) -> Result<(), ServiceError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let confirmed = Arc::clone(&flight.confirmed);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::select! {
            () = confirmed.notified(), if !flight.is_empty() => {
                settle_and_save(flight, cursor, store).await?;
            }
            _ = wakeups.wait(left) => return Ok(()),
        }
    }
}

/// Moves the cursor past the pages confirmed so far and saves it when it is due.
async fn settle_and_save(
    flight: &mut Flight,
    cursor: &mut Cursor,
    store: &EventStore,
) -> Result<(), ServiceError> {
    flight.settle(cursor, false).await?;
    cursor.save(store, false, flight.holdback()).await
}

/// When the relay reads next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextRead {
    /// The page was full, or the flight was (and `settle` has made room): read on.
    AtOnce,
    /// On the next append, or after this long. After a page that was not full the
    /// log is read to its end, so reading again at once found nothing most of the
    /// time; a short limit still catches events held back behind a transaction whose
    /// end wakes nobody (the log's horizon). After an empty read, the fallback poll.
    OnAppendOrAfter(Duration),
}

/// After a page that was not full, the next read waits this long at most for an append.
const SHORT_PAGE_RECHECK: Duration = Duration::from_millis(5);

/// `read`: what the last `send_next` sent (`None`: the flight was full, and `settle`
/// has since waited for a free place).
fn next_read(read: Option<usize>) -> NextRead {
    match read {
        None => NextRead::AtOnce,
        Some(0) => NextRead::OnAppendOrAfter(FALLBACK_POLL),
        Some(count) if i64::try_from(count).is_ok_and(|count| count >= PAGE) => NextRead::AtOnce,
        Some(_) => NextRead::OnAppendOrAfter(SHORT_PAGE_RECHECK),
    }
}

/// Pages whose messages are sent but not all confirmed yet, at most this many: the
/// next page goes out while the broker confirms the ones before it (a quorum queue
/// confirms after its log is on disk, 5–7.5 ms at p50 under load), instead of every
/// event that committed meanwhile waiting for those confirms before it is even read.
const PAGES_IN_FLIGHT: usize = 4;

/// A task that ends when what it waits for is confirmed or settled.
type Waiting = tokio::task::JoinHandle<Result<(), bus::BusError>>;

/// The pages the active relay has sent, oldest first, each with the position of its
/// last event and the task that waits for its confirms.
#[derive(Default)]
struct Flight {
    pages: std::collections::VecDeque<(LogPosition, Waiting)>,
    /// The pages with events handed over in process, oldest first, each with the
    /// position it was read after and the task that waits until its consumers settled
    /// them. Not bounded by [`PAGES_IN_FLIGHT`]: a consumer that is slow (payment
    /// waiting on a hung gateway) holds back the checkpoint, not the other services.
    handing: std::collections::VecDeque<(LogPosition, Waiting)>,
    /// What the broker answered about the routing keys no service of ours binds.
    bindings: Arc<Mutex<Bindings>>,
    /// Told when a page's publish ends (confirmed or failed), so that an idle relay
    /// can wait for it and for new appends at once.
    confirmed: Arc<tokio::sync::Notify>,
}

impl Flight {
    fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.handing.is_empty()
    }

    /// The checkpoint may not pass this: the oldest page with events still handed over.
    fn holdback(&self) -> Option<LogPosition> {
        self.handing.front().map(|(after, _)| *after)
    }

    /// Reads the page after the last one sent and routes it, unless `PAGES_IN_FLIGHT`
    /// are unconfirmed (`None`: nothing read); returns how many events it read. It
    /// returns once the page's messages are handed to the channel, so pages reach the
    /// broker in log order.
    async fn send_next(
        &mut self,
        store: &EventStore,
        bus: &Bus,
        cursor: &mut Cursor,
    ) -> Result<Option<usize>, ServiceError> {
        if self.pages.len() >= PAGES_IN_FLIGHT {
            return Ok(None);
        }
        let last_sent = self.pages.back().map(|(last, _)| *last);
        let after = match last_sent.or(cursor.published) {
            Some(after) => after,
            None => {
                let saved = starting_position(store).await?;
                cursor.saved = Some((saved, Instant::now()));
                cursor.published = Some(saved);
                saved
            }
        };
        let records = store.read_all_text(after, PAGE).await?;
        if records.is_empty() {
            return Ok(Some(0));
        }
        let read = records.len();
        let mut recorded: Vec<_> = records.iter().map(|r| r.recorded_at).collect();
        record_since(crate::metrics::RELAY_READ_DELAY_SECONDS, &recorded);
        let routed = route(bus, records).await?;
        let Some(last) = routed.last else {
            return Ok(Some(0));
        };
        recorded.truncate(routed.messages.len());
        if !routed.handed.is_empty() {
            let done = Arc::clone(&self.confirmed);
            let handed = routed.handed;
            let settled = tokio::spawn(async move {
                let settled =
                    futures::future::try_join_all(handed.into_iter().map(bus::HandOff::settled))
                        .await;
                done.notify_one();
                settled.map(drop)
            });
            self.handing.push_back((after, settled));
        }
        let page = SortedPage::of(routed.messages, &self.bindings);
        let bindings = Arc::clone(&self.bindings);
        let (sent, handed) = tokio::sync::oneshot::channel();
        let publisher = bus.clone();
        let done = Arc::clone(&self.confirmed);
        let guards = routed.guards;
        let confirmed = tokio::spawn(async move {
            let published = page.publish(&publisher, &bindings, sent).await;
            // Confirmed (or failed): a consumer that starts may send its marker now.
            drop(guards);
            // A permit is kept when nobody waits yet: the relay's next wait ends at once.
            done.notify_one();
            record_delays(&published?, &recorded);
            Ok(())
        });
        // Told once sent, or dropped when the publish ended first: either way nothing
        // of this page is still to be handed to the channel.
        let _ = handed.await;
        self.pages.push_back((last, confirmed));
        // A page cut short has more to read at once.
        Ok(Some(if routed.cut { PAGE_LEN } else { read }))
    }

    /// Moves the cursor past every page confirmed so far, in order; waits for the
    /// oldest one when `wait` or when the flight is full. A page
    /// that failed fails the relay: the pages after it are abandoned and the next
    /// leader starts again at the checkpoint.
    async fn settle(&mut self, cursor: &mut Cursor, wait: bool) -> Result<(), ServiceError> {
        let mut must_wait = wait || self.pages.len() >= PAGES_IN_FLIGHT;
        while let Some((_, task)) = self.pages.front() {
            if !must_wait && !task.is_finished() {
                break;
            }
            let Some((last, task)) = self.pages.pop_front() else {
                break;
            };
            if let Err(error) = ended(task, "the publish of a page").await {
                return Err(self.abandon(error));
            }
            cursor.published = Some(last);
            must_wait = false;
        }
        while let Some((_, task)) = self.handing.front() {
            if !(wait || task.is_finished()) {
                break;
            }
            let Some((_, task)) = self.handing.pop_front() else {
                break;
            };
            // A hand-off that failed: its events are routed again from the checkpoint,
            // which has not passed them.
            if let Err(error) = ended(task, "the hand-off of a page").await {
                return Err(self.abandon(error));
            }
        }
        Ok(())
    }

    /// Stops waiting for the pages still in flight. Their tasks are left to finish,
    /// not aborted: a publish stopped halfway through a send would leave the shared
    /// channel's confirm numbering one ahead of the broker's. What they publish is
    /// published again by the next leader, which consumers make harmless.
    fn abandon(&mut self, error: ServiceError) -> ServiceError {
        self.pages.clear();
        self.handing.clear();
        error
    }
}

/// What a confirm's or a hand-off's task ended with.
async fn ended(task: Waiting, what: &str) -> Result<(), ServiceError> {
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.into()),
        Err(join) => Err(ServiceError::Relay(format!(
            "{what} ended without an answer: {join}"
        ))),
    }
}

/// Where a relay that has not saved its checkpoint yet starts: where a relay of a
/// build before 5 Dec left off.
async fn starting_position(store: &EventStore) -> Result<LogPosition, ServiceError> {
    let saved = store.load_checkpoint(CHECKPOINT).await?;
    if saved != LogPosition::START {
        return Ok(saved);
    }
    Ok(store.load_checkpoint(LEGACY_CHECKPOINT).await?)
}

/// [`PAGE`] as a count of events.
const PAGE_LEN: usize = PAGE as usize;

/// A page routed: the messages to publish, the hand-offs, and the guards of the
/// publishes to queues whose consumers here will take hand-offs once they are
/// confirmed.
#[derive(Default)]
struct Routed {
    messages: Vec<bus::OutgoingMessage>,
    handed: Vec<bus::HandOff>,
    guards: Vec<bus::PublishGuard>,
    /// The queues those guards are for.
    guarded: Vec<&'static str>,
    /// The position of the last event routed.
    last: Option<LogPosition>,
    /// The page ends before its last event read (see [`route`]).
    cut: bool,
}

/// Routes the page's events in log order: each to the service queues that take it,
/// handed over where this process's consumer of the queue has drained it, else
/// addressed to the queue in its message. While a queue drains, a hand-off to it
/// waits; but the drain's marker waits for this page's publishes to that queue, so a
/// page that has one ends before that event instead (which is read and offered again,
/// and a queue it was already handed to ignores it the second time).
async fn route(bus: &Bus, records: Vec<RecordedEvent<String>>) -> Result<Routed, ServiceError> {
    let mut routed = Routed::default();
    for record in records {
        let position = record.log_position();
        let routing_key = event_routing_key(&record);
        let mut message = keyed_event_message(record, routing_key);
        for queue in bus::topology::queues_taking(&message.routing_key) {
            let offer = match bus.try_offer(queue, &message)? {
                Some(offer) => offer,
                None if routed.guarded.contains(&queue) => {
                    routed.cut = true;
                    return Ok(routed);
                }
                None => bus.offer(queue, &message).await?,
            };
            match offer {
                Offer::Handed(handed) => routed.handed.push(handed),
                Offer::Publish(guard) => {
                    message.properties.bcc.push(queue.to_owned());
                    routed.guards.push(guard);
                    if !routed.guarded.contains(&queue) {
                        routed.guarded.push(queue);
                    }
                }
            }
        }
        routed.messages.push(message);
        routed.last = Some(position);
    }
    Ok(routed)
}

/// A page is confirmed: counts what was published and what no queue was bound to, and
/// records the relay's share of a hop per event (from its transaction's start to the
/// confirm).
fn record_delays(relayed: &Relayed, recorded: &[chrono::DateTime<chrono::Utc>]) {
    debug!(
        relayed = relayed.published,
        unrouted = relayed.unrouted,
        "relayed events"
    );
    metrics::counter!(crate::metrics::EVENTS_RELAYED).increment(relayed.published as u64);
    metrics::counter!(crate::metrics::EVENTS_UNROUTED).increment(relayed.unrouted as u64);
    record_since(crate::metrics::RELAY_DELAY_SECONDS, recorded);
}

/// How long the broker's answer "no queue is bound to this routing key" holds before
/// the relay asks again: a queue bound to such a key receives its events from at most
/// this long after the binding.
const UNBOUND_RECHECK: Duration = Duration::from_secs(1);

/// What the relay knows of a routing key that no service of ours binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// A queue is bound to it. Kept: publishing to a key whose queue has gone only
    /// costs what publishing every event cost before.
    Routed,
    /// No queue was bound to it when the broker answered, at that instant.
    Unrouted(Instant),
    /// An event of the key is out to ask the broker; the key's later events in the
    /// page are published after the answer.
    Asking,
}

/// What happens to an event on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Published with the events around it.
    Publish,
    /// Published alone, `mandatory`, once everything before it is confirmed, so that
    /// the broker says whether a queue received it; what follows waits for its
    /// answer, which keeps the page in log order.
    Ask,
    /// Not sent: no queue was bound to its key a moment ago, and the broker would drop
    /// it. A third of an order's events go nowhere; their publishes and confirms were
    /// about a tenth of the CPU of an order in the burst.
    Skip,
}

/// What the active relay knows of the queues outside programs bind to the events'
/// routing keys (contract, section 7), learnt from the broker. Asked only for events
/// that need no publish for a service queue: one that does is published with its
/// routing key anyway.
#[derive(Debug, Default)]
struct Bindings {
    keys: std::collections::HashMap<String, Known>,
}

impl Bindings {
    /// Where an event with this key goes; the first of a key that the relay does not
    /// know (or no longer trusts) is sent to ask, and the key's later events are
    /// published with their pages until the answer comes.
    fn route(&mut self, routing_key: &str, now: Instant) -> Route {
        match self.keys.get(routing_key) {
            Some(Known::Routed | Known::Asking) => Route::Publish,
            Some(Known::Unrouted(at)) if now.saturating_duration_since(*at) < UNBOUND_RECHECK => {
                Route::Skip
            }
            _ => {
                self.keys.insert(routing_key.to_owned(), Known::Asking);
                Route::Ask
            }
        }
    }

    fn answered(&mut self, routing_key: &str, routed: bool, now: Instant) {
        let known = if routed {
            Known::Routed
        } else {
            Known::Unrouted(now)
        };
        self.keys.insert(routing_key.to_owned(), known);
    }
}

/// A page's events on their way out, in log order: runs of events published together,
/// between the events sent alone to ask.
#[derive(Default)]
struct SortedPage {
    parts: Vec<Part>,
    skipped: usize,
}

enum Part {
    Together(Vec<bus::OutgoingMessage>),
    Alone(bus::OutgoingMessage),
}

impl SortedPage {
    fn of(messages: Vec<bus::OutgoingMessage>, bindings: &Mutex<Bindings>) -> SortedPage {
        let mut page = SortedPage::default();
        let now = Instant::now();
        let mut bindings = lock(bindings);
        for message in messages {
            let route = if message.properties.bcc.is_empty() {
                bindings.route(&message.routing_key, now)
            } else {
                Route::Publish
            };
            match route {
                Route::Publish => match page.parts.last_mut() {
                    Some(Part::Together(run)) => run.push(message),
                    _ => page.parts.push(Part::Together(vec![message])),
                },
                Route::Ask => page.parts.push(Part::Alone(message)),
                Route::Skip => page.skipped += 1,
            }
        }
        page
    }

    /// Publishes the page in log order and notes the broker's answers. `sent` is told
    /// once the last part is handed to the channel: the next page goes out after it,
    /// without waiting for its confirms. A page that asks waits for the confirms
    /// before each event sent alone (one on another channel could overtake them):
    /// that happens for the first event of a key, and then at most once per
    /// [`UNBOUND_RECHECK`] for each key no queue is bound to.
    async fn publish(
        self,
        bus: &Bus,
        bindings: &Mutex<Bindings>,
        sent: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Relayed, bus::BusError> {
        let mut relayed = Relayed {
            published: 0,
            unrouted: self.skipped,
        };
        let mut sent = Some(sent);
        let parts = self.parts.len();
        for (index, part) in self.parts.into_iter().enumerate() {
            match part {
                Part::Together(run) => {
                    relayed.published += run.len();
                    let tell = if index + 1 == parts {
                        sent.take()
                    } else {
                        None
                    };
                    bus.publish_many_telling(run, tell).await?;
                }
                Part::Alone(message) => {
                    let routed = bus.publish_if_routed(&message).await?;
                    lock(bindings).answered(&message.routing_key, routed, Instant::now());
                    if routed {
                        relayed.published += 1;
                    } else {
                        relayed.unrouted += 1;
                    }
                }
            }
        }
        Ok(relayed)
    }
}

/// What a page's publish did.
struct Relayed {
    /// Events a queue received (or may have: published without asking).
    published: usize,
    /// Events no queue was bound to receive: not sent, or returned by the broker.
    unrouted: usize,
}

fn lock(bindings: &Mutex<Bindings>) -> std::sync::MutexGuard<'_, Bindings> {
    bindings
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records, per event, the time from its transaction's start until now.
fn record_since(histogram: &'static str, recorded: &[chrono::DateTime<chrono::Utc>]) {
    let now = chrono::Utc::now();
    let delay = metrics::histogram!(histogram);
    for at in recorded {
        delay.record((now - *at).to_std().map_or(0.0, |d| d.as_secs_f64()));
    }
}

/// How often the relay saves its checkpoint while it publishes (an idle one saves on
/// its next look, within `FALLBACK_POLL`).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Where the active relay is. It is the only writer of its checkpoint while it holds
/// the lock, so it remembers the position instead of reading it for every page.
#[derive(Default)]
struct Cursor {
    /// The last position published (`None`: read the checkpoint first).
    published: Option<LogPosition>,
    /// The last position saved, and when.
    saved: Option<(LogPosition, Instant)>,
    /// It holds the lock of the relays before 5 Dec, and keeps their checkpoint too.
    legacy: bool,
}

impl Cursor {
    /// Saves the published position, or `holdback` if that is older, if it is newer
    /// than the saved one and the last save is `CHECKPOINT_EVERY` old (or `now`).
    async fn save(
        &mut self,
        store: &EventStore,
        now: bool,
        holdback: Option<LogPosition>,
    ) -> Result<(), ServiceError> {
        let Some(published) = self.published else {
            return Ok(());
        };
        let published = savable(published, holdback);
        let due = match self.saved {
            None => true,
            Some((saved, _)) if saved == published => false,
            Some((_, at)) => now || at.elapsed() >= CHECKPOINT_EVERY,
        };
        if due {
            let mut conn = store.pool().acquire().await?;
            store
                .save_checkpoint(&mut conn, CHECKPOINT, published)
                .await?;
            if self.legacy {
                store
                    .save_checkpoint(&mut conn, LEGACY_CHECKPOINT, published)
                    .await?;
            }
            self.saved = Some((published, Instant::now()));
        }
        Ok(())
    }
}

/// How far the checkpoint may move: past what is published, unless events handed over
/// before that are not settled yet (`holdback`: where their page was read from).
fn savable(published: LogPosition, holdback: Option<LogPosition>) -> LogPosition {
    holdback.map_or(published, |holdback| holdback.min(published))
}

/// Routes the next page after the checkpoint, waits for its confirms and hand-offs
/// and saves the checkpoint; returns how many events it read.
pub async fn relay_page(store: &EventStore, bus: &Bus) -> Result<usize, ServiceError> {
    let (mut cursor, mut flight) = (Cursor::default(), Flight::default());
    // A new flight is empty, so it always reads.
    let read = flight
        .send_next(store, bus, &mut cursor)
        .await?
        .unwrap_or(0);
    flight.settle(&mut cursor, true).await?;
    if read > 0 {
        cursor.save(store, true, None).await?;
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::{
        next_read, savable, Bindings, Cursor, Flight, NextRead, Route, FALLBACK_POLL, PAGE,
        SHORT_PAGE_RECHECK, UNBOUND_RECHECK,
    };
    use eventstore::LogPosition;
    use std::time::{Duration, Instant};

    #[test]
    fn a_key_is_asked_once_then_skipped_while_unbound_and_asked_again_later() {
        let mut bindings = Bindings::default();
        let start = Instant::now();
        let key = "payment.PaymentRequested";
        assert_eq!(bindings.route(key, start), Route::Ask);
        assert_eq!(bindings.route(key, start), Route::Publish, "while asking");
        bindings.answered(key, false, start);
        assert_eq!(bindings.route(key, start), Route::Skip);
        let almost = start + UNBOUND_RECHECK - Duration::from_millis(1);
        assert_eq!(bindings.route(key, almost), Route::Skip);
        let later = start + UNBOUND_RECHECK;
        assert_eq!(bindings.route(key, later), Route::Ask);
        bindings.answered(key, true, later);
        let much_later = later + UNBOUND_RECHECK * 100;
        assert_eq!(
            bindings.route(key, much_later),
            Route::Publish,
            "bound stays bound"
        );
    }

    #[tokio::test]
    async fn the_checkpoint_stops_before_the_oldest_page_with_events_handed_over_and_unsettled(
    ) -> Result<(), String> {
        let at = |global_position| LogPosition {
            transaction_id: 1,
            global_position,
        };
        let mut flight = Flight::default();
        assert_eq!(savable(at(90), flight.holdback()), at(90));
        let (settle, settled) = tokio::sync::oneshot::channel::<()>();
        let waiting = tokio::spawn(async move {
            let _ = settled.await;
            Ok(())
        });
        flight.handing.push_back((at(40), waiting));
        let later = tokio::spawn(async { Ok(()) });
        flight.handing.push_back((at(60), later));
        assert_eq!(flight.holdback(), Some(at(40)));
        assert_eq!(savable(at(90), flight.holdback()), at(40));
        assert_eq!(
            savable(at(30), flight.holdback()),
            at(30),
            "nor past what is published"
        );

        let mut cursor = Cursor::default();
        flight
            .settle(&mut cursor, false)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(flight.holdback(), Some(at(40)), "the oldest is not settled");
        let _ = settle.send(());
        flight
            .settle(&mut cursor, true)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(flight.holdback(), None);
        assert_eq!(savable(at(90), flight.holdback()), at(90));
        Ok(())
    }

    #[test]
    fn the_relay_reads_on_at_once_only_after_a_full_page_or_a_full_flight() {
        let full = usize::try_from(PAGE).unwrap_or(usize::MAX);
        assert_eq!(next_read(Some(full)), NextRead::AtOnce);
        assert_eq!(next_read(None), NextRead::AtOnce);
        assert_eq!(
            next_read(Some(12)),
            NextRead::OnAppendOrAfter(SHORT_PAGE_RECHECK)
        );
        assert_eq!(next_read(Some(0)), NextRead::OnAppendOrAfter(FALLBACK_POLL));
    }
}
