//! `docs/BENCHMARKS.md`: the conditions of the run, the table, the targets and where
//! the time goes.
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::Connection;

use crate::infra::{machine, rabbitmqctl, with_path};
use crate::report::{fmt_value, Report};
use crate::Ctx;

/// Machine, server versions and settings, and how busy the servers were at the start.
pub async fn describe_environment(ctx: &Ctx, report: &mut Report) {
    report.context("machine", machine());
    match postgres_facts(&ctx.database_url).await {
        Ok(facts) => {
            for (k, v) in facts {
                report.context(k, v);
            }
        }
        Err(error) => report.context("PostgreSQL", format!("unknown ({error})")),
    }
    let rabbit = rabbitmqctl(&["version"])
        .await
        .map_or_else(|e| format!("unknown ({e})"), |v| v.trim().to_owned());
    report.context("RabbitMQ", rabbit);
}

async fn postgres_facts(url: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut conn = sqlx::PgConnection::connect(&with_path(url, "postgres")?).await?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut conn)
        .await?;
    let mut settings = Vec::new();
    for name in [
        "shared_buffers",
        "synchronous_commit",
        "fsync",
        "wal_level",
        "max_connections",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut conn)
            .await?;
        settings.push(format!("{name}={value}"));
    }
    let (others, dbs): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'), \
                (SELECT count(*) FROM pg_database WHERE NOT datistemplate) \
         FROM pg_stat_activity",
    )
    .fetch_one(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(vec![
        (
            "PostgreSQL".to_owned(),
            version.split(" on ").next().unwrap_or(&version).to_owned(),
        ),
        ("PostgreSQL settings".to_owned(), settings.join(", ")),
        (
            "other PostgreSQL activity at start".to_owned(),
            format!("{others} other client connections, {dbs} databases on the server"),
        ),
    ])
}

