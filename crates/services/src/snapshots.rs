//! Snapshots of long streams' folded states: a cache in PostgreSQL, never the truth.
//!
//! A process keeps the streams it decides on folded in memory ([`StreamCache`]), but a
//! process that starts, or a cache that forgot a stream, folds it again from its first
//! event. A popular SKU's stock stream gains events with every order that touches it,
//! so without snapshots the first decision on it after a restart reads the whole
//! history (and holds it in memory at once). With them it reads the last snapshot (one
//! row) and the events after it: at most about [`SNAPSHOT_EVERY`] events.
//!
//! A snapshot is the state folded up to a version of a stream whose events are
//! committed: the state a [`StreamCache`] holds after a read or after its own append.
//! Each names its `format`; one of another format (an older build's, a state whose
//! fields or fold changed) is ignored, the stream is folded from its start, and the
//! next snapshot replaces it. Each also names the event at its version: one whose
//! event is not in the log (a log restored to an earlier point beside newer snapshots)
//! is ignored and replaced the same way. Deleting rows of `stream_snapshots` is always
//! safe.
//!
//! [`StreamCache`]: crate::exec::StreamCache
use std::collections::HashMap;
use std::sync::Mutex;

use domain::StockState;
use eventstore::EventStore;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::ServiceError;

/// A stream gets a new snapshot once it is this many events past its last one.
pub const SNAPSHOT_EVERY: i64 = 500;

/// Streams whose last snapshot version a process remembers; beyond it, it forgets them
/// all (the worst that costs is one snapshot more per stream).
const REMEMBERED: usize = 10_000;

/// How one kind of state is written to and read from a snapshot.
pub struct Snapshots<S> {
    /// Names the encoding and the fold: change it whenever either changes.
    format: &'static str,
    every: i64,
    encode: fn(&S) -> Result<serde_json::Value, serde_json::Error>,
    /// The state from a snapshot's JSON and its version; `None` if it does not read.
    decode: fn(serde_json::Value, i64) -> Option<S>,
    /// The version of each stream's last snapshot this process read or wrote.
    taken: Mutex<HashMap<String, i64>>,
}

impl<S> Snapshots<S> {
    pub fn new(
        format: &'static str,
        every: i64,
        encode: fn(&S) -> Result<serde_json::Value, serde_json::Error>,
        decode: fn(serde_json::Value, i64) -> Option<S>,
    ) -> Snapshots<S> {
        Snapshots {
            format,
            every: every.max(1),
            encode,
            decode,
            taken: Mutex::new(HashMap::new()),
        }
    }

    /// The stream's last snapshot of this format whose event is in the log, as a state
    /// and its version.
    pub async fn load(
        &self,
        store: &EventStore,
        stream: &str,
    ) -> Result<Option<(S, i64)>, ServiceError> {
        let row: Option<(i64, serde_json::Value)> = sqlx::query_as(
            "SELECT s.version, s.state FROM stream_snapshots s
               JOIN events e ON e.stream_name = s.stream_name
                            AND e.stream_version = s.version AND e.event_id = s.event_id
              WHERE s.stream_name = $1 AND s.format = $2",
        )
        .bind(stream)
        .bind(self.format)
        .fetch_optional(store.pool())
        .await?;
        let Some((version, state)) = row else {
            return Ok(None);
        };
        let Some(state) = (self.decode)(state, version) else {
            warn!(
                stream,
                format = self.format,
                version,
                "a snapshot does not read as its format says; the stream is folded from its start"
            );
            return Ok(None);
        };
        self.remember(stream, version);
        Ok(Some((state, version)))
    }

    /// Writes a snapshot of `state` at `version` if the stream is [`SNAPSHOT_EVERY`]
    /// events past its last one. A failure is logged, not returned: the decision that
    /// led here is committed, and the next snapshot is due again later.
    pub async fn take_if_due(&self, store: &EventStore, stream: &str, state: &S, version: i64) {
        let last = self.last_taken(stream);
        if version - last < self.every {
            return;
        }
        self.remember(stream, version);
        let encoded = match (self.encode)(state) {
            Ok(encoded) => encoded,
            Err(error) => {
                warn!(stream, %error, "a stream's state did not encode; no snapshot taken");
                return;
            }
        };
        // Never replaces a newer snapshot of the same format (another process's) that
        // matches the log.
        let written = sqlx::query(
            "INSERT INTO stream_snapshots (stream_name, format, version, event_id, state)
             SELECT $1, $2, $3, e.event_id, $4 FROM events e
              WHERE e.stream_name = $1 AND e.stream_version = $3
             ON CONFLICT (stream_name) DO UPDATE
                SET format = EXCLUDED.format, version = EXCLUDED.version,
                    event_id = EXCLUDED.event_id, state = EXCLUDED.state, taken_at = now()
              WHERE stream_snapshots.format <> EXCLUDED.format
                 OR stream_snapshots.version < EXCLUDED.version
                 OR NOT EXISTS (SELECT 1 FROM events e
                                 WHERE e.stream_name = stream_snapshots.stream_name
                                   AND e.stream_version = stream_snapshots.version
                                   AND e.event_id = stream_snapshots.event_id)",
        )
        .bind(stream)
        .bind(self.format)
        .bind(version)
        .bind(&encoded)
        .execute(store.pool())
        .await;
        match written {
            Ok(_) => debug!(stream, version, "snapshot taken"),
            Err(error) => {
                warn!(stream, version, %error, "a snapshot could not be written; the stream is folded from an older one")
            }
        }
    }

