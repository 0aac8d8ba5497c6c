//! `orderflow forget-customer`: crypto-shredding (docs/adr/0004-crypto-shredding.md).
//! Destroys the customer's key; the log is not touched, and every sealed field of the
//! customer reads as `[forgotten]` from then on.
use std::process::ExitCode;

use anyhow::Context;
use eventstore::EventStore;
use services::vault::{Forgotten, Vault, FORGOTTEN};

pub async fn forget_customer(store: &EventStore, customer_id: &str) -> anyhow::Result<ExitCode> {
    let orders = placed_orders(store, customer_id).await?;
    let vault = Vault::new(store.pool().clone());
    let outcome = vault
        .forget(customer_id)
        .await
        .with_context(|| format!("cannot forget customer {customer_id}"))?;
    match outcome {
        Forgotten::Now { key_id } => println!(
            "forgot customer {customer_id}: key {key_id} destroyed; the personal data of \
             {orders} order(s) now reads as {FORGOTTEN}"
        ),
        Forgotten::Already { forgotten_at } => println!(
            "customer {customer_id} was already forgotten at {}; no key left to destroy",
            forgotten_at.to_rfc3339()
        ),
        // Exit non-zero: a typo in the id must not look like a customer forgotten.
        Forgotten::Unknown if orders > 0 => anyhow::bail!(
            "customer {customer_id} has no key: their {orders} order(s) were placed before \
             personal data was sealed and are not covered (see docs/OPERATIONS.md)"
        ),
        Forgotten::Unknown => anyhow::bail!("unknown customer {customer_id}: no key and no orders"),
    }
    Ok(ExitCode::SUCCESS)
}

/// How many orders the customer placed (served by the index
/// `events_order_placed_customer`, migration 0030).
async fn placed_orders(store: &EventStore, customer_id: &str) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE event_type = 'OrderPlaced' AND payload->>'customer_id' = $1",
    )
    .bind(customer_id)
    .fetch_one(store.pool())
    .await
    .context("cannot count the customer's orders")
}
