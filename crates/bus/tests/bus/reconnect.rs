use std::sync::Arc;

use bus::{Outcome, OutgoingProperties, COMMANDS_EXCHANGE, COMMAND_INTAKE_QUEUE};

use crate::support::{connected, new_id, options, FnHandler, Running, Seen, DEADLINE};

#[tokio::test]
async fn the_consumer_and_publisher_recover_after_the_broker_closes_their_connection(
) -> anyhow::Result<()> {
    let (vhost, bus) = connected().await?;
    let seen = Seen::default();
    let recorder = seen.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(3),
        Arc::new(FnHandler(move |msg| {
            recorder.push(msg);
            async { Outcome::Ack }
        })),
    );
    let before = new_id();
    bus.publish(
        COMMANDS_EXCHANGE,
        "order.place",
        b"{}".to_vec(),
        OutgoingProperties::new(before.clone()),
    )
    .await?;
    seen.wait_for_id(&before).await?;

    vhost.close_all_connections().await?;

    let after = new_id();
    bus.publish(
        COMMANDS_EXCHANGE,
        "order.place",
        b"{}".to_vec(),
        OutgoingProperties::new(after.clone()),
    )
    .await?;
    seen.wait_for_id(&after).await?;
    consumer.stop().await?;
    testkit::wait_until("the bus to have reconnected", DEADLINE, || async {
        Ok((bus.connects() >= 2).then_some(()))
    })
    .await?;
    Ok(())
}
