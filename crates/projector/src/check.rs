//! `orderflow check`: can this build read the whole log, and does its domain still
//! accept every stored history? Run it before switching a deployment to new code.
//!
//! One pass over `events` in `(stream_name, stream_version)` order, a page at a time
//! (keyset pagination on the `(stream_name, stream_version)` unique index), so that
//! memory holds one page and one stream's folded state, however long the log. Each
//! event is
//! 1. decoded with the current code (`DomainEvent::decode`, upcasters included), its
//!    metadata too (the projector and relay need it),
//! 2. written back at the current schema version and decoded again, which must give
//!    the same event (the current code can write what it reads),
//! 3. checked against the decision functions' guards on its stream's folded state
//!    (`domain::history`).
//!
//! Stream order rather than the gap-safe `read_all`: the log's global order would need
//! every stream's state at once (memory growing with the number of streams), and a
//! check is a snapshot, not a follower: an event committed during the pass is seen or
//! not, and a stream read in two pages is still a prefix of itself (streams only grow
//! at their end).
use std::collections::BTreeMap;
use std::fmt;

use domain::history::StreamHistory;
use domain::DomainEvent;
use eventstore::{EventStore, Metadata};

use crate::ProjectorError;

/// Events read per query.
pub const CHECK_PAGE_SIZE: i64 = 2_000;

/// Failures listed in full; beyond that they are only counted (memory stays flat
/// on a log where everything fails).
pub const MAX_FAILURES_LISTED: usize = 1_000;

/// One stored `(event_type, schema_version)` and how its events fared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeSummary {
    pub events: u64,
    pub failed: u64,
}

/// An event the current code does not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    pub global_position: i64,
    pub stream_name: String,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Keyed by `(event_type, schema_version)`.
    pub types: BTreeMap<(String, i32), TypeSummary>,
    pub streams: u64,
    pub events: u64,
    /// The first [`MAX_FAILURES_LISTED`] failures, in stream order.
    pub failures: Vec<CheckFailure>,
    /// Every failure, listed or not.
    pub failure_count: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.failure_count == 0
    }

    fn record(&mut self, row: &EventRow, outcome: Result<(), String>) {
        self.events += 1;
        let summary = self
            .types
            .entry((row.event_type.clone(), row.schema_version))
            .or_default();
        summary.events += 1;
        let Err(reason) = outcome else {
            return;
        };
        summary.failed += 1;
        self.failure_count += 1;
        if self.failures.len() < MAX_FAILURES_LISTED {
            self.failures.push(CheckFailure {
                global_position: row.global_position,
                stream_name: row.stream_name.clone(),
                stream_version: row.stream_version,
                event_type: row.event_type.clone(),
                schema_version: row.schema_version,
                reason,
            });
        }
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<26} {:>7} {:>7} {:>10} {:>8}",
            "event_type", "stored", "current", "events", "failed"
        )?;
        for ((event_type, version), summary) in &self.types {
            let current = if domain::events::EVENT_TYPES.contains(&event_type.as_str()) {
                domain::events::current_schema_version(event_type).to_string()
            } else {
                "-".to_owned()
            };
            writeln!(
                f,
                "{event_type:<26} {version:>7} {current:>7} {:>10} {:>8}",
                summary.events, summary.failed
            )?;
        }
        for failure in &self.failures {
            writeln!(
                f,
                "FAIL position {} {}@{} {} v{}: {}",
                failure.global_position,
                failure.stream_name,
                failure.stream_version,
                failure.event_type,
                failure.schema_version,
                failure.reason
            )?;
        }
        let unlisted = self.failure_count - self.failures.len() as u64;
        if unlisted > 0 {
            writeln!(f, "… and {unlisted} more failures")?;
        }
        let verdict = if self.is_clean() { "ok" } else { "FAILED" };
        writeln!(
            f,
            "check {verdict}: {} events in {} streams, {} failures",
            self.events, self.streams, self.failure_count
        )
    }
}

