//! Per-order ordering across processes (ADR 0005, "Per-order ordering"): two
//! processes running the commands worker share the command partitions, and every
//! order's (and SKU's) commands are handled one at a time, in publish order, even when
//! one of the processes is SIGKILLed on the way.

use std::net::SocketAddr;

use tokio::process::Child;
use uuid::Uuid;

use crate::harness::{order, stock_stream, System, COMMANDS_EXCHANGE, DEADLINE, INTAKE_QUEUE};

/// Rounds of `stock.set` per SKU: round `r` sets the SKU to `r`.
const ROUNDS: i64 = 8;

/// Where each registered process serves `/metrics` (each bound `127.0.0.1:0`, so that
/// no port chosen in advance can be taken by a parallel test in between).
async fn metrics_addrs(system: &System) -> anyhow::Result<Vec<SocketAddr>> {
    let addrs: Vec<Option<String>> = sqlx::query_scalar("SELECT http_addr FROM workers")
        .fetch_all(system.pool())
        .await?;
    addrs
        .into_iter()
        .map(|addr| Ok(addr.unwrap_or_default().parse::<SocketAddr>()?))
        .collect()
}

/// `orderflow_messages_handled_total{worker="commands"}` of the process serving `addr`.
async fn commands_handled(addr: SocketAddr) -> anyhow::Result<f64> {
    let metrics = testkit::http::scrape(addr).await?;
    Ok(testkit::http::sample(
        &metrics,
        "orderflow_messages_handled_total{worker=\"commands\"}",
    )
    .unwrap_or(0.0))
}

/// How many processes own command partitions, waited for until it is `processes`,
/// all partitions are owned and one process owns the router (the advisory locks of
/// `services::partitions`).
async fn wait_owners(system: &System, processes: i64) -> anyhow::Result<()> {
    testkit::wait_until(
        &format!("{processes} process(es) to own all 8 command partitions"),
        DEADLINE,
        || async {
            // one row per lock class: the command partitions (8 locks) and the router (1)
            let classes: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT count(DISTINCT pid), count(*) FROM pg_locks
                  WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND objid > 0
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  GROUP BY classid",
            )
            .fetch_all(system.pool())
            .await?;
            let partitions_owned = classes
                .iter()
                .any(|(owners, owned)| *owners == processes && *owned == 8);
            let router_owned = classes
                .iter()
                .any(|(owners, owned)| *owners == 1 && *owned == 1);
            Ok((partitions_owned && router_owned).then_some(()))
        },
    )
    .await
    .map_err(|e| e.context(system.log_hint()))
}

/// Publishes rounds `rounds` of `stock.set` for every SKU, round by round, so that
/// each SKU's sets are published back to back with other SKUs' in between.
async fn set_rounds(
    system: &System,
    skus: &[String],
    rounds: std::ops::RangeInclusive<i64>,
) -> anyhow::Result<()> {
    for round in rounds {
        for sku in skus {
            system
                .send(
                    "stock.set",
                    serde_json::json!({"sku": sku, "quantity": round}),
                )
                .await?;
        }
    }
    Ok(())
}

