use std::sync::Arc;

use bus::{Outcome, COMMAND_INTAKE_QUEUE};

use crate::support::{
    connected, new_id, options, publish_command, FnHandler, Running, Seen, DEADLINE,
};

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
    publish_command(&bus, "order.place", before.clone()).await?;
    seen.wait_for_id(&before).await?;

    vhost.close_all_connections().await?;

    let after = new_id();
    publish_command(&bus, "order.place", after.clone()).await?;
    seen.wait_for_id(&after).await?;
    consumer.stop().await?;
    testkit::wait_until("the bus to have reconnected", DEADLINE, || async {
        Ok((bus.connects() >= 2).then_some(()))
    })
    .await?;
    Ok(())
}

/// Holds its one lane on the first message until released; records every message.
struct HoldingFirst {
    seen: Seen,
    first: String,
    release: Arc<tokio::sync::Semaphore>,
}

impl bus::Handler for HoldingFirst {
    fn handle(&self, msg: bus::Incoming) -> futures::future::BoxFuture<'static, Outcome> {
        let hold = msg.message_id.as_deref() == Some(self.first.as_str()) && !msg.redelivered;
        self.seen.push(msg);
        let release = self.release.clone();
        Box::pin(async move {
            if hold {
                let _ = release.acquire().await;
            }
            Outcome::Ack
        })
    }

    fn ordering_key(&self, _msg: &bus::Incoming) -> Option<String> {
        Some("one lane".to_owned())
    }
}

/// Messages queued in a lane behind a slow one came on a channel that died meanwhile:
/// the broker requeues them and delivers them again on the new channel. They are not
/// handled on the dead channel (the work would be done twice, and each ack would fail
/// while the lane and the permits behind it wait): each is handled once, redelivered.
#[tokio::test]
async fn messages_queued_on_a_channel_that_died_are_left_for_redelivery() -> anyhow::Result<()> {
    let (vhost, bus) = connected().await?;
    let seen = Seen::default();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let ids: Vec<String> = (0..4).map(|_| new_id()).collect();
    let handler = HoldingFirst {
        seen: seen.clone(),
        first: ids[0].clone(),
        release: release.clone(),
    };
    let consumer = Running::start(&bus, COMMAND_INTAKE_QUEUE, options(3), Arc::new(handler));
    for id in &ids {
        publish_command(&bus, "order.place", id.clone()).await?;
    }
    seen.wait_for_id(&ids[0]).await?;
    testkit::wait_until("all four delivered to the consumer", DEADLINE, || async {
        let (ready, unacked) = vhost.queue_counts(COMMAND_INTAKE_QUEUE).await?;
        Ok((ready == 0 && unacked == 4).then_some(()))
    })
    .await?;

    vhost.close_all_connections().await?;
    // Once the bus has a new connection, the client knows the old one is gone.
    testkit::wait_until("the bus to reconnect", DEADLINE, || async {
        let _ = bus.open_channel().await;
        Ok((bus.connects() >= 2).then_some(()))
    })
    .await?;
    release.add_permits(1);

    for id in &ids[1..] {
        seen.wait_for_id(id).await?;
    }
    testkit::wait_until("the queue to be empty", DEADLINE, || async {
        let (ready, unacked) = vhost.queue_counts(COMMAND_INTAKE_QUEUE).await?;
        Ok((ready == 0 && unacked == 0).then_some(()))
    })
    .await?;
    consumer.stop().await?;
    for id in &ids[1..] {
        let handled: Vec<bool> = seen
            .all()
            .into_iter()
            .filter(|m| m.message_id.as_deref() == Some(id.as_str()))
            .map(|m| m.redelivered)
            .collect();
        assert_eq!(
            handled,
            [true],
            "message {id}: handled once, as redelivered"
        );
    }
    Ok(())
}
