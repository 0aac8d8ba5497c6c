use std::sync::Arc;

use bus::{Outcome, OutgoingMessage, OutgoingProperties, COMMANDS_EXCHANGE, COMMAND_INTAKE_QUEUE};

use crate::support::{
    connected, new_id, options, publish_command, FnHandler, Running, Seen, DEADLINE,
};

#[tokio::test]
async fn a_confirmed_publish_is_consumed_with_its_properties_intact() -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let id = new_id();
    let timestamp = chrono::DateTime::from_timestamp(1_700_000_000, 0)
        .ok_or_else(|| anyhow::anyhow!("bad timestamp"))?;
    let props = OutgoingProperties {
        message_id: id.clone(),
        correlation_id: Some("corr-1".to_owned()),
        message_type: Some("PlaceOrder".to_owned()),
        headers: [("x-tenant".to_owned(), "acme".to_owned())].into(),
        timestamp: Some(timestamp),
        bcc: Vec::new(),
    };
    bus.publish(
        COMMANDS_EXCHANGE,
        "order.place",
        br#"{"a":1}"#.to_vec(),
        props,
    )
    .await?;

    let seen = Seen::default();
    let recorder = seen.clone();
    let consumer = Running::start(
        &bus,
        COMMAND_INTAKE_QUEUE,
        options(0),
        Arc::new(FnHandler(move |msg| {
            recorder.push(msg);
            async { Outcome::Ack }
        })),
    );
    let msg = seen.wait_for_id(&id).await?;
    consumer.stop().await?;

    assert_eq!(msg.exchange, COMMANDS_EXCHANGE);
    assert_eq!(msg.routing_key, "order.place");
    assert_eq!(msg.body, br#"{"a":1}"#);
    assert_eq!(msg.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(msg.message_type.as_deref(), Some("PlaceOrder"));
    assert_eq!(msg.content_type.as_deref(), Some("application/json"));
    assert_eq!(msg.timestamp, Some(timestamp));
    assert_eq!(
        msg.headers.get("x-tenant").map(String::as_str),
        Some("acme")
    );
    assert!(!msg.redelivered);
    // acked: nothing is left behind
    testkit::wait_until("the intake queue to be empty", DEADLINE, || async {
        Ok((crate::support::ready_count(&bus, COMMAND_INTAKE_QUEUE).await? == 0).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn publish_many_delivers_every_message() -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let ids: Vec<String> = (0..50).map(|_| new_id()).collect();
    let messages = ids
        .iter()
        .map(|id| OutgoingMessage {
            exchange: COMMANDS_EXCHANGE.to_owned(),
            routing_key: "stock.set".to_owned(),
            body: b"{}".to_vec(),
            properties: OutgoingProperties::new(id.clone()),
        })
        .collect();
    bus.publish_many(messages).await?;
    testkit::wait_until("50 messages in the intake queue", DEADLINE, || async {
        Ok((crate::support::ready_count(&bus, COMMAND_INTAKE_QUEUE).await? == 50).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn publishing_to_a_missing_exchange_is_an_error_and_the_bus_keeps_working(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let result = bus
        .publish(
            "no.such.exchange",
            "x",
            b"{}".to_vec(),
            OutgoingProperties::new(new_id()),
        )
        .await;
    assert!(result.is_err(), "{result:?}");
    publish_command(&bus, "stock.set", new_id()).await?;
    Ok(())
}
