//! The commands intake: everything published to `orderflow.commands` arrives here.
//! Undecodable messages are dead-lettered (contract section 2); decoded ones go to the
//! order saga (order.*) or to inventory (stock.set), which may refuse them as events.
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use bus::{Incoming, Outcome};
use chrono::Utc;
use domain::commands::{decode, Command, PlaceOrder};
use domain::{
    order, stock, streams, OrderInput, OrderState, PlacementFacts, Rules, StockInput, StockState,
};
use eventstore::EventStore;
use futures::future::BoxFuture;
use tracing::{info, warn, Instrument};

use crate::exec::{decide_on, decide_on_cached, Cause, Decided, SharedCaches, StreamCache};
use crate::message::{correlation_uuid, message_uuid};
use crate::vault::{SealedPlacement, Vault};
use crate::worker::outcome;
use crate::ServiceError;

/// How long a command about an unknown order waits for its placement: checks × step.
const PLACEMENT_GRACE_CHECKS: u32 = 20;
const PLACEMENT_GRACE_STEP: std::time::Duration = std::time::Duration::from_millis(50);

pub struct CommandService {
    store: EventStore,
    rules: Rules,
    /// SKUs known to have been set. Only grows: a SKU once set stays known.
    known_skus: RwLock<BTreeSet<String>>,
    /// Folded stock streams for `stock.set` (a SKU set often has a long stream).
    stock: StreamCache<StockState>,
    /// Order streams, shared with the process's other workers (the saga goes on from
    /// the state a placement leaves): an `order.place` is decided on the empty stream
    /// without reading it ([`StreamCache::assume_new`]); a re-placed order's stream is
    /// then refused on append and read.
    placing: Arc<StreamCache<OrderState>>,
    /// Which orders exist: placed ones (forever), and ids found unplaced (for a while),
    /// so a flood of commands about orders that do not exist stops at this cache.
    orders: OrderCache,
    /// Queries this service made to find out whether an order exists (for tests and
    /// metrics: the cache's effect).
    placement_lookups: std::sync::atomic::AtomicU64,
    /// Seals the customer's personal data before it is decided on and appended.
    vault: Vault,
}

/// Stock streams whose folded state the intake keeps.
const CACHED_STOCK_STREAMS: usize = 10_000;

/// How long an order id found unplaced is answered from the cache.
const UNPLACED_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// Entries per side before the cache starts afresh (bounded memory under a flood).
const ORDER_CACHE_CAPACITY: usize = 100_000;

#[derive(Default)]
struct OrderCache {
    placed: RwLock<std::collections::HashSet<uuid::Uuid>>,
    unplaced: RwLock<std::collections::HashMap<uuid::Uuid, std::time::Instant>>,
}

impl OrderCache {
    fn is_placed(&self, id: uuid::Uuid) -> bool {
        self.placed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    fn is_known_unplaced(&self, id: uuid::Uuid) -> bool {
        let unplaced = self.unplaced.read().unwrap_or_else(|p| p.into_inner());
        unplaced
            .get(&id)
            .is_some_and(|since| since.elapsed() < UNPLACED_TTL)
    }

    fn mark_placed(&self, id: uuid::Uuid) {
        self.unplaced
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let mut placed = self.placed.write().unwrap_or_else(|p| p.into_inner());
        if placed.len() >= ORDER_CACHE_CAPACITY {
            placed.clear();
        }
        placed.insert(id);
    }

    fn mark_unplaced(&self, id: uuid::Uuid) {
        let mut unplaced = self.unplaced.write().unwrap_or_else(|p| p.into_inner());
        if unplaced.len() >= ORDER_CACHE_CAPACITY {
            unplaced.clear();
        }
        unplaced.insert(id, std::time::Instant::now());
    }
}

impl CommandService {
    /// An intake with caches of its own.
    pub fn new(store: EventStore, rules: Rules) -> CommandService {
        CommandService::sharing(store, rules, &SharedCaches::default())
    }

