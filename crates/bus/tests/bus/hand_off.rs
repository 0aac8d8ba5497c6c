//! The hand-off in process (ADR 0005): a router forwarding to a queue that a consumer
//! of the same process takes hand-offs for gives it the message directly, once the
//! queue's earlier messages are in the consumer's lanes, and through the queue
//! whenever that consumer is not there.
use std::sync::Arc;

use bus::{header_names, Incoming, Outcome, COMMAND_INTAKE_QUEUE, COMMAND_PARTITION_QUEUES};
use futures::future::BoxFuture;

use crate::support::{connected, ready_count, Running, Seen, DEADLINE};

const KEYS: usize = 12;

/// Bodies are `<key>:<seq>`.
fn key_of(msg: &Incoming) -> String {
    String::from_utf8_lossy(&msg.body)
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn partition_of(key: &str) -> &'static str {
    COMMAND_PARTITION_QUEUES[bus::partition_of(key, COMMAND_PARTITION_QUEUES.len())]
}

/// Forwards each message to its key's partition, one key after another.
struct Router;

impl bus::Handler for Router {
    fn ordering_key(&self, msg: &Incoming) -> Option<String> {
        Some(key_of(msg))
    }

    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let queue = partition_of(&key_of(&msg)).to_owned();
        Box::pin(async move { Outcome::Forward { queue } })
    }
}

/// Records every message, one key after another, a little slowly (so that a backlog
/// takes a while to drain).
struct Partition(Seen);

impl bus::Handler for Partition {
    fn ordering_key(&self, msg: &Incoming) -> Option<String> {
        Some(key_of(msg))
    }

    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        self.0.push(msg);
        Box::pin(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            Outcome::Ack
        })
    }
}

fn partition_options() -> bus::ConsumeOptions {
    bus::ConsumeOptions {
        local_hand_off: true,
        ..crate::support::options(0)
    }
}

fn router_options() -> bus::ConsumeOptions {
    bus::ConsumeOptions {
        prefetch: 64,
        concurrency: 32,
        forwards: true,
        ..crate::support::options(0)
    }
}

fn start_partitions(bus: &bus::Bus, seen: &Seen) -> Vec<Running> {
    COMMAND_PARTITION_QUEUES
        .iter()
        .map(|queue| {
            Running::start(
                bus,
                queue,
                partition_options(),
                Arc::new(Partition(seen.clone())),
            )
        })
        .collect()
}

fn start_router(bus: &bus::Bus) -> Running {
    Running::start(
        bus,
        COMMAND_INTAKE_QUEUE,
        router_options(),
        Arc::new(Router),
    )
}

async fn stop_all(router: Running, partitions: Vec<Running>) -> anyhow::Result<()> {
    router.stop().await?;
    for partition in partitions {
        partition.stop().await?;
    }
    Ok(())
}

fn message(key: usize, seq: usize, exchange: &str, routing_key: &str) -> bus::OutgoingMessage {
    bus::OutgoingMessage {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        body: format!("k{key}:{seq}").into_bytes(),
        properties: bus::OutgoingProperties::new(format!("k{key}-{seq}")),
    }
}

/// Rounds `seqs` of every key, through the router.
async fn through_router(bus: &bus::Bus, seqs: std::ops::Range<usize>) -> anyhow::Result<()> {
    let messages = seqs
        .flat_map(|seq| (0..KEYS).map(move |key| message(key, seq, bus::COMMANDS_EXCHANGE, "k")))
        .collect();
    Ok(bus.publish_many(messages).await?)
}

async fn wait_seen(seen: &Seen, count: usize) -> anyhow::Result<()> {
    testkit::wait_until(&format!("{count} messages handled"), DEADLINE, || async {
        Ok((seen.all().len() >= count).then_some(()))
    })
    .await
}

/// Each key's sequence numbers in the order first handled.
fn first_handled(seen: &Seen, key: usize) -> Vec<usize> {
    let mut order: Vec<usize> = Vec::new();
    for msg in seen.all() {
        if key_of(&msg) != format!("k{key}") {
            continue;
        }
        let seq = String::from_utf8_lossy(&msg.body)
            .rsplit(':')
            .next()
            .and_then(|s| s.parse().ok());
        if let Some(seq) = seq.filter(|seq| !order.contains(seq)) {
            order.push(seq);
        }
    }
    order
}

fn assert_in_order(seen: &Seen, rounds: usize) {
    for key in 0..KEYS {
        let expected: Vec<usize> = (0..rounds).collect();
        assert_eq!(first_handled(seen, key), expected, "key k{key} in order");
    }
}