#[derive(Debug, sqlx::FromRow)]
struct EventRow {
    global_position: i64,
    stream_name: String,
    stream_version: i64,
    event_type: String,
    schema_version: i32,
    payload: serde_json::Value,
    metadata: serde_json::Value,
}

/// The stream being folded. `history` is `None` when its category is unknown or
/// after one of its events failed to decode (the rest of the stream cannot be folded
/// meaningfully; its events are still decoded and counted).
struct CurrentStream {
    name: String,
    /// The version of the stream's first stored event (0 unless versions are missing).
    first_version: i64,
    history: Option<StreamHistory>,
}

/// Checks every stored event; see the module docs.
pub async fn check(store: &EventStore) -> Result<CheckReport, ProjectorError> {
    let mut report = CheckReport::default();
    let mut current: Option<CurrentStream> = None;
    let mut after = (String::new(), -1);
    loop {
        let rows = page_after(store, &after).await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = (last.stream_name.clone(), last.stream_version);
        for row in &rows {
            let outcome = check_row(&mut current, row);
            if current
                .as_ref()
                .is_some_and(|c| c.first_version == row.stream_version)
            {
                report.streams += 1;
            }
            report.record(row, outcome);
        }
    }
    Ok(report)
}

/// The page of events after `after` in `(stream_name, stream_version)` order. The
/// start is `("", -1)`: before every stream name, the empty one included.
async fn page_after(
    store: &EventStore,
    after: &(String, i64),
) -> Result<Vec<EventRow>, ProjectorError> {
    Ok(sqlx::query_as(
        "SELECT global_position, stream_name, stream_version, event_type, schema_version,
                payload, metadata
           FROM events WHERE (stream_name, stream_version) > ($1, $2)
          ORDER BY stream_name, stream_version LIMIT $3",
    )
    .bind(&after.0)
    .bind(after.1)
    .bind(CHECK_PAGE_SIZE)
    .fetch_all(store.pool())
    .await?)
}

/// Checks one row, starting a new stream in `current` at its first event.
fn check_row(current: &mut Option<CurrentStream>, row: &EventRow) -> Result<(), String> {
    let mut outcome = Ok(());
    if current.as_ref().is_none_or(|c| c.name != row.stream_name) {
        let history = StreamHistory::new(&row.stream_name);
        // An unknown category is reported once, at the stream's first event.
        outcome = history.as_ref().map(drop).map_err(ToString::to_string);
        *current = Some(CurrentStream {
            name: row.stream_name.clone(),
            first_version: row.stream_version,
            history: history.ok(),
        });
    }
    let stream = current.as_mut().map(|stream| check_event(stream, row));
    outcome.and(stream.unwrap_or(Ok(())))
}

/// Decodes one event and folds it into its stream; the reason it fails, if it does.
fn check_event(stream: &mut CurrentStream, row: &EventRow) -> Result<(), String> {
    let event = decode(row).inspect_err(|_| {
        // Later events would be folded onto a state missing this one: stop folding.
        stream.history = None;
    })?;
    match stream.history.as_mut() {
        Some(history) => history
            .accept(row.stream_version, &event)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Decodes payload and metadata as every reader does, and round-trips the event
/// through the current schema version.
fn decode(row: &EventRow) -> Result<DomainEvent, String> {
    serde_json::from_value::<Metadata>(row.metadata.clone())
        .map_err(|e| format!("metadata does not decode: {e}"))?;
    let event = DomainEvent::decode(&row.event_type, row.schema_version, &row.payload)
        .map_err(|e| e.to_string())?;
    let rewritten = DomainEvent::decode(
        event.event_type(),
        event.schema_version(),
        &event.to_payload(),
    )
    .map_err(|e| format!("does not round-trip through the current schema version: {e}"))?;
    if rewritten != event {
        return Err("changes when written at the current schema version and read back".into());
    }
    Ok(event)
}
