//! A worker process killed mid-flight: a new one picks up where it stopped.

use uuid::Uuid;

use crate::harness::{order, order_stream, shipment_stream, System, DEADLINE};

#[tokio::test(flavor = "multi_thread")]
async fn a_shipped_order_is_delivered_once_after_the_worker_is_killed() -> anyhow::Result<()> {
    let mut system = System::start(&[("ORDERFLOW_DELIVERY_DELAY", "2s")]).await?;
    system.set_stock("PIANO", 1).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("PIANO", 1, 40_000)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;
    system.wait_status(id, "shipped", DEADLINE).await?;

    system.kill_worker().await?;
    assert_eq!(
        system.status(id).await?.map(|(s, _)| s).as_deref(),
        Some("shipped")
    );
    system.start_worker().await?;

    assert_eq!(system.wait_status(id, "delivered", DEADLINE).await?, None);
    assert_eq!(
        system
            .count(&shipment_stream(id), "ShipmentDelivered")
            .await?,
        1
    );
    system.wait_stock("PIANO", (0, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_workers_within_the_deadline_and_nothing_is_lost() -> anyhow::Result<()> {
    let mut system = System::start(&[]).await?;
    system.set_stock("TERM", 100).await?;
    let ids = system
        .place_orders(20, &[("TERM", 1, 250)], "tok_ok")
        .await?;
    // Stop while those orders are in flight: in-flight messages finish or go back to
    // their queue, and the process exits on its own, cleanly, well within its deadline.
    let status = system
        .terminate_worker(std::time::Duration::from_secs(40))
        .await?;
    assert!(
        status.success(),
        "orderflow run exited with {status} on SIGTERM"
    );
    system.start_worker().await?;
    for id in &ids {
        system.wait_status(*id, "completed", DEADLINE).await?;
    }
    system.wait_stock("TERM", (80, 0)).await?;
    system.audit().await
}

/// The relay hands events to the services of its own process (ADR 0005, "Events handed
/// over"). Its process killed while payments were in flight (the gateway answers after
/// 1 s, within the call's 2 s timeout), the process that takes over routes again what the dead one had not settled,
/// since the checkpoint had not passed it: no order waits for its payment timer.
#[tokio::test(flavor = "multi_thread")]
async fn events_a_killed_process_was_handling_are_routed_again_by_the_process_that_takes_over(
) -> anyhow::Result<()> {
    let env = [("ORDERFLOW_GATEWAY_LATENCY", "1s")];
    let mut system = System::start(&env).await?;
    // Every worker, the relay on stand-by: the first process holds its lock.
    let mut second = system.spawn_process("second", &[], &env).await?;
    system.set_stock("HANDED", 1_000).await?;
    let ids = system
        .place_orders(20, &[("HANDED", 1, 500)], "tok_ok")
        .await?;
    // Every reservation recorded: the relay has routed well past the payments'
    // events (and, were it to ignore the hand-offs it waits for, saved a checkpoint
    // past them), which are with the gateway now, in the first process.
    for id in &ids {
        system
            .wait_event(&order_stream(*id), "OrderLineReserved", 1)
            .await?;
    }
    assert_eq!(
        system
            .count(&order_stream(ids[0]), "OrderPaymentCaptured")
            .await?,
        0,
        "the payments are still in flight"
    );
    system.kill_worker().await?;

    for id in &ids {
        system.wait_status(*id, "completed", DEADLINE).await?;
        assert_eq!(
            system
                .count(&order_stream(*id), "OrderPaymentCaptured")
                .await?,
            1,
            "captured once"
        );
    }
    system.audit().await?;
    second.kill().await?;
    Ok(())
}
