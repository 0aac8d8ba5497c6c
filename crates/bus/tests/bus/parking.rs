//! `Handler::park`: when the in-process retries of a transient failure run out, a
//! handler that can set the message aside (behind its order) gets it instead of the
//! delay tiers and the dead-letter queue; the bus acks only once parking succeeded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bus::{Handler, Incoming, Outcome, COMMAND_INTAKE_QUEUE, DEAD_LETTER_QUEUE};
use futures::future::BoxFuture;

use crate::support::{
    connected, new_id, options, publish_command, ready_count, take_one, Running, DEADLINE,
};

/// Always fails transiently; parks messages routed `order.*` (after `refusals` failed
/// parkings), never `stock.*`.
#[derive(Default)]
struct Parker {
    parked: Arc<Mutex<Vec<(String, String, u32)>>>,
    park_calls: Arc<AtomicUsize>,
    refusals: usize,
}

impl Handler for Parker {
    fn handle(&self, _msg: Incoming) -> BoxFuture<'static, Outcome> {
        Box::pin(async {
            Outcome::Retry {
                reason: "database unavailable".to_owned(),
            }
        })
    }

    fn park(
        &self,
        msg: &Incoming,
        reason: &str,
        attempts: u32,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        if !msg.routing_key.starts_with("order.") {
            return None;
        }
        let call = self.park_calls.fetch_add(1, Ordering::SeqCst);
        let refuse = call < self.refusals;
        let parked = self.parked.clone();
        let entry = (
            msg.message_id.clone().unwrap_or_default(),
            reason.to_owned(),
            attempts,
        );
        Some(Box::pin(async move {
            if refuse {
                return Err("parking lot unavailable".to_owned());
            }
            parked.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
            Ok(())
        }))
    }
}

async fn publish(bus: &bus::Bus, routing_key: &str, id: &str) -> anyhow::Result<()> {
    publish_command(bus, routing_key, id.to_owned()).await?;
    Ok(())
}

#[tokio::test]
async fn a_message_whose_retries_run_out_is_parked_instead_of_dead_lettered() -> anyhow::Result<()>
{
    let (_vhost, bus) = connected().await?;
    let parker = Parker::default();
    let parked = parker.parked.clone();
    let consumer = Running::start(&bus, COMMAND_INTAKE_QUEUE, options(2), Arc::new(parker));
    let (order, stock) = (new_id(), new_id());
    publish(&bus, "order.place", &order).await?;
    publish(&bus, "stock.set", &stock).await?;

    // Without an order, the message still ends in the dead-letter queue.
    let dead = take_one(&bus, DEAD_LETTER_QUEUE).await?;
    assert_eq!(
        dead.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(stock.as_str())
    );
    let entry = testkit::wait_until("the order's message to be parked", DEADLINE, || async {
        Ok(parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .cloned())
    })
    .await?;
    consumer.stop().await?;
    assert_eq!(entry, (order, "database unavailable".to_owned(), 3));
    assert_eq!(
        ready_count(&bus, COMMAND_INTAKE_QUEUE).await?,
        0,
        "parked is acked"
    );
    assert_eq!(ready_count(&bus, DEAD_LETTER_QUEUE).await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_message_that_cannot_be_parked_goes_back_to_the_queue_and_is_parked_later(
) -> anyhow::Result<()> {
    let (_vhost, bus) = connected().await?;
    let parker = Parker {
        refusals: 1,
        ..Parker::default()
    };
    let (parked, calls) = (parker.parked.clone(), parker.park_calls.clone());
    let consumer = Running::start(&bus, COMMAND_INTAKE_QUEUE, options(0), Arc::new(parker));
    let order = new_id();
    publish(&bus, "order.cancel", &order).await?;
    testkit::wait_until("the message to be parked", DEADLINE, || async {
        Ok((!parked.lock().unwrap_or_else(|e| e.into_inner()).is_empty()).then_some(()))
    })
    .await?;
    consumer.stop().await?;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "refused once, then parked");
    assert_eq!(ready_count(&bus, DEAD_LETTER_QUEUE).await?, 0);
    assert_eq!(ready_count(&bus, COMMAND_INTAKE_QUEUE).await?, 0);
    Ok(())
}
