use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::{consume, Bus, BusError, ConsumeOptions, Handler, Incoming, Outcome};
use futures::future::BoxFuture;
use lapin::options::BasicGetOptions;
use lapin::types::ShortString;
use testkit::TestVhost;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const DEADLINE: Duration = Duration::from_secs(20);

pub async fn connected() -> anyhow::Result<(TestVhost, Bus)> {
    let vhost = TestVhost::new().await?;
    let bus = Bus::connect(&vhost.url).await?;
    Ok((vhost, bus))
}

/// A handler from a closure.
pub struct FnHandler<F>(pub F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        Box::pin((self.0)(msg))
    }
}

/// Remembers every message a handler saw.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Incoming>>>);

impl Seen {
    pub fn push(&self, msg: Incoming) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
    }

    pub fn all(&self) -> Vec<Incoming> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn ids(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter_map(|m| m.message_id)
            .collect()
    }

    pub async fn wait_for_id(&self, id: &str) -> anyhow::Result<Incoming> {
        testkit::wait_until(&format!("message {id} to be handled"), DEADLINE, || async {
            Ok(self
                .all()
                .into_iter()
                .find(|m| m.message_id.as_deref() == Some(id)))
        })
        .await
    }
}

/// A consumer running in the background until stopped.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), BusError>>,
}

impl Running {
    pub fn start(
        bus: &Bus,
        queue: &str,
        options: ConsumeOptions,
        handler: Arc<dyn Handler>,
    ) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let bus = bus.clone();
        let queue = queue.to_owned();
        let task = tokio::spawn(async move {
            consume(&bus, &queue, options, handler, async {
                let _ = stopped.await;
            })
            .await
        });
        Running {
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task).await???;
        Ok(())
    }
}

pub fn options(max_retries: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch: 10,
        concurrency: 4,
        max_retries,
        consumer_tag_prefix: "bus-test".to_owned(),
        delayed_retry_rounds: 0,
        ..ConsumeOptions::default()
    }
}

/// Publishes an empty JSON command with message id `id` to the commands exchange.
pub async fn publish_command(bus: &Bus, routing_key: &str, id: String) -> Result<(), BusError> {
    bus.publish(
        bus::COMMANDS_EXCHANGE,
        routing_key,
        b"{}".to_vec(),
        bus::OutgoingProperties::new(id),
    )
    .await
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Takes (and removes) the next message of `queue`, waiting until there is one.
pub async fn take_one(bus: &Bus, queue: &str) -> anyhow::Result<lapin::message::Delivery> {
    let channel = bus.open_channel().await?;
    let delivery = testkit::wait_until(&format!("a message in {queue}"), DEADLINE, || async {
        Ok(channel
            .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
            .await?
            .map(|m| m.delivery))
    })
    .await?;
    Ok(delivery)
}

/// Number of ready messages in `queue`.
pub async fn ready_count(bus: &Bus, queue: &str) -> anyhow::Result<u32> {
    let channel = bus.open_channel().await?;
    let declared = channel
        .queue_declare(
            ShortString::from(queue),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}
