//! Confirmed publishing: every publish waits for the broker's confirm (a nack is an
//! error), and transient failures are retried on a fresh channel/connection with
//! backoff. A publish may therefore reach the broker twice; consumers dedupe on
//! `message_id`.

use backoff::backoff::Backoff;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use tokio::sync::oneshot;
use tracing::warn;

use crate::connection::reconnect_schedule;
use crate::message::short;
use crate::{Bus, BusError, OutgoingMessage, OutgoingProperties};

/// One message ready for the wire.
pub(crate) struct Prepared<'a> {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub body: &'a [u8],
    pub properties: BasicProperties,
    /// Unroutable is an error (the broker returns the message).
    pub mandatory: bool,
}

impl<'a> Prepared<'a> {
    pub(crate) fn new(
        exchange: &str,
        routing_key: &str,
        body: &'a [u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<Self, BusError> {
        Ok(Prepared {
            exchange: short("exchange", exchange)?,
            routing_key: short("routing key", routing_key)?,
            body,
            properties,
            mandatory,
        })
    }

    fn describe(&self) -> String {
        format!(
            "publishing to exchange {:?} with routing key {:?}",
            self.exchange.as_str(),
            self.routing_key.as_str()
        )
    }

    async fn send(&self, channel: &lapin::Channel) -> Result<PublisherConfirm, BusError> {
        channel
            .basic_publish(
                self.exchange.clone(),
                self.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: self.mandatory,
                    ..BasicPublishOptions::default()
                },
                self.body,
                self.properties.clone(),
            )
            .await
            .map_err(|e| BusError::amqp(self.describe(), e))
    }

    async fn confirmed(&self, confirm: PublisherConfirm) -> Result<(), BusError> {
        let confirmation = confirm.await.map_err(|e| {
            BusError::amqp(format!("waiting for the confirm of {}", self.describe()), e)
        })?;
        let message_id = self
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string);
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            // Every publishing channel is in confirm mode: a publish without a confirm
            // is not known to have reached the broker, so it goes out again.
            Confirmation::NotRequested => Err(BusError::NoAnswer {
                operation: format!("{} (no confirm requested on the channel)", self.describe()),
                waited: std::time::Duration::ZERO,
            }),
            Confirmation::Ack(Some(_)) => Err(BusError::Unroutable {
                exchange: self.exchange.to_string(),
                routing_key: self.routing_key.to_string(),
                message_id,
            }),
            Confirmation::Nack(_) => Err(BusError::Nacked {
                exchange: self.exchange.to_string(),
                routing_key: self.routing_key.to_string(),
                message_id,
            }),
        }
    }
}

