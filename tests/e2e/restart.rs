//! A worker process killed mid-flight: a new one picks up where it stopped.

use uuid::Uuid;

use crate::harness::{order, shipment_stream, System, DEADLINE};

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