    /// An intake whose placements leave their order states to the process's other
    /// workers.
    pub fn sharing(store: EventStore, rules: Rules, caches: &SharedCaches) -> CommandService {
        CommandService {
            vault: Vault::new(store.pool().clone()),
            store,
            rules,
            known_skus: RwLock::new(BTreeSet::new()),
            stock: StreamCache::with_snapshots(CACHED_STOCK_STREAMS, crate::snapshots::stock()),
            placing: Arc::clone(&caches.orders),
            orders: OrderCache::default(),
            placement_lookups: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times this service asked the log whether an order was placed.
    pub fn placement_lookups(&self) -> u64 {
        self.placement_lookups
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Handles one decoded command; `cause` carries the message's ids.
    pub async fn handle(&self, command: Command, cause: &Cause) -> Result<(), ServiceError> {
        match command {
            Command::PlaceOrder(cmd) => self.place(cmd, cause).await,
            Command::CancelOrder(cmd) => {
                self.on_order(cmd.order_id, cause, OrderInput::Cancel(cmd.clone()))
                    .await
            }
            Command::ApproveOrder(cmd) => {
                self.on_order(cmd.order_id, cause, OrderInput::Approve(cmd.clone()))
                    .await
            }
            Command::RejectOrder(cmd) => {
                self.on_order(cmd.order_id, cause, OrderInput::Reject(cmd.clone()))
                    .await
            }
            Command::SetStock(cmd) => {
                let input = StockInput::Set {
                    sku: cmd.sku.clone(),
                    quantity: cmd.quantity,
                };
                let decided = decide_on_cached(
                    &self.store,
                    &self.stock,
                    &streams::stock(&cmd.sku),
                    cause,
                    |s| stock::decide(s, input.clone()),
                )
                .await?;
                log_decision("stock", &decided);
                Ok(())
            }
        }
    }

    async fn place(&self, cmd: PlaceOrder, cause: &Cause) -> Result<(), ServiceError> {
        let known = self.known_skus_of(&cmd).await?;
        let facts = self.placement_facts(&cmd).await?;
        let now = Utc::now();
        let key = self.vault.key_for(&cmd.customer_id).await?;
        let order_id = cmd.order_id;
        let sealed = SealedPlacement::seal(key, cmd)?;
        let stream = streams::order(order_id);
        self.placing.assume_new(&stream);
        let decided = decide_on_cached(
            &self.store,
            &self.placing,
            &stream,
            cause,
            |s: &OrderState| {
                order::decide(
                    s,
                    OrderInput::Place {
                        cmd: sealed.against(s.placed.as_ref()),
                        rules: &self.rules,
                        known_skus: &known,
                        facts,
                        now,
                    },
                )
            },
        )
        .await?;
        self.orders.mark_placed(order_id);
        log_decision("order", &decided);
        Ok(())
    }

    async fn on_order(
        &self,
        order_id: uuid::Uuid,
        cause: &Cause,
        input: OrderInput<'static>,
    ) -> Result<(), ServiceError> {
        if !self.await_placement(order_id).await? {
            // Nothing to refuse it on: the order was never placed. Recording a refusal
            // would create a stream for any id anyone sends; it is logged instead.
            warn!(%order_id, "command about an order that was never placed; ignored");
            return Ok(());
        }
        let input = self.seal_input(order_id, input).await?;
        let decided =
            decide_on::<OrderState, _>(&self.store, &streams::order(order_id), cause, |s| {
                order::decide(s, input.clone())
            })
            .await?;
        log_decision("order", &decided);
        Ok(())
    }

    /// Seals the customer's free text (an `order.cancel` reason) with the key of the
    /// customer who placed the order. Reviewer input is staff text and stays clear.
    async fn seal_input(
        &self,
        order_id: uuid::Uuid,
        input: OrderInput<'static>,
    ) -> Result<OrderInput<'static>, ServiceError> {
        let OrderInput::Cancel(cmd) = input else {
            return Ok(input);
        };
        match customer_of(&self.store, order_id).await? {
            Some(customer_id) => Ok(OrderInput::Cancel(
                self.vault.seal_cancel(&customer_id, cmd).await?,
            )),
            // Not placed after all: the cancel is refused and its reason not kept.
            None => Ok(OrderInput::Cancel(cmd)),
        }
    }

    /// The facts the plan's checks need, read from the log; nothing is read when the
    /// rules run no check that needs it (workflow 1, or no fraud rule configured).
    async fn placement_facts(&self, cmd: &PlaceOrder) -> Result<PlacementFacts, ServiceError> {
        if !self.rules.needs_recent_orders() {
            return Ok(PlacementFacts::default());
        }
        Ok(PlacementFacts {
            recent_orders: recent_orders(&self.store, &cmd.customer_id, cmd.order_id).await?,
        })
    }

    /// Commands are handled concurrently, so a cancel published right after its
    /// `order.place` may be handled first. Give the placement a moment to land before
    /// a command about an unknown order is refused.
    async fn await_placement(&self, order_id: uuid::Uuid) -> Result<bool, ServiceError> {
        if self.orders.is_placed(order_id) {
            return Ok(true);
        }
        if self.orders.is_known_unplaced(order_id) {
            return Ok(false);
        }
        let stream = streams::order(order_id);
        for check in 0..PLACEMENT_GRACE_CHECKS {
            if check > 0 {
                tokio::time::sleep(PLACEMENT_GRACE_STEP).await;
            }
            self.placement_lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self
                .store
                .stream_has_event_type(&stream, "OrderPlaced")
                .await?
            {
                self.orders.mark_placed(order_id);
                return Ok(true);
            }
        }
        self.orders.mark_unplaced(order_id);
        Ok(false)
    }

    /// Which of the order's SKUs some `stock.set` named: from the cache, else the log.
    async fn known_skus_of(&self, cmd: &PlaceOrder) -> Result<BTreeSet<String>, ServiceError> {
        let wanted: BTreeSet<String> = cmd.items.iter().map(|l| l.sku.clone()).collect();
        let mut known = self.cached_skus(&wanted);
        // A `stock.set` published just before this order may still be in flight (the
        // two are handled concurrently): give unknown SKUs a moment before the order is
        // rejected for them.
        for check in 0..PLACEMENT_GRACE_CHECKS {
            let missing: Vec<String> = wanted
                .difference(&known)
                .map(|s| streams::stock(s))
                .collect();
            if missing.is_empty() {
                break;
            }
            if check > 0 {
                tokio::time::sleep(PLACEMENT_GRACE_STEP).await;
            }
            let found: Vec<String> = self
                .store
                .streams_with_event_type(&missing, "StockSet")
                .await?
                .iter()
                .filter_map(|stream| stream.strip_prefix("stock-").map(str::to_owned))
                .collect();
            self.known_skus
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .extend(found.iter().cloned());
            known.extend(found);
        }
        Ok(known)
    }

    fn cached_skus(&self, wanted: &BTreeSet<String>) -> BTreeSet<String> {
        let cache = self.known_skus.read().unwrap_or_else(|p| p.into_inner());
        wanted
            .iter()
            .filter(|s| cache.contains(*s))
            .cloned()
            .collect()
    }
}

/// How many orders `customer_id` placed within the last minute, `order_id` not
/// counted (a redelivered placement must not count itself). The minute is the
/// database's clock, the one `recorded_at` is written with. Served by the partial
/// expression index `events_order_placed_customer` (migration 0030).
pub async fn recent_orders(
    store: &EventStore,
    customer_id: &str,
    order_id: uuid::Uuid,
) -> Result<u32, ServiceError> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE event_type = 'OrderPlaced'
            AND payload->>'customer_id' = $1
            AND recorded_at > now() - interval '1 minute'
            AND stream_name <> $2",
    )
    .bind(customer_id)
    .bind(streams::order(order_id))
    .fetch_one(store.pool())
    .await?;
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

/// Who placed the order: the `customer_id` of its `OrderPlaced`, read from the order's
/// stream. The subquery (`OFFSET 0` keeps the planner from merging it) finds the
/// stream's few rows by their index first: merged, a planner that has no statistics
/// of `events` yet (a new database before autovacuum's first ANALYZE) took the stream
/// for thousands of rows and also scanned the index of every `OrderPlaced`
/// (`events_order_placed_customer`), 8 to 80 ms a lookup at 50,000 orders (5 Dec).
pub async fn customer_of(
    store: &EventStore,
    order_id: uuid::Uuid,
) -> Result<Option<String>, ServiceError> {
    Ok(sqlx::query_scalar(
        "SELECT payload->>'customer_id'
           FROM (SELECT payload, event_type FROM events WHERE stream_name = $1 OFFSET 0) AS stream
          WHERE event_type = 'OrderPlaced' LIMIT 1",
    )
    .bind(streams::order(order_id))
    .fetch_optional(store.pool())
    .await?)
}

fn log_decision<S>(aggregate: &str, decided: &Decided<S>) {
    let types: Vec<&str> = decided.events().iter().map(|e| e.event_type()).collect();
    if types.is_empty() {
        info!(
            aggregate,
            "command had no further effect (already handled or nothing to do)"
        );
    } else {
        info!(aggregate, events = ?types, "command recorded");
    }
}

/// The bus handler of the intake queue.
pub struct CommandHandler(pub Arc<CommandService>);

/// Just the fields that say which aggregate a command is about.
#[derive(serde::Deserialize)]
struct Target {
    order_id: Option<String>,
    sku: Option<String>,
}

/// Commands about the same order (or the same SKU) are handled in the order they were
/// published; different orders run concurrently.
fn ordering_key(msg: &Incoming) -> Option<String> {
    if msg.body.len() > domain::commands::MAX_BODY_BYTES {
        return None;
    }
    let target: Target = serde_json::from_slice(&msg.body).ok()?;
    match (target.order_id, target.sku) {
        (Some(order_id), _) => Some(format!("order:{order_id}")),
        (None, Some(sku)) => Some(format!("sku:{sku}")),
        (None, None) => None,
    }
}

/// The order a command is about, if it decodes and names one (a `stock.set` does not):
/// such a command can be parked behind its order. An undecodable one is not, so that
/// it still goes to the dead-letter queue, even when its order is parked.
pub fn order_of(msg: &Incoming) -> Option<uuid::Uuid> {
    decode(&msg.routing_key, &msg.body).ok()?.order_id()
}

impl bus::Handler for CommandHandler {
    fn ordering_key(&self, msg: &Incoming) -> Option<String> {
        ordering_key(msg)
    }

