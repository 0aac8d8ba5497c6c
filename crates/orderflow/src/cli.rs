//! The command line, as contract section 6 names it.
use clap::{Args, Parser, Subcommand, ValueEnum};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "orderflow",
    version,
    about = "Event-sourced, message-driven order processing on PostgreSQL and RabbitMQ",
    long_about = "Event-sourced, message-driven order processing on PostgreSQL and RabbitMQ.\n\n\
                  Settings come from the environment: DATABASE_URL, AMQP_URL and the ORDERFLOW_* \
                  variables (see docs/CONTRACT.md), over an optional TOML file named by \
                  ORDERFLOW_CONFIG (keys: the names in lower case without ORDERFLOW_, e.g. \
                  workflow_version = 2, fraud_max_orders_per_minute = 5)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the workers (all of them in this process, or one with --only).
    Run(RunArgs),
    /// Publish an order.place command.
    PlaceOrder(PlaceOrderArgs),
    /// Publish an order.cancel command.
    Cancel {
        order_id: Uuid,
        #[arg(long, default_value = "cancelled by the customer")]
        reason: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Publish an order.approve command (human review).
    Approve {
        order_id: Uuid,
        #[arg(long, default_value = "operator")]
        reviewer: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Publish an order.reject command (human review).
    Reject {
        order_id: Uuid,
        #[arg(long, default_value = "operator")]
        reviewer: String,
        #[arg(long, default_value = "rejected in review")]
        reason: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stock commands.
    Stock {
        #[command(subcommand)]
        command: StockCommand,
    },
    /// Show one order's status, workflow and milestones (from the read models).
    Status { order_id: Uuid },
    /// List orders (from the read model), newest first.
    Orders {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// List orders waiting for a review decision.
    Reviews {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Show a stream's events, oldest first.
    Events {
        stream_name: String,
        /// One JSON object per line, for machines.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild read models from the event log.
    Replay {
        /// One projection (order_status, stock_levels, timers, order_milestones); all
        /// when omitted.
        #[arg(long)]
        projection: Option<String>,
        /// Rebuild into shadow tables and print how the live rows differ; change
        /// nothing unless --swap (exit 1 when rows differ and were not swapped).
        #[arg(long)]
        verify: bool,
        /// With --verify: replace the live rows by the rebuilt ones when they differ.
        #[arg(long, requires = "verify")]
        swap: bool,
    },
    /// Check that this build decodes every stored event (upcasters included) and that
    /// its domain accepts every stored stream; exit 1 listing what fails. Run before
    /// switching to a new version.
    Check,
    /// Dead letters: messages that could not be decoded or whose retries ran out.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Check the rules of the order's course against the log; exit 1 naming offenders.
    Audit,
    /// List the running `orderflow run` processes (the workers table); those silent for
    /// more than three heartbeats are marked gone.
    Workers,
    /// Forget a customer: destroy the key that seals their personal data in events
    /// (address, cancel reasons). The log is not rewritten; the fields read as
    /// [forgotten] from then on. Exit 1 if the customer has no key.
    ForgetCustomer { customer_id: String },
    /// Live dashboard: orders, throughput, lag, queues, dead letters, payment circuit.
    ///
    /// Refreshes every --interval; q, Esc or Ctrl-C quits. --once prints one frame as
    /// plain text and exits (no terminal needed). See docs/OPERATIONS.md.
    Top(crate::top::TopArgs),
    /// Create or update a least-privilege database role for the workers (may append
    /// events, never change them). Run once, as a role that may create roles.
    SetupRole {
        /// The role's name (lower-case letters, digits, underscores).
        role: String,
        /// The environment variable holding the role's password (none: no password).
        #[arg(long, default_value = "ORDERFLOW_ROLE_PASSWORD")]
        password_env: String,
    },
    /// List parked orders: orders whose message failed after its retries, with their
    /// later messages waiting behind it (docs/OPERATIONS.md, "Repairing").
    Parked,
    /// Replay a parked order's messages in order, then unpark it (exit 1 if not parked).
    Resume(ResumeArgs),
    /// One order at a time.
    Order {
        #[command(subcommand)]
        command: OrderCommand,
    },
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    pub order_id: Uuid,
    /// Wait until the order's parked messages were handled (exit 1 if one fails again).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait may take.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    /// Every event, parked message, replay, open timer and notification of the order,
    /// by time, with causation links.
    Timeline { order_id: Uuid },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Worker {
    /// Commands from orderflow.commands (orders and stock).
    Commands,
    /// The order saga: joins reservation and payment, compensates.
    Order,
    /// Stock reservations, releases and commits.
    Inventory,
    /// Payments through the gateway simulator.
    Payment,
    /// Shipping and the simulated carrier.
    Shipping,
    /// Customer notifications.
    Notification,
    /// Read models (order_status, stock_levels, order_milestones, timers).
    Projector,
    /// Publishes committed events to orderflow.events (the outbox relay).
    Relay,
    /// Fires due timers (payment timeout, review expiry, delivery).
    Timers,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run only these workers (repeatable); all when omitted.
    #[arg(long, value_enum)]
    pub only: Vec<Worker>,
}

#[derive(Debug, Args)]
pub struct PlaceOrderArgs {
    /// The order id (a new UUID when omitted).
    #[arg(long)]
    pub order_id: Option<Uuid>,
    #[arg(long, default_value = "customer-1")]
    pub customer: String,
    /// The shop's currency by default (ORDERFLOW_CURRENCY).
    #[arg(long)]
    pub currency: Option<String>,
    /// An order line as SKU:QUANTITY:UNIT_PRICE_CENTS (repeatable).
    #[arg(long = "item", required = true, value_parser = parse_item)]
    pub items: Vec<domain::commands::OrderLine>,
    #[arg(long, default_value = "tok_ok")]
    pub token: String,
    /// Shipping method; omit (or --digital) for a digital-only order.
    #[arg(long, value_enum, conflicts_with = "digital")]
    pub ship: Option<Method>,
    #[arg(long, default_value = "1 Main Street, Springfield")]
    pub address: String,
    /// A digital-only order (shipping: null).
    #[arg(long)]
    pub digital: bool,
    /// The command's message_id (a new UUID when omitted).
    #[arg(long)]
    pub message_id: Option<Uuid>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Read-your-writes: wait for the read model before returning (docs/OPERATIONS.md).
#[derive(Debug, Clone, Copy, Args)]
pub struct WaitArgs {
    /// Wait until the order_status read model has applied the command's effect, then
    /// print the order's status line.
    #[arg(long)]
    pub wait: bool,
    /// Like --wait, then wait on until the order is final (delivered, completed,
    /// cancelled, rejected) or waits for a person (under_review).
    #[arg(long)]
    pub wait_final: bool,
    /// How long --wait or --wait-final may take before failing.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

impl WaitArgs {
    pub fn enabled(&self) -> bool {
        self.wait || self.wait_final
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    Standard,
    Express,
}

#[derive(Debug, Subcommand)]
pub enum StockCommand {
    /// Publish a stock.set command: SKU now has N units free to sell.
    Set { sku: String, quantity: i64 },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters without removing them.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back on their original exchange and routing key (all of them
    /// unless a message_id is given).
    Retry {
        /// Retry every dead letter (the default).
        #[arg(long, conflicts_with = "message_id")]
        all: bool,
        /// The message_id of the dead letter to retry.
        message_id: Option<String>,
    },
}

fn parse_item(text: &str) -> Result<domain::commands::OrderLine, String> {
    let parts: Vec<&str> = text.rsplitn(3, ':').collect();
    let [price, quantity, sku] = parts.as_slice() else {
        return Err(format!("'{text}' is not SKU:QUANTITY:UNIT_PRICE_CENTS"));
    };
    let quantity = quantity
        .parse::<i64>()
        .map_err(|_| format!("quantity '{quantity}' in '{text}' is not an integer"))?;
    let unit_price_cents = price
        .parse::<i64>()
        .map_err(|_| format!("price '{price}' in '{text}' is not an integer number of cents"))?;
    Ok(domain::commands::OrderLine {
        sku: (*sku).to_owned(),
        quantity,
        unit_price_cents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_parse_from_sku_quantity_price() {
        let line = parse_item("BOOK-1:2:1999").expect("valid item");
        assert_eq!(
            (line.sku.as_str(), line.quantity, line.unit_price_cents),
            ("BOOK-1", 2, 1999)
        );
        assert!(parse_item("BOOK-1:2").is_err());
        assert!(parse_item("BOOK-1:two:1999").is_err());
        assert!(parse_item("BOOK-1:2:19.99").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
