//! Commands that publish to RabbitMQ, exactly as an outside client would, and the
//! dead-letter tools.
use std::process::ExitCode;

use anyhow::Context;
use domain::commands::{Command, PlaceOrder, Shipping, ShippingMethod};
use services::settings::{redact_url, Settings};
use uuid::Uuid;

use crate::cli::{Method, PlaceOrderArgs, WaitArgs};

async fn connect(settings: &Settings) -> anyhow::Result<bus::Bus> {
    let options = bus::BusOptions {
        connect_timeout: std::time::Duration::from_secs(5),
        publish_timeout: std::time::Duration::from_secs(10),
        connection_name: "orderflow-cli".to_owned(),
    };
    bus::Bus::connect_with(&settings.amqp_url, options)
        .await
        .with_context(|| {
            format!(
                "cannot reach RabbitMQ at {}",
                redact_url(&settings.amqp_url)
            )
        })
}

pub async fn place_order(settings: &Settings, args: PlaceOrderArgs) -> anyhow::Result<ExitCode> {
    let shipping = match (args.digital, args.ship) {
        (true, _) | (false, None) => None,
        (false, Some(method)) => Some(Shipping {
            method: match method {
                Method::Standard => ShippingMethod::Standard,
                Method::Express => ShippingMethod::Express,
            },
            address: args.address,
        }),
    };
    let order_id = args.order_id.unwrap_or_else(Uuid::new_v4);
    // Open the log before publishing: a command that cannot be waited for is not sent.
    let store = match args.wait.enabled() {
        true => Some(crate::store(settings).await?),
        false => None,
    };
    let cmd = Command::PlaceOrder(PlaceOrder {
        order_id,
        customer_id: args.customer,
        currency: args.currency.unwrap_or_else(|| settings.currency.clone()),
        items: args.items,
        payment_token: args.token,
        shipping,
    });
    let message_id = publish(settings, cmd, args.message_id).await?;
    println!("{order_id}");
    match store {
        Some(store) => {
            crate::queries::wait_and_print(&store, message_id, order_id, args.wait).await
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Publishes a command about an order; with `--wait` / `--wait-final`, waits for the
/// read model and prints the order's status line.
pub async fn order_command(
    settings: &Settings,
    cmd: Command,
    wait: WaitArgs,
) -> anyhow::Result<ExitCode> {
    let (Some(order_id), true) = (cmd.order_id(), wait.enabled()) else {
        return command(settings, cmd).await;
    };
    let store = crate::store(settings).await?;
    let message_id = publish(settings, cmd, None).await?;
    println!("published {message_id}");
    crate::queries::wait_and_print(&store, message_id, order_id, wait).await
}

pub async fn command(settings: &Settings, cmd: Command) -> anyhow::Result<ExitCode> {
    let message_id = publish(settings, cmd, None).await?;
    println!("published {message_id}");
    Ok(ExitCode::SUCCESS)
}

async fn publish(
    settings: &Settings,
    cmd: Command,
    message_id: Option<Uuid>,
) -> anyhow::Result<Uuid> {
    let bus = connect(settings).await?;
    let message_id = message_id.unwrap_or_else(Uuid::new_v4);
    let props = bus::OutgoingProperties::new(message_id.to_string())
        .with_correlation_id(message_id.to_string());
    bus.publish(
        bus::topology::COMMANDS_EXCHANGE,
        cmd.routing_key(),
        cmd.to_body(),
        props,
    )
    .await
    .with_context(|| format!("RabbitMQ did not confirm the {} command", cmd.routing_key()))?;
    Ok(message_id)
}

pub async fn dlq_list(settings: &Settings, limit: usize) -> anyhow::Result<ExitCode> {
    let bus = connect(settings).await?;
    let letters = bus::dlq_list(&bus, limit)
        .await
        .context("cannot read orderflow.dead-letter")?;
    println!(
        "{:<36}  {:<22}  {:>8}  error",
        "message_id", "routing_key", "attempts"
    );
    for l in &letters {
        println!(
            "{:<36}  {:<22}  {:>8}  {}",
            l.message_id.as_deref().unwrap_or("-"),
            l.routing_key,
            l.attempts,
            l.error
        );
    }
    println!("({} dead letters)", letters.len());
    Ok(ExitCode::SUCCESS)
}

pub async fn dlq_retry(
    settings: &Settings,
    all: bool,
    message_id: Option<String>,
) -> anyhow::Result<ExitCode> {
    // Without a message_id every dead letter is retried (`--all` says so explicitly);
    // one that still cannot be handled simply returns to the dead-letter queue.
    let selector = match (all, message_id) {
        (false, Some(id)) => bus::DlqSelector::MessageId(id),
        _ => bus::DlqSelector::All,
    };
    let bus = connect(settings).await?;
    let n = bus::dlq_retry(&bus, selector)
        .await
        .context("cannot retry dead letters")?;
    println!("retried {n} dead letters");
    Ok(ExitCode::SUCCESS)
}
