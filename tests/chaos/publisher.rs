//! A client publisher that survives the broker closing its connection: it reconnects and
//! publishes again with the same `message_id` (which the contract makes harmless).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use uuid::Uuid;

use crate::harness::COMMANDS_EXCHANGE;

/// How long one publish keeps trying through reconnects (a broker restart included).
const PUBLISH_DEADLINE: Duration = Duration::from_secs(60);

pub struct Publisher {
    url: String,
    link: Option<(Connection, Channel)>,
    /// Publishes repeated after a failure (connection lost, no confirm).
    pub republished: usize,
    /// Connections opened after the first (the broker closed the previous one).
    pub reconnects: usize,
}

impl Publisher {
    pub fn new(url: &str) -> Publisher {
        Publisher {
            url: url.to_owned(),
            link: None,
            republished: 0,
            reconnects: 0,
        }
    }

    async fn channel(&mut self) -> anyhow::Result<&Channel> {
        if self
            .link
            .as_ref()
            .is_some_and(|(c, ch)| !(c.status().connected() && ch.status().connected()))
        {
            self.link = None;
        }
        if self.link.is_none() {
            let connection = Connection::connect(&self.url, ConnectionProperties::default())
                .await
                .context("connecting to RabbitMQ")?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            self.link = Some((connection, channel));
        }
        match &self.link {
            Some((_, channel)) => Ok(channel),
            None => bail!("no channel"),
        }
    }

    async fn try_publish(
        &mut self,
        routing_key: &str,
        body: &[u8],
        message_id: Uuid,
    ) -> anyhow::Result<()> {
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(message_id.to_string()))
            .with_delivery_mode(2);
        let confirmation = self
            .channel()
            .await?
            .basic_publish(
                ShortString::from(COMMANDS_EXCHANGE),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if !confirmation.is_ack() {
            bail!("the broker nacked {routing_key} {message_id}");
        }
        if confirmation.take_message().is_some() {
            bail!("{routing_key} {message_id} was unroutable (returned)");
        }
        Ok(())
    }

    /// Publishes a command with publisher confirms; on any failure reconnects and
    /// publishes it again, same `message_id`, until confirmed or the deadline passes.
    pub async fn publish(
        &mut self,
        routing_key: &str,
        body: &Value,
        message_id: Uuid,
    ) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(body)?;
        let started = Instant::now();
        loop {
            match self.try_publish(routing_key, &bytes, message_id).await {
                Ok(()) => return Ok(()),
                Err(error) if started.elapsed() < PUBLISH_DEADLINE => {
                    eprintln!(
                        "chaos: publish of {routing_key} {message_id} failed ({error:#}); again"
                    );
                    if self.link.take().is_some() {
                        self.reconnects += 1;
                    }
                    self.republished += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    return Err(error.context(format!(
                        "publishing {routing_key} {message_id} for {PUBLISH_DEADLINE:?}"
                    )))
                }
            }
        }
    }
}