    fn last_taken(&self, stream: &str) -> i64 {
        self.lock().get(stream).copied().unwrap_or(-1)
    }

    fn remember(&self, stream: &str, version: i64) {
        let mut taken = self.lock();
        if taken.len() >= REMEMBERED && !taken.contains_key(stream) {
            taken.clear();
        }
        taken.insert(stream.to_owned(), version);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.taken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The snapshot format of a `stock-<sku>` stream's [`StockState`].
pub const STOCK_FORMAT: &str = "stock/1";

/// A [`StockState`] as a snapshot holds it (JSON has no tuple keys: the open
/// reservations are a list).
#[derive(Debug, Serialize, Deserialize)]
struct StockSnapshot {
    known: bool,
    on_hand: i64,
    reserved: i64,
    /// `(order_id, line, units)` of every open reservation.
    reservations: Vec<(Uuid, u32, i64)>,
}

/// Snapshots of stock streams.
pub fn stock() -> Snapshots<StockState> {
    Snapshots::new(STOCK_FORMAT, SNAPSHOT_EVERY, encode_stock, decode_stock)
}

pub fn encode_stock(state: &StockState) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::to_value(StockSnapshot {
        known: state.known,
        on_hand: state.on_hand,
        reserved: state.reserved,
        reservations: state
            .reservations
            .iter()
            .map(|(&(order_id, line), &units)| (order_id, line, units))
            .collect(),
    })
}

pub fn decode_stock(value: serde_json::Value, version: i64) -> Option<StockState> {
    let snapshot: StockSnapshot = serde_json::from_value(value).ok()?;
    Some(StockState {
        known: snapshot.known,
        on_hand: snapshot.on_hand,
        reserved: snapshot.reserved,
        reservations: snapshot
            .reservations
            .into_iter()
            .map(|(order_id, line, units)| ((order_id, line), units))
            .collect(),
        version: Some(version),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{stock, DomainEvent, Evolve, StockInput};

    fn folded(inputs: &[StockInput]) -> StockState {
        let mut state = StockState::default();
        for input in inputs {
            let events: Vec<DomainEvent> = stock::decide(&state, input.clone());
            for event in &events {
                state.apply(event);
            }
        }
        state
    }

    #[test]
    fn a_stock_state_reads_back_from_its_snapshot_as_it_was() -> Result<(), serde_json::Error> {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let reserve = |order_id, line, quantity| StockInput::Reserve {
            sku: "A".into(),
            order_id,
            line,
            quantity,
        };
        let state = folded(&[
            StockInput::Set {
                sku: "A".into(),
                quantity: 10,
            },
            reserve(a, 0, 2),
            reserve(a, 1, 3),
            reserve(b, 0, 1),
            StockInput::Commit {
                sku: "A".into(),
                order_id: b,
                line: 0,
            },
        ]);
        assert_eq!(state.reservations.len(), 2);
        let version = state.version.unwrap_or(-1);
        let back = decode_stock(encode_stock(&state)?, version);
        assert_eq!(back, Some(state));
        Ok(())
    }

    /// Pins what `stock/1` means: a fixed history folds to this snapshot. If this
    /// fails, `StockState` or its fold changed, and snapshots written by the build
    /// before would now be read wrongly: give `STOCK_FORMAT` a new name, then update
    /// the expected JSON here.
    #[test]
    fn the_stock_format_names_this_fold_of_this_state() -> Result<(), serde_json::Error> {
        use domain::events::{StockCommitted, StockReleased, StockReserved, StockSet};
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let sku = || "A".to_owned();
        let reserved = |order_id, line, quantity| {
            DomainEvent::StockReserved(StockReserved {
                sku: sku(),
                order_id,
                line,
                quantity,
            })
        };
        let history = [
            DomainEvent::StockSet(StockSet {
                sku: sku(),
                quantity: 10,
            }),
            reserved(a, 0, 2),
            reserved(a, 1, 1),
            reserved(b, 0, 3),
            DomainEvent::StockReleased(StockReleased {
                sku: sku(),
                order_id: b,
                line: 0,
                quantity: 3,
            }),
            DomainEvent::StockCommitted(StockCommitted {
                sku: sku(),
                order_id: a,
                line: 0,
                quantity: 2,
            }),
        ];
        let mut state = StockState::default();
        for event in &history {
            state.apply(event);
        }
        assert_eq!(STOCK_FORMAT, "stock/1");
        assert_eq!(state.version, Some(5));
        assert_eq!(
            encode_stock(&state)?,
            serde_json::json!({
                "known": true,
                "on_hand": 7,
                "reserved": 1,
                "reservations": [[a, 1, 1]],
            })
        );
        Ok(())
    }

    #[test]
    fn a_snapshot_that_does_not_read_is_no_state() {
        assert_eq!(decode_stock(serde_json::json!({"on_hand": 3}), 4), None);
    }
}
