//! Which process consumes which partition queue (ADR 0005, "Per-order ordering").
//!
//! Every process of a worker holds, on a PostgreSQL connection of its own:
//! - a *shared* advisory lock `(class, 0)`: its membership. `pg_locks` counts the
//!   members, and a process that dies (SIGKILL included) loses its locks as soon as
//!   its connection closes, with no heartbeat to wait for;
//! - an *exclusive* advisory lock `(class, 1 + p)` for every partition `p` it owns.
//!
//! Every [`REBALANCE_EVERY`] a process counts the members, takes free partitions up to
//! its fair share (`ceil(partitions / members)`) and gives back those above it. Giving
//! one back stops its consumer first — no more deliveries, in-flight handlers finish,
//! the channel closes and returns what was prefetched — and only then unlocks, so the
//! next owner starts after the last message the previous one handled. The partition
//! queues are single-active-consumer queues too: should two processes ever consume one
//! (a lock connection lost while its consumer still runs), the broker still delivers to
//! one of them at a time.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::ServiceError;

/// How often a process looks at the members and the free partitions.
pub const REBALANCE_EVERY: Duration = Duration::from_millis(500);

/// A partitioned worker: its name and its partition queues.
#[derive(Debug, Clone)]
pub struct Partitioned {
    pub worker: &'static str,
    pub queues: &'static [&'static str],
    pub database_url: String,
}

impl Partitioned {
    /// The first key of the worker's advisory locks: a stable hash of its name
    /// (positive, so that it reads the same as `pg_locks.classid`).
    fn lock_class(&self) -> i32 {
        let hash = bus::partition_of(
            &format!("orderflow.partitions.{}", self.worker),
            i32::MAX as usize,
        );
        i32::try_from(hash).unwrap_or(1)
    }
}

/// Starts consuming one partition queue until the given future resolves.
pub type ConsumeOne = Arc<
    dyn Fn(&'static str, BoxFuture<'static, ()>) -> BoxFuture<'static, Result<(), ServiceError>>
        + Send
        + Sync,
>;

/// A partition this process owns: its consumer and how to stop it.
struct Held {
    queue: &'static str,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServiceError>>,
}

impl Held {
    /// Stops the consumer and waits until it settled everything it took.
    async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(queue = self.queue, %error, "partition consumer failed"),
            Err(error) => warn!(queue = self.queue, %error, "partition consumer panicked"),
        }
    }
}

/// Owns a fair share of `partitioned`'s partitions and consumes them with
/// `consume_one`, until `shutdown`; a lost database connection gives every partition
/// back (consumers stopped first) and starts again.
pub async fn consume_owned(
    partitioned: Partitioned,
    consume_one: ConsumeOne,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let shutdown = shutdown.boxed().shared();
    loop {
        let span = tracing::info_span!("partitions", worker = partitioned.worker);
        match own(&partitioned, &consume_one, shutdown.clone())
            .instrument(span)
            .await
        {
            Ok(()) => return Ok(()),
            Err(error) => {
                warn!(worker = partitioned.worker, %error, "partition ownership lost; starting again");
            }
        }
        tokio::select! {
            biased;
            () = shutdown.clone() => return Ok(()),
            () = tokio::time::sleep(REBALANCE_EVERY) => {}
        }
    }
}

/// One membership: from connecting to shutdown (`Ok`) or a database error.
async fn own(
    partitioned: &Partitioned,
    consume_one: &ConsumeOne,
    shutdown: Shared<BoxFuture<'static, ()>>,
) -> Result<(), ServiceError> {
    let class = partitioned.lock_class();
    let mut conn = PgConnection::connect(&partitioned.database_url).await?;
    sqlx::query("SELECT pg_advisory_lock_shared($1, 0)")
        .bind(class)
        .execute(&mut conn)
        .await?;
    let mut held: BTreeMap<usize, Held> = BTreeMap::new();
    let result = loop {
        if let Err(error) = rebalance(&mut conn, partitioned, class, consume_one, &mut held).await {
            break Err(error);
        }
        tokio::select! {
            biased;
            () = shutdown.clone() => break Ok(()),
            () = tokio::time::sleep(REBALANCE_EVERY) => {}
        }
    };
    // Stop every consumer (all at once: each may wait for its in-flight handlers)
    // before the locks go with the connection.
    futures::future::join_all(std::mem::take(&mut held).into_values().map(Held::stop)).await;
    let _ = conn.close().await;
    result
}

/// One round: forget finished consumers, count the members, take or give back.
async fn rebalance(
    conn: &mut PgConnection,
    partitioned: &Partitioned,
    class: i32,
    consume_one: &ConsumeOne,
    held: &mut BTreeMap<usize, Held>,
) -> Result<(), ServiceError> {
    let finished: Vec<usize> = held
        .iter()
        .filter(|(_, h)| h.task.is_finished())
        .map(|(p, _)| *p)
        .collect();
    for partition in finished {
        if let Some(h) = held.remove(&partition) {
            h.stop().await;
            unlock(conn, class, partition).await?;
        }
    }
    let share = fair_share(partitioned.queues.len(), members(conn, class).await?);
    while held.len() > share {
        let Some((partition, h)) = held.pop_last() else {
            break;
        };
        info!(queue = h.queue, share, "giving a partition back");
        h.stop().await;
        unlock(conn, class, partition).await?;
    }
    for (partition, queue) in partitioned.queues.iter().enumerate() {
        if held.len() >= share {
            break;
        }
        if held.contains_key(&partition) || !try_lock(conn, class, partition).await? {
            continue;
        }
        info!(queue, share, "partition taken");
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        }
        .boxed();
        let task = tokio::spawn(consume_one(queue, stopped));
        held.insert(partition, Held { queue, stop, task });
    }
    Ok(())
}

/// Partitions each of `members` processes owns at most: all of them are owned once
/// every member took its share.
pub fn fair_share(partitions: usize, members: i64) -> usize {
    let members = usize::try_from(members.max(1)).unwrap_or(1);
    partitions.div_ceil(members)
}

/// Live processes of the worker: holders of its membership lock.
async fn members(conn: &mut PgConnection, class: i32) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
          WHERE locktype = 'advisory' AND granted
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND classid::bigint = $1 AND objid::bigint = 0 AND objsubid = 2",
    )
    .bind(i64::from(class))
    .fetch_one(conn)
    .await
}

fn partition_lock(partition: usize) -> i32 {
    i32::try_from(partition).map_or(i32::MAX, |p| p.saturating_add(1))
}

async fn try_lock(
    conn: &mut PgConnection,
    class: i32,
    partition: usize,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(class)
        .bind(partition_lock(partition))
        .fetch_one(conn)
        .await
}

async fn unlock(conn: &mut PgConnection, class: i32, partition: usize) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(class)
        .bind(partition_lock(partition))
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_is_owned_once_every_member_took_its_share() {
        assert_eq!(fair_share(8, 1), 8);
        assert_eq!(fair_share(8, 2), 4);
        assert_eq!(fair_share(8, 3), 3);
        assert_eq!(fair_share(8, 0), 8);
        for members in 1..=10 {
            assert!(fair_share(8, members) * usize::try_from(members).unwrap_or(1) >= 8);
        }
    }
}