impl Bus {
    /// Publishes one message (persistent, `application/json`) and waits for the broker's
    /// confirm. A nack is an error; connection failures are retried (reconnecting) for
    /// up to `publish_timeout`.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        props: OutgoingProperties,
    ) -> Result<(), BusError> {
        let message = Prepared::new(exchange, routing_key, &body, props.to_amqp()?, false)?;
        self.publish_prepared(&message).await
    }

    /// Publishes all messages, then waits for all confirms (pipelined). Messages not
    /// confirmed because the connection failed are published again after reconnecting.
    /// Returns the first nack as an error.
    pub async fn publish_many(&self, messages: Vec<OutgoingMessage>) -> Result<(), BusError> {
        self.publish_many_telling(messages, None).await
    }

    /// [`Bus::publish_many`] that also tells `sent` once its first pass has handed
    /// every message to the channel (or given up on the pass), before the confirms
    /// come: a caller that publishes the next batch only then keeps the broker's order
    /// of the two batches while their confirms overlap.
    pub async fn publish_many_telling(
        &self,
        messages: Vec<OutgoingMessage>,
        sent: Option<oneshot::Sender<()>>,
    ) -> Result<(), BusError> {
        let prepared = messages
            .iter()
            .map(|m| {
                Prepared::new(
                    &m.exchange,
                    &m.routing_key,
                    &m.body,
                    m.properties.to_amqp()?,
                    false,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.publish_all(&prepared, sent).await
    }

    /// Publishes one message with `mandatory` set and waits for the confirm: `false`
    /// when no queue is bound to receive it (the broker returned it), `true` when one
    /// is. Other failures are errors, as for [`Bus::publish`].
    pub async fn publish_if_routed(&self, message: &OutgoingMessage) -> Result<bool, BusError> {
        let prepared = Prepared::new(
            &message.exchange,
            &message.routing_key,
            &message.body,
            message.properties.to_amqp()?,
            true,
        )?;
        match self.publish_prepared(&prepared).await {
            Ok(()) => Ok(true),
            Err(BusError::Unroutable { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    pub(crate) async fn publish_prepared(&self, message: &Prepared<'_>) -> Result<(), BusError> {
        self.publish_all(std::slice::from_ref(message), None).await
    }

    async fn publish_all(
        &self,
        messages: &[Prepared<'_>],
        mut sent: Option<oneshot::Sender<()>>,
    ) -> Result<(), BusError> {
        let mut pending: Vec<&Prepared<'_>> = messages.iter().collect();
        let mut schedule = reconnect_schedule(self.options().publish_timeout);
        while !pending.is_empty() {
            let (unconfirmed, error) = self.publish_round(&pending, &mut sent).await;
            match error {
                None => pending = unconfirmed,
                Some(err) if err.is_transient() => match schedule.next_backoff() {
                    Some(pause) => {
                        warn!(error = %err, unconfirmed = unconfirmed.len(), retry_in = ?pause, "publish failed; retrying");
                        tokio::time::sleep(pause).await;
                        pending = unconfirmed;
                    }
                    None => return Err(err),
                },
                Some(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// One pass: publish everything pending, then await the confirms. Returns what is
    /// still unconfirmed and the first error.
    async fn publish_round<'m, 'b>(
        &self,
        pending: &[&'m Prepared<'b>],
        sent: &mut Option<oneshot::Sender<()>>,
    ) -> (Vec<&'m Prepared<'b>>, Option<BusError>) {
        if pending.iter().any(|m| m.mandatory) {
            let answer = self.publish_returnable(pending).await;
            tell(sent);
            return answer;
        }
        let channel = match self.publish_channel().await {
            Ok(channel) => channel,
            Err(err) => {
                tell(sent);
                return (pending.to_vec(), Some(err));
            }
        };
        let (unconfirmed, error, retire) = self.publish_on(&channel, true, pending, sent).await;
        if retire {
            self.discard_publish_channel(&channel).await;
        }
        (unconfirmed, error)
    }

    /// Mandatory messages, on a leased channel, each confirmed before the next is sent,
    /// so that a returned message is never attributed to another.
    async fn publish_returnable<'m, 'b>(
        &self,
        pending: &[&'m Prepared<'b>],
    ) -> (Vec<&'m Prepared<'b>>, Option<BusError>) {
        let lease = match self.lease_returning_channel().await {
            Ok(lease) => lease,
            Err(err) => return (pending.to_vec(), Some(err)),
        };
        for (i, message) in pending.iter().enumerate() {
            let one = std::slice::from_ref(message);
            let (_, error, retire) = self.publish_on(&lease.channel, false, one, &mut None).await;
            if let Some(error) = error {
                self.give_back(lease, retire).await;
                return (pending[i..].to_vec(), Some(error));
            }
        }
        self.give_back(lease, false).await;
        (Vec::new(), None)
    }

    /// Publishes everything pending on `channel` (`shared`: other tasks publish on it
    /// too), then awaits the confirms. Returns what is still unconfirmed, the first
    /// error, and whether the channel must not be used again.
    async fn publish_on<'m, 'b>(
        &self,
        channel: &lapin::Channel,
        shared: bool,
        pending: &[&'m Prepared<'b>],
        sent: &mut Option<oneshot::Sender<()>>,
    ) -> (Vec<&'m Prepared<'b>>, Option<BusError>, bool) {
        // A send or a confirm that never comes (a channel the broker no longer serves
        // but the client still thinks open) must not hold the publish for ever: past
        // the deadline the channel is given up and what it left unconfirmed goes out
        // again.
        let limit = self.options().publish_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let mut first_error = None;
        // lapin numbers a publish before it sends it: a send that failed leaves its
        // numbering one ahead of the broker's, so the channel must not be used again.
        let mut send_failed = false;
        let mut sent_ones = Vec::with_capacity(pending.len());
        let mut unconfirmed = Vec::new();
        for message in pending {
            if first_error.is_some() {
                unconfirmed.push(*message);
                continue;
            }
            let send = async {
                let _turn = if shared {
                    Some(self.send_turn().await)
                } else {
                    None
                };
                message.send(channel).await
            };
            match tokio::time::timeout_at(deadline, send)
                .await
                .unwrap_or_else(|_| {
                    Err(BusError::NoAnswer {
                        operation: message.describe(),
                        waited: limit,
                    })
                }) {
                Ok(confirm) => sent_ones.push((*message, confirm)),
                Err(err) => {
                    first_error = Some(err);
                    send_failed = true;
                    unconfirmed.push(*message);
                }
            }
        }
        tell(sent);
        for (message, confirm) in sent_ones {
            let confirmed = tokio::time::timeout_at(deadline, message.confirmed(confirm))
                .await
                .unwrap_or_else(|_| {
                    Err(BusError::NoAnswer {
                        operation: format!("waiting for the confirm of {}", message.describe()),
                        waited: limit,
                    })
                });
            if let Err(err) = confirmed {
                unconfirmed.push(message);
                // a nack or an unroutable message outranks a transient failure
                let replace = match &first_error {
                    None => true,
                    Some(previous) => previous.is_transient() && !err.is_transient(),
                };
                if replace {
                    first_error = Some(err);
                }
            }
        }
        let retire = send_failed || matches!(first_error, Some(BusError::NoAnswer { .. }));
        (unconfirmed, first_error, retire)
    }
}

/// Tells whoever waits for the first pass's sends, once.
fn tell(sent: &mut Option<oneshot::Sender<()>>) {
    if let Some(sent) = sent.take() {
        let _ = sent.send(());
    }
}

#[cfg(test)]
mod tests {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;
    use crate::{OutgoingProperties, COMMAND_INTAKE_QUEUE};

    // More threads than cores and many tasks: lapin's two steps of a publish must meet
    // another task's often enough for a run to catch them.
    const TASKS: usize = 32;
    const EACH: usize = 100;

    /// Every task publishes `EACH` messages at once with the others, alternating
    /// between a queue that takes them and `refusing`; fails naming the publishes whose
    /// answer was not their own (a good message refused, or a refused one confirmed).
    async fn each_gets_its_own_answer(
        bus: &Bus,
        refusing: &'static str,
        mandatory: bool,
        refused: fn(&BusError) -> bool,
    ) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let bus = bus.clone();
            tasks.push(tokio::spawn(async move {
                let mut wrong = Vec::new();
                for i in 0..EACH {
                    let good = (task + i) % 2 == 0;
                    let queue = if good { COMMAND_INTAKE_QUEUE } else { refusing };
                    let properties = OutgoingProperties::new(format!("{task}-{i}")).to_amqp()?;
                    let message = Prepared::new("", queue, b"{}", properties, mandatory)?;
                    let result = bus.publish_prepared(&message).await;
                    let own = match &result {
                        Ok(()) => good,
                        Err(error) => !good && refused(error),
                    };
                    if !own {
                        wrong.push(format!("{task}-{i} good={good}: {result:?}"));
                    }
                }
                Ok::<_, anyhow::Error>(wrong)
            }));
        }
        let mut wrong = Vec::new();
        for task in tasks {
            wrong.extend(task.await??);
        }
        anyhow::ensure!(
            wrong.is_empty(),
            "{} misattributed: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        Ok(())
    }

    /// Many tasks publish on the one shared confirm channel at once, half of their
    /// messages to a queue whose length limit makes the broker refuse them (a nack).
    /// Each publisher must get the broker's answer for its own message: a confirm
    /// handed to the wrong publisher lets a message pass as confirmed that the broker
    /// only confirmed for its neighbour (the relay would move past an event that was
    /// never stored).
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_publishers_each_get_the_confirm_of_their_own_message() -> anyhow::Result<()>
    {
        let vhost = testkit::TestVhost::new().await?;
        let bus = Bus::connect(&vhost.url).await?;
        let channel = bus.open_channel().await?;
        let mut full = FieldTable::default();
        full.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        full.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        channel
            .queue_declare("always-full".into(), QueueDeclareOptions::default(), full)
            .await?;
        each_gets_its_own_answer(&bus, "always-full", false, |error| {
            matches!(error, BusError::Nacked { .. })
        })
        .await
    }

    /// The same with mandatory publishes, half of them to a queue that does not exist:
    /// the broker returns those, and each return must reach its own publisher (lapin
    /// hands a return to whichever confirm completes next).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_mandatory_publishers_each_get_their_own_return() -> anyhow::Result<()> {
        let vhost = testkit::TestVhost::new().await?;
        let bus = Bus::connect(&vhost.url).await?;
        each_gets_its_own_answer(&bus, "no-such-queue", true, |error| {
            matches!(error, BusError::Unroutable { .. })
        })
        .await
    }
}
