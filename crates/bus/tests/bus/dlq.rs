use bus::{
    dlq_list, dlq_retry, DlqSelector, Outcome, OutgoingProperties, COMMANDS_EXCHANGE,
    COMMAND_INTAKE_QUEUE, DEAD_LETTER_QUEUE,
};
use std::sync::Arc;

use crate::support::{connected, new_id, options, ready_count, FnHandler, Running, Seen, DEADLINE};

/// Dead-letters everything routed `order.place`, acks the rest.
fn rejecting_places(seen: Seen) -> Arc<dyn bus::Handler> {
    Arc::new(FnHandler(move |msg: bus::Incoming| {
        let reject = msg.routing_key == "order.place" && !msg.headers.contains_key("x-fixed");
        seen.push(msg);
        async move {
            if reject {
                Outcome::DeadLetter {
                    reason: "missing field".to_owned(),
                }
            } else {
                Outcome::Ack
            }
        }
    }))
}

#[tokio::test]
async fn dlq_list_shows_dead_letters_without_removing_them_and_dlq_retry_republishes_them(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let seen = Seen::default();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(0),
        rejecting_places(seen.clone()),
    );
    let first = new_id();
    let second = new_id();
    for id in [&first, &second] {
        bus.publish(
            COMMANDS_EXCHANGE,
            "order.place",
            format!("{{\"id\":\"{id}\"}}").into_bytes(),
            OutgoingProperties::new(id.clone()),
        )
        .await?;
    }
    testkit::wait_until("two dead letters", DEADLINE, || async {
        Ok((ready_count(&bus, DEAD_LETTER_QUEUE).await? == 2).then_some(()))
    })
    .await?;
    consumer.stop().await?;

    let listed = dlq_list(&bus, 10).await?;
    assert_eq!(listed.len(), 2);
    let letter = listed
        .iter()
        .find(|l| l.message_id.as_deref() == Some(first.as_str()))
        .ok_or_else(|| anyhow::anyhow!("first not listed: {listed:?}"))?;
    assert_eq!(letter.exchange, COMMANDS_EXCHANGE);
    assert_eq!(letter.routing_key, "order.place");
    assert_eq!(letter.error, "missing field");
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.body, format!("{{\"id\":\"{first}\"}}").into_bytes());
    assert_eq!(dlq_list(&bus, 1).await?.len(), 1, "the limit is honoured");
    // listing twice shows the same: nothing was consumed
    testkit::wait_until("both dead letters back in the queue", DEADLINE, || async {
        Ok((ready_count(&bus, DEAD_LETTER_QUEUE).await? == 2).then_some(()))
    })
    .await?;
    assert_eq!(dlq_list(&bus, 10).await?.len(), 2);

    // retry one: it goes back to the intake queue, the other stays
    let retried = dlq_retry(&bus, DlqSelector::MessageId(first.clone())).await?;
    assert_eq!(retried, 1);
    testkit::wait_until("one message back in the intake queue", DEADLINE, || async {
        Ok((ready_count(&bus, COMMAND_INTAKE_QUEUE).await? == 1).then_some(()))
    })
    .await?;
    testkit::wait_until("one dead letter left", DEADLINE, || async {
        Ok((ready_count(&bus, DEAD_LETTER_QUEUE).await? == 1).then_some(()))
    })
    .await?;
    let left = dlq_list(&bus, 10).await?;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id.as_deref(), Some(second.as_str()));

    // the retried message arrives as first sent, without the x-orderflow-* headers
    let again = Seen::default();
    let consumer = Running::start(&bus, COMMAND_INTAKE_QUEUE, options(0), {
        let again = again.clone();
        Arc::new(FnHandler(move |msg| {
            again.push(msg);
            async { Outcome::Ack }
        }))
    });
    let redelivered = again.wait_for_id(&first).await?;
    consumer.stop().await?;
    assert_eq!(redelivered.exchange, COMMANDS_EXCHANGE);
    assert_eq!(redelivered.routing_key, "order.place");
    assert_eq!(
        redelivered.body,
        format!("{{\"id\":\"{first}\"}}").into_bytes()
    );
    assert!(
        redelivered
            .headers
            .keys()
            .all(|k| !k.starts_with("x-orderflow-")),
        "{:?}",
        redelivered.headers
    );

    assert_eq!(dlq_retry(&bus, DlqSelector::All).await?, 1);
    testkit::wait_until("the dead-letter queue to be empty", DEADLINE, || async {
        Ok((ready_count(&bus, DEAD_LETTER_QUEUE).await? == 0).then_some(()))
    })
    .await?;
    Ok(())
}