/// Handed over: it reached the partition's handler as the router received it, without
/// the headers a forward through the queue adds.
fn handed_over(msg: &Incoming) -> bool {
    msg.exchange == bus::COMMANDS_EXCHANGE && !msg.headers.contains_key(header_names::ROUTED_TO)
}

fn handed_over_in(seen: &Seen, seq: usize) -> Vec<bool> {
    seen.all()
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.body).ends_with(&format!(":{seq}")))
        .map(handed_over)
        .collect()
}

/// Waits until every partition's gate is open in this process.
async fn wait_open(bus: &bus::Bus) -> anyhow::Result<()> {
    testkit::wait_until("every partition handing over", DEADLINE, || async {
        Ok(COMMAND_PARTITION_QUEUES
            .iter()
            .all(|queue| bus.hands_over_to(queue))
            .then_some(()))
    })
    .await
}

async fn queued(bus: &bus::Bus) -> anyhow::Result<u32> {
    let mut total = 0;
    for queue in COMMAND_PARTITION_QUEUES {
        total += ready_count(bus, queue).await?;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread")]
async fn forwards_are_handed_over_behind_what_the_queue_held_and_queued_while_no_consumer_is_here(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    // What an earlier router left in the partitions: rounds 0..20 of every key.
    let backlog = (0..20)
        .flat_map(|seq| {
            (0..KEYS).map(move |key| {
                let queue = partition_of(&format!("k{key}"));
                message(key, seq, "", queue)
            })
        })
        .collect();
    bus.publish_many(backlog).await?;

    let seen = Seen::default();
    let partitions = start_partitions(&bus, &seen);
    let router = start_router(&bus);
    // Rounds 20..40 arrive while the backlog drains: none may overtake it.
    through_router(&bus, 20..40).await?;
    wait_seen(&seen, 40 * KEYS).await?;
    assert_in_order(&seen, 40);

    // Drained, and each partition's gate opened once its queue was idle: the next
    // round is handed over, none of it through a queue.
    wait_open(&bus).await?;
    through_router(&bus, 40..41).await?;
    wait_seen(&seen, 41 * KEYS).await?;
    assert_eq!(handed_over_in(&seen, 40), vec![true; KEYS]);
    assert_eq!(queued(&bus).await?, 0);

    // No consumer of the partitions here: forwards wait in their queues.
    for partition in partitions {
        partition.stop().await?;
    }
    through_router(&bus, 41..42).await?;
    testkit::wait_until("a round queued in the partitions", DEADLINE, || async {
        Ok((queued(&bus).await? == u32::try_from(KEYS)?).then_some(()))
    })
    .await?;
    assert_eq!(
        seen.all().len(),
        41 * KEYS,
        "nothing handled without consumers"
    );

    // Back: the queued round first, then hand-offs again.
    let partitions = start_partitions(&bus, &seen);
    wait_seen(&seen, 42 * KEYS).await?;
    assert_eq!(
        handed_over_in(&seen, 41),
        vec![false; KEYS],
        "through the queue"
    );
    wait_open(&bus).await?;
    through_router(&bus, 42..43).await?;
    wait_seen(&seen, 43 * KEYS).await?;
    assert_eq!(
        handed_over_in(&seen, 42),
        vec![true; KEYS],
        "in process again"
    );
    assert_in_order(&seen, 43);

    stop_all(router, partitions).await?;
    assert_eq!(
        ready_count(&bus, COMMAND_INTAKE_QUEUE).await?,
        0,
        "all acked"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_connection_keeps_each_keys_order_and_loses_nothing_handed_over(
) -> anyhow::Result<()> {
    let (vhost, bus) = connected().await?;
    let seen = Seen::default();
    let partitions = start_partitions(&bus, &seen);
    let router = start_router(&bus);
    through_router(&bus, 0..30).await?;
    testkit::wait_until("some messages handled", DEADLINE, || async {
        Ok((seen.all().len() >= 5 * KEYS).then_some(()))
    })
    .await?;
    vhost.close_all_connections().await?;
    through_router(&bus, 30..60).await?;
    testkit::wait_until("every message handled", DEADLINE, || async {
        Ok((0..KEYS)
            .all(|key| first_handled(&seen, key).len() == 60)
            .then_some(()))
    })
    .await?;
    assert_in_order(&seen, 60);
    stop_all(router, partitions).await?;
    Ok(())
}
