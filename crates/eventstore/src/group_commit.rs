//! Group commit for single-stream appends: decisions that many handlers make at the same
//! time go to PostgreSQL together, as one statement and one transaction, instead of one
//! transaction each.
//!
//! Each append keeps its own outcome. The statement inserts the events of every stream
//! that is at its expected version and nothing of the others, which are then explained
//! one by one (`Conflict` or `Duplicate`), exactly as if they had been sent alone. When
//! the statement fails as a whole (a unique key taken by a writer in between, a
//! connection lost), nothing of it was written and every append is sent again alone.
//!
//! Batches form only under load: a few batches may be in flight at once, and an append
//! that finds a free slot goes at once, alone. Appends queue, and so group, only while
//! every slot is busy — the same idea as PostgreSQL's own group commit, one level up,
//! where it also saves the statement, the transaction and the round trip.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use futures::future::join_all;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::append::{expected_as_option, explain_refused, single_statement, EventColumns};
use crate::wakeup::Signals;
use crate::{AppendResult, ExpectedVersion, NewEvent, StoreError};

/// At most this many events in one batch: keeps one statement's arrays modest.
const MAX_BATCH_EVENTS: usize = 500;
/// Appends waiting for a slot, beyond which appenders wait to hand theirs over.
const QUEUE: usize = 1024;

/// One append waiting to be written, and where its outcome goes.
struct Pending {
    stream_name: String,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    outcome: oneshot::Sender<Result<AppendResult, StoreError>>,
}

