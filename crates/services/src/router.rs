//! The command router (ADR 0005, "Per-order ordering"): the one consumer of the intake
//! queue, in the process that owns it (`services::partitions`, like a partition). It
//! decodes each command just far enough to know its order (or its SKU for
//! `stock.set`) and forwards it, body and properties as sent, to that order's
//! partition queue, which one process at a time consumes. Undecodable commands are
//! dead-lettered here, exactly as the intake always did (contract section 2).
//!
//! Forwarding waits for the broker's confirm before the ack; a crash in between
//! forwards a command twice, and the commands worker dedupes it by `message_id`.
use bus::{partition_of, Incoming, Outcome, COMMAND_PARTITIONS, COMMAND_PARTITION_QUEUES};
use domain::commands::{decode, Command};
use futures::future::BoxFuture;
use tracing::warn;

/// The key a command is ordered and partitioned by: its order, else its SKU.
pub fn partition_key(command: &Command) -> String {
    match (command.order_id(), command) {
        (Some(order_id), _) => crate::parking::order_key(order_id),
        (None, Command::SetStock(set)) => format!("sku:{}", set.sku),
        // Every command but stock.set names an order; kept total for new commands.
        (None, _) => "none".to_owned(),
    }
}

/// The partition queue a command goes to.
pub fn partition_queue(command: &Command) -> &'static str {
    let partition = partition_of(&partition_key(command), COMMAND_PARTITIONS);
    COMMAND_PARTITION_QUEUES[partition.min(COMMAND_PARTITIONS - 1)]
}

/// The bus handler of the intake queue.
pub struct CommandRouter;

impl bus::Handler for CommandRouter {
    /// Commands of one order are forwarded one after another, in delivery order (the
    /// next is published only after the previous one's confirm), so the partition
    /// queue holds them in publish order; different orders are forwarded concurrently,
    /// which pipelines their confirms.
    fn ordering_key(&self, msg: &Incoming) -> Option<String> {
        decode(&msg.routing_key, &msg.body)
            .ok()
            .map(|command| partition_key(&command))
    }

    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let outcome = match decode(&msg.routing_key, &msg.body) {
            Ok(command) => Outcome::Forward {
                queue: partition_queue(&command).to_owned(),
            },
            Err(e) => {
                warn!(routing_key = %msg.routing_key, message_id = ?msg.message_id, error = %e, "dead-lettering an undecodable command");
                Outcome::DeadLetter {
                    reason: e.to_string(),
                }
            }
        };
        Box::pin(async move { outcome })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::Handler;

    fn msg(routing_key: &str, body: &str) -> Incoming {
        Incoming {
            routing_key: routing_key.to_owned(),
            body: body.as_bytes().to_vec(),
            ..Incoming::default()
        }
    }

    fn forwarded_to(msg: Incoming) -> Outcome {
        futures::executor::block_on(CommandRouter.handle(msg))
    }

    #[test]
    fn every_command_of_an_order_goes_to_the_same_partition() {
        let id = "7f0c1f2e-9a43-4a53-9a0e-0d6f3f6f4a11";
        let cancel = msg(
            "order.cancel",
            &format!(r#"{{"order_id":"{id}","reason":"x"}}"#),
        );
        let approve = msg(
            "order.approve",
            &format!(r#"{{"order_id":"{}","reviewer":"r"}}"#, id.to_uppercase()),
        );
        assert_eq!(forwarded_to(cancel.clone()), forwarded_to(approve.clone()));
        assert_eq!(
            CommandRouter.ordering_key(&cancel),
            Some(format!("order:{id}"))
        );
        assert_eq!(
            CommandRouter.ordering_key(&cancel),
            CommandRouter.ordering_key(&approve)
        );
        let Outcome::Forward { queue } = forwarded_to(cancel) else {
            panic!("a decodable command is forwarded");
        };
        assert!(COMMAND_PARTITION_QUEUES.contains(&queue.as_str()));
    }

    #[test]
    fn stock_set_is_partitioned_by_sku_and_undecodable_commands_are_dead_lettered() {
        let set = msg("stock.set", r#"{"sku":"A","quantity":1}"#);
        assert_eq!(CommandRouter.ordering_key(&set), Some("sku:A".to_owned()));
        assert!(matches!(forwarded_to(set), Outcome::Forward { .. }));
        let outcome = forwarded_to(msg("order.cancel", "not json"));
        assert!(matches!(outcome, Outcome::DeadLetter { .. }), "{outcome:?}");
        let unknown = forwarded_to(msg("order.teleport", r#"{"order_id":"x"}"#));
        assert!(matches!(unknown, Outcome::DeadLetter { .. }), "{unknown:?}");
    }
}
