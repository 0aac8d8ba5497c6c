//! `orderflow`: the command line and the worker process.
mod admin;
mod cli;
mod forget;
mod parked;
mod publish;
mod queries;
mod telemetry;
mod top;
mod upgrade;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use services::settings::{redact_url, Settings};

use cli::{Cli, Command, DlqCommand, StockCommand};

/// Every worker allocates per message and per row; see the workspace manifest.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Log lines would scribble over the dashboard's screen.
    if !matches!(cli.command, Command::Top(_)) {
        telemetry::init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// One line on stderr with the whole cause chain, and a non-zero exit.
fn fail(error: anyhow::Error) -> ExitCode {
    // Errors that print their source in their own message would repeat it: skip a
    // cause that the previous line already ends with.
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain().map(ToString::to_string) {
        if !parts.last().is_some_and(|p| p.ends_with(&cause)) {
            parts.push(cause);
        }
    }
    eprintln!("error: {}", parts.join(": "));
    ExitCode::FAILURE
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let settings = Settings::from_env()?;
    match command {
        Command::Run(args) => run(settings, args).await,
        Command::PlaceOrder(args) => publish::place_order(&settings, args).await,
        Command::Cancel {
            order_id,
            reason,
            wait,
        } => {
            publish::order_command(
                &settings,
                domain::commands::Command::CancelOrder(domain::commands::CancelOrder {
                    order_id,
                    reason,
                }),
                wait,
            )
            .await
        }
        Command::Approve {
            order_id,
            reviewer,
            wait,
        } => {
            publish::order_command(
                &settings,
                domain::commands::Command::ApproveOrder(domain::commands::ApproveOrder {
                    order_id,
                    reviewer,
                }),
                wait,
            )
            .await
        }
        Command::Reject {
            order_id,
            reviewer,
            reason,
            wait,
        } => {
            publish::order_command(
                &settings,
                domain::commands::Command::RejectOrder(domain::commands::RejectOrder {
                    order_id,
                    reviewer,
                    reason,
                }),
                wait,
            )
            .await
        }
        Command::Stock {
            command: StockCommand::Set { sku, quantity },
        } => {
            publish::command(
                &settings,
                domain::commands::Command::SetStock(domain::commands::SetStock { sku, quantity }),
            )
            .await
        }
        Command::Status { order_id } => queries::status(&store(&settings).await?, order_id).await,
        Command::Orders { status, limit } => {
            queries::orders(&store(&settings).await?, status.as_deref(), limit).await
        }
        Command::Reviews { limit } => {
            queries::orders(&store(&settings).await?, Some("under_review"), limit).await
        }
        Command::Events { stream_name, json } => {
            queries::events(&store(&settings).await?, &stream_name, json).await
        }
        Command::Replay {
            projection,
            verify: true,
            swap,
        } => upgrade::verify(&store(&settings).await?, projection.as_deref(), swap).await,
        Command::Replay { projection, .. } => {
            queries::replay(&store(&settings).await?, projection.as_deref()).await
        }
        Command::Check => upgrade::check(&store(&settings).await?).await,
        Command::Dlq {
            command: DlqCommand::List { limit },
        } => publish::dlq_list(&settings, limit).await,
        Command::Dlq {
            command: DlqCommand::Retry { all, message_id },
        } => publish::dlq_retry(&settings, all, message_id).await,
        Command::Audit => queries::audit(&store(&settings).await?).await,
        Command::Workers => queries::workers(&store(&settings).await?).await,
        Command::ForgetCustomer { customer_id } => {
            forget::forget_customer(&store(&settings).await?, &customer_id).await
        }
        Command::Top(args) => top::top(&settings, args).await,
        Command::SetupRole { role, password_env } => {
            let password = std::env::var(&password_env).ok().filter(|p| !p.is_empty());
            admin::setup_role(&store(&settings).await?, &role, password).await
        }
        Command::Parked => parked::list(&store(&settings).await?).await,
        Command::Resume(args) => {
            parked::resume(
                &store(&settings).await?,
                args.order_id,
                args.wait,
                args.timeout,
            )
            .await
        }
        Command::Order {
            command: cli::OrderCommand::Timeline { order_id },
        } => parked::timeline(&store(&settings).await?, order_id).await,
    }
}

/// Connects to the log (creating the database and applying migrations if needed).
async fn store(settings: &Settings) -> anyhow::Result<eventstore::EventStore> {
    eventstore::connect(&settings.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot open the event log at {}",
                redact_url(&settings.database_url)
            )
        })
}

async fn run(settings: Settings, args: cli::RunArgs) -> anyhow::Result<ExitCode> {
    let workers: Vec<&'static str> = if args.only.is_empty() {
        services::runtime::ALL_WORKERS.to_vec()
    } else {
        args.only.iter().map(|w| worker_name(*w)).collect()
    };
    services::runtime::run(settings, &workers, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

fn worker_name(worker: cli::Worker) -> &'static str {
    use cli::Worker::*;
    match worker {
        Commands => "commands",
        Order => "order",
        Inventory => "inventory",
        Payment => "payment",
        Shipping => "shipping",
        Notification => "notification",
        Projector => "projector",
        Relay => "relay",
        Timers => "timers",
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight work");
}