    fn handle(&self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        let service = Arc::clone(&self.0);
        Box::pin(async move {
            let command = match decode(&msg.routing_key, &msg.body) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(routing_key = %msg.routing_key, message_id = ?msg.message_id, error = %e, "dead-lettering an undecodable command");
                    return Outcome::DeadLetter {
                        reason: e.to_string(),
                    };
                }
            };
            let cause = Cause::new(message_uuid(&msg), correlation_uuid(&msg), "commands");
            let span = tracing::info_span!(
                "command",
                routing_key = %msg.routing_key,
                message_id = %cause.causation_id,
                correlation_id = %cause.correlation_id,
                order_id = ?command.order_id(),
            );
            outcome(
                service
                    .handle(command, &cause)
                    .instrument(span.clone())
                    .await,
                &span,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> Incoming {
        Incoming {
            body: body.as_bytes().to_vec(),
            ..Incoming::default()
        }
    }

    #[test]
    fn commands_are_ordered_per_order_or_per_sku() {
        let id = "7f0c1f2e-9a43-4a53-9a0e-0d6f3f6f4a11";
        let cancel = msg(&format!(r#"{{"order_id":"{id}","reason":"x"}}"#));
        let place = msg(&format!(r#"{{"order_id":"{id}","items":[{{"sku":"A"}}]}}"#));
        assert_eq!(ordering_key(&cancel), Some(format!("order:{id}")));
        assert_eq!(ordering_key(&cancel), ordering_key(&place));
        assert_eq!(
            ordering_key(&msg(r#"{"sku":"A","quantity":1}"#)),
            Some("sku:A".into())
        );
        assert_eq!(ordering_key(&msg("not json")), None);
    }

    #[test]
    fn only_decodable_commands_about_an_order_can_be_parked() {
        let id = "7f0c1f2e-9a43-4a53-9a0e-0d6f3f6f4a11";
        let cancel = Incoming {
            routing_key: "order.cancel".into(),
            ..msg(&format!(r#"{{"order_id":"{id}","reason":"x"}}"#))
        };
        assert_eq!(
            order_of(&cancel).map(|o| o.to_string()),
            Some(id.to_owned())
        );
        let missing_field = Incoming {
            routing_key: "order.cancel".into(),
            ..msg(&format!(r#"{{"order_id":"{id}"}}"#))
        };
        assert_eq!(order_of(&missing_field), None);
        let stock = Incoming {
            routing_key: "stock.set".into(),
            ..msg(r#"{"sku":"A","quantity":1}"#)
        };
        assert_eq!(order_of(&stock), None);
    }
}