/// Every SKU's `StockSet` quantities in log order are 1, 2, …, ROUNDS: handled in
/// publish order, none twice.
async fn assert_sets_in_publish_order(system: &System, skus: &[String]) -> anyhow::Result<()> {
    let expected: Vec<i64> = (1..=ROUNDS).collect();
    for sku in skus {
        let sets: Vec<i64> = system
            .events(&stock_stream(sku))
            .await?
            .into_iter()
            .filter(|(event_type, _)| event_type == "StockSet")
            .map(|(_, payload)| payload["quantity"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(sets, expected, "stock.set of {sku} in log order");
    }
    Ok(())
}

fn skus(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn kill(mut child: Child) -> anyhow::Result<()> {
    child.kill().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_share_the_commands_and_keep_every_orders_in_publish_order(
) -> anyhow::Result<()> {
    let system = System::start(&[
        ("ORDERFLOW_HTTP_ADDR", "127.0.0.1:0"),
        ("ORDERFLOW_REVIEW_THRESHOLD_CENTS", "1000"),
    ])
    .await?;
    let second = system.spawn_process("second", &["commands"], &[]).await?;
    wait_owners(&system, 2).await?;

    // Stock sets, many SKUs, each set 1..=ROUNDS back to back.
    let skus = skus("PART", 24);
    set_rounds(&system, &skus, 1..=ROUNDS).await?;

    // Review orders (total 1500 >= 1000): each placed and at once cancelled or approved.
    system.set_stock("PART-ORDERS", 1_000).await?;
    system.wait_stock("PART-ORDERS", (1_000, 0)).await?;
    let ids: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        system
            .place(order(
                *id,
                &[("PART-ORDERS", 1, 1_500)],
                "tok_ok",
                Some("express"),
            ))
            .await?;
        if n % 2 == 0 {
            system
                .send(
                    "order.cancel",
                    serde_json::json!({"order_id": id, "reason": "changed my mind"}),
                )
                .await?;
        } else {
            system
                .send(
                    "order.approve",
                    serde_json::json!({"order_id": id, "reviewer": "e2e"}),
                )
                .await?;
        }
    }
    system.wait_commands_handled().await?;
    for (n, id) in ids.iter().enumerate() {
        if n % 2 == 0 {
            system.wait_status(*id, "cancelled", DEADLINE).await?;
            let (_, reason) = system.status(*id).await?.unwrap_or_default();
            assert_eq!(reason.as_deref(), Some("customer_cancelled"), "order {id}");
        } else {
            system.wait_status(*id, "delivered", DEADLINE).await?;
        }
    }
    assert_sets_in_publish_order(&system, &skus).await?;

    // Both processes handled commands: the load is shared.
    let addrs = metrics_addrs(&system).await?;
    assert_eq!(addrs.len(), 2, "two processes registered: {addrs:?}");
    let mut handled = Vec::new();
    for addr in addrs {
        handled.push(commands_handled(addr).await?);
    }
    assert!(
        handled.iter().all(|n| *n > 0.0),
        "commands handled per process: {handled:?}"
    );
    kill(second).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_process_partitions_are_taken_over_and_order_is_kept() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    let second = system.spawn_process("second", &["commands"], &[]).await?;
    wait_owners(&system, 2).await?;

    let skus = skus("KILL", 16);
    set_rounds(&system, &skus, 1..=ROUNDS / 2).await?;
    // SIGKILL while the first rounds are still being handled
    kill(second).await?;
    set_rounds(&system, &skus, ROUNDS / 2 + 1..=ROUNDS).await?;

    wait_owners(&system, 1).await?;
    system.wait_commands_handled().await?;
    for sku in &skus {
        system.wait_stock(sku, (ROUNDS, 0)).await?;
    }
    assert_sets_in_publish_order(&system, &skus).await?;
    // nothing was dead-lettered on the way
    assert_eq!(
        system
            .queue_depth(crate::harness::DEAD_LETTER_QUEUE)
            .await?,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_an_older_build_routes_to_the_old_intake_are_still_handled_once(
) -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    // An older build still running binds the old intake again: every command then
    // reaches it and the router's queue both.
    system.bind(INTAKE_QUEUE, COMMANDS_EXCHANGE, "#").await?;
    let skus = skus("OLD", 4);
    set_rounds(&system, &skus, 1..=ROUNDS).await?;
    system.wait_commands_handled().await?;
    // Handled through both queues, with one effect each. (Their order is not kept
    // while both queues get the commands: the two copies race to the partition.)
    for sku in &skus {
        system
            .wait_event(&stock_stream(sku), "StockSet", usize::try_from(ROUNDS)?)
            .await?;
    }
    let routed = system
        .cli(&["dlq", "list"])
        .await
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())?;
    assert!(
        !routed.contains("stock.set"),
        "nothing dead-lettered: {routed}"
    );
    for sku in &skus {
        let sets = system.count(&stock_stream(sku), "StockSet").await?;
        assert_eq!(
            sets,
            usize::try_from(ROUNDS)?,
            "{sku}: one StockSet per command"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_router_moves_to_another_process_when_its_owner_is_killed() -> anyhow::Result<()> {
    let mut system = System::start(&[]).await?;
    let second = system.spawn_process("second", &["commands"], &[]).await?;
    wait_owners(&system, 2).await?;

    let skus = skus("ROUTER", 16);
    set_rounds(&system, &skus, 1..=ROUNDS / 2).await?;
    // SIGKILL the first process: it owns the router (it started first) and half of
    // the partitions, and it may be forwarding or handling the first rounds now
    system.kill_worker().await?;
    set_rounds(&system, &skus, ROUNDS / 2 + 1..=ROUNDS).await?;

    wait_owners(&system, 1).await?;
    system.wait_commands_handled().await?;
    // the log, not the read models: the killed process ran the projector
    for sku in &skus {
        system
            .wait_event(&stock_stream(sku), "StockSet", usize::try_from(ROUNDS)?)
            .await?;
    }
    assert_sets_in_publish_order(&system, &skus).await?;
    kill(second).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_router_and_partitions_are_handed_over_in_order_when_their_owner_stops(
) -> anyhow::Result<()> {
    let mut system = System::start(&[]).await?;
    let second = system.spawn_process("second", &["commands"], &[]).await?;
    wait_owners(&system, 2).await?;

    // SIGTERM to the owner of the router and of half the partitions while commands
    // keep coming (published by another client): the other process must take over
    // after what the stopping one had taken, not before it.
    let skus = skus("STOP", 48);
    let publisher = tokio::spawn(publish_rounds_from_elsewhere(
        system.vhost.url.clone(),
        skus.clone(),
    ));
    let stopped = system
        .terminate_worker(std::time::Duration::from_secs(40))
        .await?;
    anyhow::ensure!(
        stopped.success(),
        "orderflow run did not stop cleanly: {stopped}"
    );
    publisher.await??;

    wait_owners(&system, 1).await?;
    system.wait_commands_handled().await?;
    for sku in &skus {
        system
            .wait_event(&stock_stream(sku), "StockSet", usize::try_from(ROUNDS)?)
            .await?;
    }
    assert_sets_in_publish_order(&system, &skus).await?;
    kill(second).await
}

/// Publishes rounds 1..=ROUNDS of `stock.set` for `skus` on a connection of its own.
async fn publish_rounds_from_elsewhere(url: String, skus: Vec<String>) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::ShortString;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for round in 1..=ROUNDS {
        for sku in &skus {
            let body = serde_json::to_vec(&serde_json::json!({"sku": sku, "quantity": round}))?;
            let properties = BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from(Uuid::new_v4().to_string()))
                .with_delivery_mode(2);
            let confirmation = channel
                .basic_publish(
                    ShortString::from(COMMANDS_EXCHANGE),
                    ShortString::from("stock.set"),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?
                .await?;
            anyhow::ensure!(confirmation.is_ack(), "stock.set of {sku} not confirmed");
        }
    }
    Ok(())
}