/// The appenders' side: hands appends to the batching task.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the batching task on the current runtime: at most `in_flight` batches
    /// (each one statement on its own connection) at once.
    pub(crate) fn start(pool: PgPool, signals: Arc<Signals>, in_flight: usize) -> GroupCommit {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(batch_appends(pool, signals, pending, in_flight.max(1)));
        GroupCommit { queue }
    }

    /// Appends handed over and not yet taken into a batch.
    pub(crate) fn waiting(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Appends `events` to `stream_name` (an `Exact` or `NoStream` expectation, at least
    /// one event), together with whatever else is waiting.
    pub(crate) async fn append(
        &self,
        stream_name: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let (outcome, answer) = oneshot::channel();
        let pending = Pending {
            stream_name: stream_name.to_owned(),
            expected,
            events,
            outcome,
        };
        if self.queue.send(pending).await.is_err() {
            return Err(StoreError::GroupCommitStopped);
        }
        answer.await.unwrap_or(Err(StoreError::GroupCommitStopped))
    }
}

/// Takes a free slot, then everything waiting (up to a batch), and writes it on a task
/// of its own. Ends when every `GroupCommit` is dropped and the queue is empty.
async fn batch_appends(
    pool: PgPool,
    signals: Arc<Signals>,
    mut queue: mpsc::Receiver<Pending>,
    in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut held_back = VecDeque::new();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let first = match held_back.pop_front() {
            Some(pending) => pending,
            None => match queue.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let batch = gather(first, &mut held_back, &mut queue);
        tokio::spawn(write(pool.clone(), Arc::clone(&signals), batch, slot));
    }
}

/// A batch: `first`, then what waits, each stream at most once (a second append to a
/// stream waits for the next batch, where the first one's outcome has settled it).
fn gather(
    first: Pending,
    held_back: &mut VecDeque<Pending>,
    queue: &mut mpsc::Receiver<Pending>,
) -> Vec<Pending> {
    let mut streams = HashSet::from([first.stream_name.clone()]);
    let mut events = first.events.len();
    let mut batch = vec![first];
    let mut again = VecDeque::new();
    let mut take = |pending: Pending, again: &mut VecDeque<Pending>| -> bool {
        if events + pending.events.len() > MAX_BATCH_EVENTS {
            again.push_back(pending);
            return false;
        }
        if streams.insert(pending.stream_name.clone()) {
            events += pending.events.len();
            batch.push(pending);
        } else {
            again.push_back(pending);
        }
        true
    };
    let mut full = false;
    while let Some(pending) = held_back.pop_front() {
        if full {
            again.push_back(pending);
        } else {
            full = !take(pending, &mut again);
        }
    }
    while !full {
        match queue.try_recv() {
            Ok(pending) => full = !take(pending, &mut again),
            Err(_) => break,
        }
    }
    *held_back = again;
    batch
}

/// Writes a batch and answers each append; frees the slot when done.
async fn write(
    pool: PgPool,
    signals: Arc<Signals>,
    batch: Vec<Pending>,
    _slot: OwnedSemaphorePermit,
) {
    let outcomes = if batch.len() == 1 {
        vec![alone(&pool, &batch[0]).await]
    } else {
        together(&pool, &batch).await
    };
    if outcomes.iter().any(Result::is_ok) {
        signals.appended(&pool);
    }
    for (pending, outcome) in batch.into_iter().zip(outcomes) {
        // The appender may have given up waiting: its append stands either way.
        let _ = pending.outcome.send(outcome);
    }
}

async fn alone(pool: &PgPool, pending: &Pending) -> Result<AppendResult, StoreError> {
    single_statement(
        pool,
        &pending.stream_name,
        pending.expected,
        &pending.events,
    )
    .await
}

/// One statement for the whole batch; the appends it refused explained one by one; if
/// it failed as a whole, every append again alone.
async fn together(pool: &PgPool, batch: &[Pending]) -> Vec<Result<AppendResult, StoreError>> {
    let written = match insert_ready(pool, batch).await {
        Ok(written) => written,
        Err(error) => {
            tracing::debug!(%error, appends = batch.len(), "a grouped append failed as a whole; sending each alone");
            return join_all(batch.iter().map(|pending| alone(pool, pending))).await;
        }
    };
    join_all(batch.iter().map(|pending| async {
        match written.get(&pending.stream_name) {
            Some(result) => Ok(*result),
            None => Err(explain_refused(
                pool,
                &pending.stream_name,
                pending.expected,
                &pending.events,
            )
            .await
            .unwrap_or_else(|error| error)),
        }
    }))
    .await
}

/// Inserts the events of every stream at its expected version, in the batch's order,
/// in one statement; returns what each written stream now ends at.
async fn insert_ready(
    pool: &PgPool,
    batch: &[Pending],
) -> Result<HashMap<String, AppendResult>, sqlx::Error> {
    let mut streams = Vec::new();
    let mut expected = Vec::new();
    let mut columns = EventColumns::default();
    for pending in batch {
        for event in &pending.events {
            streams.push(pending.stream_name.clone());
            expected.push(expected_as_option(pending.expected));
            columns.push(event);
        }
    }
    let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "WITH input AS ( \
           SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::int[], \
                                $6::jsonb[], $7::jsonb[]) \
             WITH ORDINALITY AS t(stream_name, expected, event_id, event_type, schema_version, \
                                  payload, metadata, ord)), \
         versions AS ( \
           SELECT s.stream_name, s.expected, \
                  (SELECT max(e.stream_version) FROM events e WHERE e.stream_name = s.stream_name) AS v \
           FROM (SELECT DISTINCT stream_name, expected FROM input) AS s), \
         ready AS (SELECT stream_name, v FROM versions WHERE v IS NOT DISTINCT FROM expected), \
         inserted AS ( \
           INSERT INTO events \
             (stream_name, stream_version, event_id, event_type, schema_version, payload, metadata) \
           SELECT i.stream_name, \
                  coalesce(r.v, -1) + row_number() OVER (PARTITION BY i.stream_name ORDER BY i.ord), \
                  i.event_id, i.event_type, i.schema_version, i.payload, i.metadata \
           FROM input i JOIN ready r ON r.stream_name = i.stream_name \
           ORDER BY i.ord \
           RETURNING global_position, stream_name, stream_version) \
         SELECT stream_name, max(global_position), max(stream_version) FROM inserted \
         GROUP BY stream_name",
    )
    .bind(&streams)
    .bind(&expected)
    .bind(&columns.event_ids)
    .bind(&columns.event_types)
    .bind(&columns.schema_versions)
    .bind(&columns.payloads)
    .bind(&columns.metadata)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(stream, position, version)| {
            Some((
                stream,
                AppendResult {
                    next_expected_version: version?,
                    last_global_position: position?,
                },
            ))
        })
        .collect())
}