pub fn render(report: &Report, started: DateTime<Utc>, finished: DateTime<Utc>) -> String {
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(
        "Written by `scripts/bench` (`crates/bench`, binary `orderflow-bench`); do not edit by \
         hand, run the script. Every figure is measured beside a raw baseline by the same \
         program in the same run, on a database (`orderflow_bench_<run>_<phase>`) and a \
         RabbitMQ vhost (`orderflow_bench_<run>`) of the bench's own, dropped at the end. The \
         ratio is figure ÷ baseline.\n\n",
    );
    let _ = writeln!(
        out,
        "Run: {} → {} (UTC).\n",
        started.format("%Y-%m-%d %H:%M:%S"),
        finished.format("%H:%M:%S")
    );
    out.push_str("## Conditions\n\n");
    for (k, v) in &report.context {
        let _ = writeln!(out, "- **{k}**: {v}");
    }
    out.push_str(
        "\nThe machine is shared: other sessions build and run their test suites on the same \
         cores and the same PostgreSQL and RabbitMQ while the bench runs (see the load \
         average above). Treat single figures as ±50%: runs minutes apart at small scale \
         gave batched append at 1 writer anywhere from 0.43× to 0.87× of raw. Ratios are \
         steadier than absolute numbers because each pair runs back to back.\n",
    );
    out.push_str("\n## Results\n\n");
    out.push_str(&report.table());
    out.push_str("\n## Targets\n\n");
    out.push_str(&report.targets_table());
    out.push_str("\n## Where the time goes\n\n");
    out.push_str(&where_the_time_goes(report));
    if !report.notes.is_empty() {
        out.push_str("\n## Observations during the run\n\n");
        for note in &report.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out.push_str(
        "\n## How to run\n\n```sh\nscripts/bench                # full run (≈ 10 min), rewrites this file\n\
         scripts/bench --scale 0.05   # quick check, small sizes\n\
         scripts/bench --only storage # one phase (storage, replay, e2e, flood)\n\
         scripts/bench --only flood   # memory under 100,000 queued commands (≈ 2 min; not in the full run)\n```\n",
    );
    out
}

fn v(report: &Report, key: &str) -> String {
    report
        .value(key)
        .map_or_else(|| "n/a".to_owned(), fmt_value)
}

fn ratio(report: &Report, key: &str) -> String {
    report
        .get(key)
        .and_then(|r| r.ratio())
        .map_or_else(|| "n/a".to_owned(), crate::report::fmt_ratio)
}

/// The analysis, with this run's numbers.
fn where_the_time_goes(report: &Report) -> String {
    let mut out = String::new();
    let cpu_per_order: f64 = ["e2e_cpu_orderflow", "e2e_cpu_postgres", "e2e_cpu_rabbit"]
        .iter()
        .filter_map(|k| report.value(k))
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cap = if cpu_per_order > 0.0 {
        cores * 1000.0 / cpu_per_order
    } else {
        f64::NAN
    };
    let _ = writeln!(
        out,
        "- **One-event append** ({} events/s with 1 writer, {} of raw; {} with 8, {} of raw). \
         `append` is `append_batch` of one stream: BEGIN, a `max(stream_version) … GROUP BY` \
         query for the expected-version check, the INSERT … RETURNING, COMMIT — four round \
         trips where the raw baseline makes one. With one writer the commit's WAL flush \
         (synchronous_commit=on) dominates both; with eight, group commit hides the flush and \
         the extra round trips and the client's CPU show.",
        v(report, "append1_1"),
        ratio(report, "append1_1"),
        v(report, "append1_8"),
        ratio(report, "append1_8"),
    );
    let _ = writeln!(
        out,
        "- **Batched append** ({} events/s with 1 writer, {} of raw; {} with 8, {} of raw). \
         The same single INSERT … UNNEST as the baseline, plus the version query, `WITH \
         ORDINALITY … ORDER BY ord` and RETURNING; on the client each event's payload is \
         cloned into the column arrays and the metadata re-serialised.",
        v(report, "batch_1"),
        ratio(report, "batch_1"),
        v(report, "batch_8"),
        ratio(report, "batch_8"),
    );
    let _ = writeln!(
        out,
        "- **Command** ({} commands/s with 1 task, {} of raw; {} with 8, {} of raw). \
         `read_stream` is a round trip of its own outside the append's transaction; decoding \
         10 events goes through `serde_json::Value` twice (row → Value → tagged Value → \
         DomainEvent).",
        v(report, "command_1"),
        ratio(report, "command_1"),
        v(report, "command_8"),
        ratio(report, "command_8"),
    );
    let _ = writeln!(
        out,
        "- **Hot streams** (the command on a stock stream of 5,000 events: {} commands/s, {} \
         of the same command on a 10-event stream). `read_stream` has no snapshot or upper \
         bound: a handler that folds a stream from its start pays for its whole history. In \
         `orderflow run` the inventory service keeps folded stock states in a `StreamCache` \
         and reads only the events after the cached version, and the commands worker caches \
         the SKUs it has seen set, which is why the end-to-end rate does not fall as the \
         four stock streams grow (compare the burst's first and last quarters); a restart, \
         a second process or a cache eviction pays the full read again.",
        v(report, "command_long"),
        ratio(report, "command_long"),
    );
    let _ = writeln!(
        out,
        "- **Reading the log** (`read_all` {} events/s, {} of the raw ordered scan). Same \
         index-ordered query plus the `pg_snapshot_xmin` filter; the rest is building \
         `RecordedEvent`s (metadata parsed from JSON per row).",
        v(report, "read_all"),
        ratio(report, "read_all"),
    );
    let _ = writeln!(
        out,
        "- **Replay** (order_status {} events/s, stock_levels {}, timers {}, order_milestones {}; raw scan {}). \
         Replay reads pages of {} through `read_all` and decodes every event into a \
         `DomainEvent` (payload cloned, wrapped in a tagged object, deserialised), then each \
         projection writes its page. order_status and stock_levels write one multi-row \
         statement per page; timers issues one INSERT or DELETE per (order, kind) and so \
         makes hundreds of round trips per page; order_milestones re-reads every order \
         stream the page touches from `events` and decodes it again.",
        v(report, "replay_order_status"),
        v(report, "replay_stock_levels"),
        v(report, "replay_timers"),
        v(report, "replay_order_milestones"),
        v(report, "raw_scan"),
        projector::PAGE_SIZE,
    );
    let _ = writeln!(
        out,
        "- **End to end** ({} orders/s sustained, p99 {} ms at half load). Each order \
         costs {} events in {} transactions and about {} ms of CPU in orderflow, {} ms in \
         PostgreSQL and {} ms in RabbitMQ: {} ms of CPU per order caps this machine's cores \
         near {} orders/s before anything else runs on it, so the burst is CPU-bound. \
         Every event is read by the relay and published with a confirm and most are \
         consumed by one or more services, so each order is also ~{} confirmed publishes \
         and more deliveries, each a few hundred microseconds of CPU somewhere. 500 \
         orders/s on this machine would need about {} ms of CPU per order in total, \
         several times less work per order (or more cores). At half load the latency is \
         the sum of the hops (command → OrderPlaced/Accepted → relay → inventory and \
         payment → relay → saga → OrderConfirmed → relay → shipping → timers projection → \
         scheduler → ShipmentDelivered): each hop is a commit, a wake-up of the relay and a \
         confirmed publish and delivery, and the delivery timer adds the timers projection \
         and up to the scheduler's 100 ms idle sleep.",
        v(report, "e2e_orders"),
        v(report, "e2e_p99"),
        v(report, "e2e_events_per_order"),
        v(report, "e2e_tx_per_order"),
        v(report, "e2e_cpu_orderflow"),
        v(report, "e2e_cpu_postgres"),
        v(report, "e2e_cpu_rabbit"),
        fmt_value(cpu_per_order),
        fmt_value(cap),
        v(report, "e2e_events_per_order"),
        fmt_value(cores * 1000.0 / 500.0),
    );
    out.push_str(&flood(report));
    out
}

/// The flood paragraph: memory of a worker draining a backlog.
fn flood(report: &Report) -> String {
    let Some(peak) = report.get("flood_peak_rss") else {
        return "- **Flood** (memory under a backlog of queued commands) was not measured in this \
                run: it is not part of the default phases because at full scale it adds about \
                two minutes; run `scripts/bench --only flood`.\n"
            .to_owned();
    };
    let small = peak.baseline.as_ref().map_or(f64::NAN, |(_, b)| *b);
    format!(
        "- **Flood** ({} `stock.set` commands queued while no worker ran; `orderflow run --only \
         commands` then handled {} of them in its window). Peak RSS {} MiB against {} MiB for \
         a backlog a hundred times smaller ({}); {} MiB one second after the start. The broker \
         hands the worker at most its prefetch (128 unacknowledged deliveries for the \
         commands worker, 32 handled at once), so the backlog stays in RabbitMQ and the \
         worker's memory depends on the prefetch, not on the queue's length: bounded means \
         the peak does not grow with the backlog. The phase is not part of the default run \
         (about two minutes at full scale); `--only flood` runs it.\n",
        v(report, "flood_backlog"),
        v(report, "flood_handled"),
        fmt_value(peak.value),
        fmt_value(small),
        ratio(report, "flood_peak_rss"),
        v(report, "flood_rss_1s"),
    )
}
