//! Partition ownership (ADR 0005): processes of one worker share its partitions
//! fairly through PostgreSQL advisory locks, never own one at the same time, and take
//! over a departed process's partitions. "Processes" here are `consume_owned` runs,
//! each with its own lock connection, as separate processes would have.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use services::partitions::{consume_owned, ConsumeOne, Partitioned};
use testkit::TestDb;
use tokio::sync::oneshot;

const QUEUES: [&str; 8] = ["q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7"];
const DEADLINE: Duration = Duration::from_secs(20);

/// Who consumes which queue right now; records any moment two did at once.
#[derive(Clone, Default)]
struct Consumers {
    now: Arc<Mutex<BTreeMap<&'static str, &'static str>>>,
    overlaps: Arc<Mutex<Vec<String>>>,
    starts: testkit::Starts,
}

impl Consumers {
    fn owned_by(&self, process: &str) -> usize {
        let now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        now.values().filter(|p| **p == process).count()
    }

    fn consume_one(&self, process: &'static str) -> ConsumeOne {
        let consumers = self.clone();
        Arc::new(move |queue, stop| {
            let consumers = consumers.clone();
            Box::pin(async move {
                let started = consumers.starts.start();
                {
                    let mut now = consumers.now.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(other) = now.insert(queue, process) {
                        consumers
                            .overlaps
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("{queue}: {other} and {process}"));
                    }
                }
                stop.await;
                // A consumer takes a moment to settle what it took: it stays until the
                // next consumer starts, so a successor that did not wait would overlap.
                consumers
                    .starts
                    .next_after(started, Duration::from_millis(50))
                    .await;
                consumers
                    .now
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(queue);
                Ok(())
            })
        })
    }
}

fn start(
    db: &TestDb,
    consumers: &Consumers,
    process: &'static str,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), services::ServiceError>>,
) {
    let partitioned = Partitioned {
        worker: "test",
        queues: &QUEUES,
        database_url: db.url.clone(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(consume_owned(
        partitioned,
        consumers.consume_one(process),
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, task)
}

async fn wait_split(consumers: &Consumers, expected: &[(&str, usize)]) -> anyhow::Result<()> {
    testkit::wait_until(
        &format!("partitions split {expected:?}"),
        DEADLINE,
        || async {
            Ok(expected
                .iter()
                .all(|(p, n)| consumers.owned_by(p) == *n)
                .then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_share_the_partitions_fairly_never_at_once_and_take_over_a_departed_ones(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let consumers = Consumers::default();
    let (stop_a, task_a) = start(&db, &consumers, "a");
    wait_split(&consumers, &[("a", 8)]).await?;

    let (stop_b, task_b) = start(&db, &consumers, "b");
    wait_split(&consumers, &[("a", 4), ("b", 4)]).await?;

    // a goes away: b owns everything
    let _ = stop_a.send(());
    task_a.await??;
    wait_split(&consumers, &[("a", 0), ("b", 8)]).await?;

    // a process that dies without stopping (its lock connection dropped) is taken over
    // too: here c is aborted, which drops its connection, as SIGKILL would
    let (_stop_c, task_c) = start(&db, &consumers, "c");
    wait_split(&consumers, &[("b", 4), ("c", 4)]).await?;
    task_c.abort();
    let _ = task_c.await;
    // the aborted consumers of c never ran their exit: forget them
    consumers
        .now
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|_, p| *p != "c");
    wait_split(&consumers, &[("b", 8)]).await?;

    let _ = stop_b.send(());
    task_b.await??;
    let overlaps = consumers
        .overlaps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert!(overlaps.is_empty(), "owned by two at once: {overlaps:?}");
    Ok(())
}
