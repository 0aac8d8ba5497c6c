//! `orderflow-bench`: measures orderflow's storage, replay and end-to-end throughput,
//! each figure beside a raw baseline (plain PostgreSQL / plain RabbitMQ) measured by this
//! program in the same run, on a database and a vhost of its own that it drops at the end.
//! See `scripts/bench` and `docs/BENCHMARKS.md`.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

mod doc;
mod e2e;
mod fixtures;
mod flood;
mod infra;
mod measure;
mod plot;
mod replay;
mod report;
mod storage;
mod workers;

/// The allocator `orderflow` uses, so replay and storage figures are what it gets.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Storage,
    Replay,
    E2e,
    /// Memory under a backlog of queued commands (not in the default run).
    Flood,
}

impl Phase {
    /// The name the document groups rows by (`doc::PHASES`).
    fn name(self) -> &'static str {
        match self {
            Phase::Storage => "storage",
            Phase::Replay => "replay",
            Phase::E2e => "e2e",
            Phase::Flood => "flood",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "orderflow-bench",
    about = "Benchmarks orderflow beside raw PostgreSQL and RabbitMQ baselines"
)]
struct Args {
    /// Base PostgreSQL URL; the bench creates (and drops) its own databases on that server.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Base AMQP URL; the bench creates (and deletes) its own vhost on that broker.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Multiplies every size and duration (1.0 = the full run documented in BENCHMARKS.md).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Events in the replay log (default 1,000,000 × scale).
    #[arg(long)]
    events: Option<u64>,
    /// Orders of the end-to-end burst (default 10,000 × scale).
    #[arg(long)]
    orders: Option<u64>,
    /// Commands queued for the flood phase (default 100,000 × scale).
    #[arg(long)]
    flood: Option<u64>,
    /// Offer the paced (latency) orders at this rate instead of half the burst's rate,
    /// so that latency can be compared between builds or settings at one load.
    #[arg(long)]
    paced_rate: Option<f64>,
    /// Phases to run (storage, replay and e2e when omitted; flood only when named).
    #[arg(long, value_enum)]
    only: Vec<Phase>,
    /// The orderflow binary for the end-to-end phase.
    #[arg(long, default_value = "target/release/orderflow")]
    orderflow_bin: PathBuf,
    /// Rewrite this markdown file with the results (e.g. docs/BENCHMARKS.md).
    #[arg(long)]
    write_doc: Option<PathBuf>,
    /// A line about the conditions of the run, copied into the document.
    #[arg(long, default_value = "")]
    conditions: String,
}

/// What every phase needs to know.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub database_url: String,
    pub amqp_url: String,
    pub run_id: String,
    pub scale: f64,
    /// How long each timed storage benchmark runs per configuration.
    pub op_duration: Duration,
    /// Commands per configuration of the command benchmark.
    pub commands: usize,
    /// Events in the replay log.
    pub events: u64,
    /// Orders in the end-to-end burst.
    pub orders: u64,
    /// How long the paced end-to-end run publishes.
    pub paced_duration: Duration,
    /// Orders/s for the paced phase; `None`: half the sustained rate.
    pub paced_rate: Option<f64>,
    /// Messages of the raw RabbitMQ baseline.
    pub rabbit_messages: u64,
    /// Commands queued before the worker starts in the flood phase.
    pub flood: u64,
    /// How long the flood phase lets the worker drain at most.
    pub flood_window: Duration,
    pub orderflow_bin: PathBuf,
}

fn scaled(full: f64, scale: f64, min: f64) -> f64 {
    (full * scale).max(min)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.scale > 0.0, "--scale must be positive");
    let scale = args.scale;
    let ctx = Ctx {
        database_url: args.database_url.clone(),
        amqp_url: args.amqp_url.clone(),
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        scale,
        op_duration: Duration::from_secs_f64(scaled(10.0, scale, 1.0)),
        commands: scaled(4_000.0, scale, 200.0) as usize,
        events: args
            .events
            .unwrap_or(scaled(1_000_000.0, scale, 10_000.0) as u64),
        orders: args.orders.unwrap_or(scaled(10_000.0, scale, 300.0) as u64),
        paced_duration: Duration::from_secs_f64(scaled(30.0, scale, 5.0)),
        paced_rate: args.paced_rate,
        rabbit_messages: scaled(50_000.0, scale, 2_000.0) as u64,
        flood: args
            .flood
            .unwrap_or(scaled(100_000.0, scale, 1_000.0) as u64),
        flood_window: Duration::from_secs_f64(scaled(60.0, scale, 5.0)),
        orderflow_bin: args.orderflow_bin.clone(),
    };
    // Flood is left out of the default run: at full scale it adds about two minutes.
    let phases = if args.only.is_empty() {
        vec![Phase::Storage, Phase::Replay, Phase::E2e]
    } else {
        args.only.clone()
    };
    let mut report = report::Report::default();
    let started = chrono::Utc::now();
    let load_before = infra::loadavg();
    doc::describe_environment(&ctx, &mut report).await;
    report.context("scale", format!("{scale}"));
    report.context(
        "phases",
        phases
            .iter()
            .map(|p| format!("{p:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.context(
        "sizes",
        format!(
            "timed storage runs {:?} each; {} commands per configuration; replay log {} events; end-to-end burst {} orders, paced run {:?}; RabbitMQ baseline {} messages{}",
            ctx.op_duration, ctx.commands, ctx.events, ctx.orders, ctx.paced_duration, ctx.rabbit_messages,
            if phases.contains(&Phase::Flood) {
                format!("; flood {} queued commands (and {} for comparison), drain window {:?}", ctx.flood, (ctx.flood / 100).max(10), ctx.flood_window)
            } else {
                String::new()
            }
        ),
    );
    eprintln!("run {} at scale {scale}: {:?}", ctx.run_id, phases);
    let mut failed = Vec::new();
    for phase in &phases {
        report.phase = phase.name();
        let result = match phase {
            Phase::Storage => storage::run(&ctx, &mut report).await,
            Phase::Replay => replay::run(&ctx, &mut report).await,
            Phase::E2e => e2e::run(&ctx, &mut report).await,
            Phase::Flood => flood::run(&ctx, &mut report).await,
        };
        if let Err(error) = result {
            eprintln!("phase {phase:?} failed: {error:#}");
            report.note(format!("phase {phase:?} failed: {error:#}"));
            failed.push(*phase);
        }
    }
    let load_after = infra::loadavg();
    report.context(
        "load average (1 min)",
        format!("{load_before} before, {load_after} after"),
    );
    if !args.conditions.is_empty() {
        report.context("conditions", args.conditions.clone());
    }
    let finished = chrono::Utc::now();
    // A run of some phases keeps the other phases' figures of the document it rewrites
    // (marked as carried over), rather than dropping them.
    let ran: Vec<&'static str> = phases.iter().map(|p| p.name()).collect();
    let previous = args
        .write_doc
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|text| doc::Previous::parse(&text));
    let markdown = doc::render(&report, started, finished, previous.as_ref(), &ran);
    println!("{}", report.table());
    println!("{}", report.targets_table());
    if let Some(path) = &args.write_doc {
        std::fs::write(path, markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        if !report.curve.is_empty() {
            let png = path.with_file_name(plot::FILE_NAME);
            match plot::write_png(&png, &report.curve) {
                Ok(()) => eprintln!("wrote {}", png.display()),
                Err(error) => {
                    eprintln!("could not draw {}: {error:#}", png.display());
                    failed.push(Phase::E2e);
                }
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "phases failed: {failed:?}");
    Ok(())
}
