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

/// The phases, in the order the document lists their rows.
pub const PHASES: [&str; 4] = ["storage", "replay", "e2e", "flood"];

/// What a run of only some phases keeps of the document it rewrites: the lines of
/// the other phases (rows, targets, paragraphs, observations), each with the phase it
/// belongs to, and when they were measured.
#[derive(Debug, Default, PartialEq)]
pub struct Previous {
    /// The previous document's `Run:` (start → end, UTC).
    pub run: String,
    /// Its load average line.
    pub load: String,
    /// Its `carried over` condition lines (figures it kept from older runs itself).
    pub carried: Vec<String>,
    pub rows: Vec<(&'static str, String)>,
    pub targets: Vec<(&'static str, String)>,
    pub paragraphs: Vec<(&'static str, String)>,
    pub notes: Vec<(&'static str, String)>,
}

impl Previous {
    /// Reads a document `render` wrote; lines it does not recognise are left out.
    pub fn parse(markdown: &str) -> Previous {
        let mut previous = Previous::default();
        let mut section = "";
        for line in markdown.lines() {
            if let Some(title) = line.strip_prefix("## ") {
                section = title.trim();
                continue;
            }
            if let Some(run) = line.strip_prefix("Run: ") {
                previous.run = run.trim_end_matches('.').to_owned();
                continue;
            }
            match section {
                "Conditions" => {
                    if let Some(load) = line.strip_prefix("- **load average (1 min)**: ") {
                        previous.load = load.to_owned();
                    } else if line.starts_with("- **carried over**: ") {
                        previous.carried.push(line.to_owned());
                    }
                }
                "Results" if is_table_row(line, "| section |") => {
                    let cells = cells(line);
                    let phase = row_phase(
                        cells.first().copied().unwrap_or(""),
                        cells.get(1).copied().unwrap_or(""),
                    );
                    previous.rows.push((phase, line.to_owned()));
                }
                "Targets" if is_table_row(line, "| target |") => {
                    let phase = target_phase(cells(line).first().copied().unwrap_or(""));
                    previous.targets.push((phase, line.to_owned()));
                }
                "Where the time goes" if line.starts_with("- **") => {
                    previous
                        .paragraphs
                        .push((paragraph_phase(line), line.to_owned()));
                }
                "Observations during the run" => {
                    if let Some(note) = line.strip_prefix("- ") {
                        previous.notes.push((note_phase(note), line.to_owned()));
                    }
                }
                _ => {}
            }
        }
        previous
    }

    fn has(&self, phase: &str) -> bool {
        self.rows
            .iter()
            .chain(&self.targets)
            .any(|(p, _)| *p == phase)
    }

    /// `line` marked as measured in the previous run (unless an older mark says when).
    fn mark(&self, line: &str) -> String {
        if line.contains("carried over") {
            return line.to_owned();
        }
        let mark = format!("*(carried over from the run of {})*", self.run);
        match line.trim_end().strip_suffix('|') {
            Some(table_row) => format!("{table_row} {mark} |"),
            None => format!("{line} {mark}"),
        }
    }
}

impl Previous {
    /// The run a kept line of `phase` was measured in: the one its mark names, or the
    /// previous run itself.
    fn run_of(&self, phase: &str) -> String {
        self.rows
            .iter()
            .chain(&self.targets)
            .filter(|(p, _)| *p == phase)
            .find_map(|(_, line)| {
                let (_, rest) = line.split_once("carried over from the run of ")?;
                rest.split_once(")*").map(|(run, _)| run.to_owned())
            })
            .unwrap_or_else(|| self.run.clone())
    }

    /// The load average recorded for `run`: the previous document's own, or the one
    /// its `carried over` line gave for an older run.
    fn load_of(&self, run: &str) -> String {
        if run == self.run {
            return self.load.clone();
        }
        self.carried
            .iter()
            .filter(|line| line.contains(run))
            .find_map(|line| {
                let (_, rest) = line.split_once("(load average (1 min) ")?;
                rest.split_once(')').map(|(load, _)| load.to_owned())
            })
            .unwrap_or_else(|| "not recorded".to_owned())
    }

    /// One `carried over` condition line per run the kept figures come from.
    fn carried_conditions(&self, carried: &[&str]) -> Vec<String> {
        let mut runs: Vec<(String, Vec<&str>)> = Vec::new();
        for phase in carried {
            let run = self.run_of(phase);
            match runs.iter_mut().find(|(r, _)| *r == run) {
                Some((_, phases)) => phases.push(phase),
                None => runs.push((run, vec![phase])),
            }
        }
        runs.into_iter()
            .map(|(run, phases)| {
                format!(
                    "- **carried over**: the figures of {} are not of this run but of the run of {run} (load average (1 min) {}), kept from the document this run rewrote",
                    phases.join(", "),
                    self.load_of(&run)
                )
            })
            .collect()
    }
}

fn is_table_row(line: &str, header: &str) -> bool {
    line.starts_with("| ") && !line.starts_with(header) && !line.starts_with("| ---")
}

fn cells(line: &str) -> Vec<&str> {
    line.trim()
        .trim_matches('|')
        .split(" | ")
        .map(str::trim)
        .collect()
}

/// The phase that measures a results row, from its section and measurement.
pub fn row_phase(section: &str, what: &str) -> &'static str {
    match section {
        "flood" => "flood",
        "end to end" | "raw RabbitMQ" => "e2e",
        "projector" => "replay",
        "raw PostgreSQL" if what.starts_with("ordered scan") => "replay",
        "event store" if what.starts_with("`read_all`") => "replay",
        _ => "storage",
    }
}

pub fn target_phase(name: &str) -> &'static str {
    if name.starts_with("replay") {
        "replay"
    } else if name.starts_with("end to end") {
        "e2e"
    } else if name.contains("flood") {
        "flood"
    } else {
        "storage"
    }
}

/// The phase a "where the time goes" paragraph (`- **Title** …`) is about.
pub fn paragraph_phase(line: &str) -> &'static str {
    let title = line
        .strip_prefix("- **")
        .and_then(|rest| rest.split_once("**"))
        .map_or("", |(title, _)| title);
    match title {
        "Reading the log" | "Replay" => "replay",
        "End to end" | "Scale out" => "e2e",
        "Flood" => "flood",
        _ => "storage",
    }
}

pub fn note_phase(note: &str) -> &'static str {
    if note.starts_with("generated ") {
        "replay"
    } else if note.starts_with("CPU time during the burst")
        || note.starts_with("latency against offered load")
    {
        "e2e"
    } else if let Some(rest) = note.strip_prefix("phase ") {
        PHASES
            .into_iter()
            .find(|p| rest.to_lowercase().starts_with(p))
            .unwrap_or("storage")
    } else if note.contains("flood") {
        "flood"
    } else {
        "storage"
    }
}

/// The document. `previous` (the document being rewritten) and `ran` (the phases of
/// this run): the figures of a phase this run did not measure are taken over from
/// `previous`, marked with the run they come from.
pub fn render(
    report: &Report,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
    previous: Option<&Previous>,
    ran: &[&str],
) -> String {
    let carried: Vec<&str> = previous.map_or_else(Vec::new, |prev| {
        PHASES
            .into_iter()
            .filter(|p| !ran.contains(p) && prev.has(p))
            .collect()
    });
    let keep = |phase: &str| previous.filter(|_| carried.contains(&phase));
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(
        "Written by `scripts/bench` (`crates/bench`, binary `orderflow-bench`); do not edit by \
         hand, run the script. Every figure is measured beside a raw baseline by the same \
         program in the same run, on a database (`orderflow_bench_<run>_<phase>`) and a \
         RabbitMQ vhost (`orderflow_bench_<run>`) of the bench's own, dropped at the end. The \
         ratio is figure ÷ baseline. A run of some phases only (`--only`) keeps the other \
         phases' figures from the document it rewrites, marked *carried over* with the run \
         that measured them.\n\n",
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
    if let Some(prev) = previous {
        for line in prev.carried_conditions(&carried) {
            let _ = writeln!(out, "{line}");
        }
    }
    out.push_str(
        "\nThe machine is shared: other sessions build and run their test suites on the same \
         cores and the same PostgreSQL and RabbitMQ while the bench runs (see the load \
         average above). Treat single figures as ±50%: runs minutes apart at small scale \
         gave batched append at 1 writer anywhere from 0.43× to 0.87× of raw. Ratios are \
         steadier than absolute numbers because each pair runs back to back.\n",
    );
    out.push_str("\n## Results\n\n");
    out.push_str(Report::TABLE_HEADER);
    for phase in PHASES {
        let lines: Vec<String> = match keep(phase) {
            Some(prev) => of_phase(&prev.rows, phase).map(|l| prev.mark(l)).collect(),
            None => this_run(&report.rows, &report.row_phases, phase)
                .map(Report::row_line)
                .collect(),
        };
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    out.push_str("\n## Targets\n\n");
    out.push_str(Report::TARGETS_HEADER);
    for phase in PHASES {
        let lines: Vec<String> = match keep(phase) {
            Some(prev) => of_phase(&prev.targets, phase)
                .map(|l| prev.mark(l))
                .collect(),
            None => this_run(&report.targets, &report.target_phases, phase)
                .map(Report::target_line)
                .collect(),
        };
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    out.push_str("\n## Where the time goes\n\n");
    let analysis = where_the_time_goes(report);
    for phase in PHASES {
        match keep(phase) {
            Some(prev) => {
                for line in of_phase(&prev.paragraphs, phase) {
                    let _ = writeln!(out, "{}", prev.mark(line));
                }
            }
            None => {
                for line in analysis.lines().filter(|l| paragraph_phase(l) == phase) {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
    }
    let mut notes: Vec<String> = report.notes.iter().map(|n| format!("- {n}")).collect();
    if let Some(prev) = previous {
        for phase in &carried {
            notes.extend(of_phase(&prev.notes, phase).map(|l| prev.mark(l)));
        }
    }
    if !notes.is_empty() {
        out.push_str("\n## Observations during the run\n\n");
        for note in notes {
            let _ = writeln!(out, "{note}");
        }
    }
    out.push_str(
        "\n## How to run\n\n```sh\nscripts/bench                # full run (≈ 14 min), rewrites this file and its plot\n\
         scripts/bench --scale 0.05   # quick check, small sizes\n\
         scripts/bench --only storage # one phase (storage, replay, e2e, flood); the others' figures are carried over\n\
         scripts/bench --only flood   # memory under 100,000 queued commands (≈ 2 min; not in the full run)\n```\n",
    );
    out
}

fn of_phase<'a>(
    lines: &'a [(&'static str, String)],
    phase: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    lines
        .iter()
        .filter(move |(p, _)| *p == phase)
        .map(|(_, l)| l.as_str())
}

fn this_run<'a, T>(
    items: &'a [T],
    phases: &'a [&'static str],
    phase: &'a str,
) -> impl Iterator<Item = &'a T> + 'a {
    items
        .iter()
        .zip(phases)
        .filter(move |(_, p)| **p == phase)
        .map(|(item, _)| item)
}

fn v(report: &Report, key: &str) -> String {
    report
        .value(key)
        .map_or_else(|| "n/a".to_owned(), fmt_value)
}

/// The row's baseline value.
fn base(report: &Report, key: &str) -> String {
    report
        .get(key)
        .and_then(|r| r.baseline.as_ref())
        .map_or_else(|| "n/a".to_owned(), |(_, b)| fmt_value(*b))
}

fn ratio(report: &Report, key: &str) -> String {
    report
        .get(key)
        .and_then(|r| r.ratio())
        .map_or_else(|| "n/a".to_owned(), crate::report::fmt_ratio)
}

/// Orders/s the raw work of RabbitMQ and PostgreSQL alone allows, each measured with
/// the whole machine to itself: an order's deliveries at the raw publish + consume
/// rate, then its appending transactions at the raw single-row INSERT rate (8 clients).
/// Returns that INSERT rate and the ceiling; `None` unless this run measured both.
fn raw_services_ceiling(report: &Report) -> Option<(f64, f64)> {
    let rabbit = report.value("rabbit")?;
    let insert = report.get("append1_8")?.baseline.as_ref()?.1;
    let deliveries = report.value("e2e_msgs_per_order")?;
    let transactions = report.value("e2e_tx_per_order")?;
    let seconds = deliveries / rabbit + transactions / insert;
    (seconds > 0.0).then(|| (insert, 1.0 / seconds))
}

/// Whether the burst used the whole machine: its CPU per order times its rate against
/// the cores.
fn burst_busy(report: &Report, cpu_per_order: f64, cores: f64) -> String {
    let Some(rate) = report.value("e2e_orders") else {
        return ".".to_owned();
    };
    let busy = rate * cpu_per_order / (cores * 1000.0);
    if busy >= 0.9 {
        format!(
            ", and the burst kept the cores {:.0}% busy with these three alone: it is \
             CPU-bound (a profile of the burst, perf on all CPUs, 4 Dec: 4% idle; postgres \
             43% of the samples, orderflow 28%, RabbitMQ 16%, and about 40% of postgres's \
             and a third of orderflow's in the kernel, mostly the wake-ups of loopback round \
             trips).",
            busy * 100.0
        )
    } else {
        format!(
            "; the burst kept the cores only {:.0}% busy with these three: the rest of \
             its time is waiting, on the slowest consumer (below) and on the round trips \
             of each order's hops.",
            busy * 100.0
        )
    }
}

/// What 1,000 orders/s (issue 6) would take, or that this run reached it.
fn thousand_orders(report: &Report, cores: f64) -> String {
    match report.value("e2e_orders") {
        Some(rate) if rate >= 1_000.0 => format!(
            "This run sustained {} orders/s, above issue 6's 1,000: at this CPU per order \
             the machine has room for more, and what sets the rate is the slowest \
             consumer's waits (below).",
            fmt_value(rate)
        ),
        _ => format!(
            "1,000 orders/s on this machine would need about {} ms of CPU per order in \
             total; what is left is the number of messages and round trips per order, not \
             what any one of them computes.",
            fmt_value(cores)
        ),
    }
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
    let busy = burst_busy(report, cpu_per_order, cores);
    let thousand = thousand_orders(report, cores);
    let with_postgres = match raw_services_ceiling(report) {
        Some((insert, ceiling)) => format!(
            "with PostgreSQL's {} appending transactions per order at its raw single-row \
             INSERT rate with 8 clients ({} per s, the storage rows), the two servers' raw \
             work alone caps this machine near {} orders/s, however little orderflow itself \
             costs",
            v(report, "e2e_tx_per_order"),
            fmt_value(insert),
            fmt_value(ceiling)
        ),
        None => format!(
            "PostgreSQL's {} appending transactions per order come on top (its raw \
             single-row INSERT rate is in the storage rows, of another run)",
            v(report, "e2e_tx_per_order")
        ),
    };
    let _ = writeln!(
        out,
        "- **One-event append** ({} events/s with 1 writer, {} of raw; {} with 8, {} of raw). \
         `append` on a known version is one autocommitted statement, as the raw baseline's \
         INSERT is: an INSERT … SELECT that writes only if the stream's last version \
         (`max(stream_version)`, the end of the stream's index) is the one expected, with \
         RETURNING. With one writer the commit's WAL flush (synchronous_commit=on) dominates \
         both; with eight, the server's group commit hides the flush, and the version check \
         and the client's CPU show.",
        v(report, "append1_1"),
        ratio(report, "append1_1"),
        v(report, "append1_8"),
        ratio(report, "append1_8"),
    );
    let _ = writeln!(
        out,
        "- **Batched append** ({} events/s with 1 writer, {} of raw; {} with 8, {} of raw). \
         The same single INSERT … UNNEST as the baseline, in one statement that also checks \
         each stream's last version (one `max` per stream, from the end of its index), keeps \
         the order with `WITH ORDINALITY … ORDER BY ord` and returns the positions; on the \
         client each event's payload is cloned into the column arrays and the metadata \
         re-serialised. A batch with a stream of unknown version (`Any`) goes the \
         transactional way (BEGIN, the versions, the INSERT, COMMIT); its version query read \
         every event of the named streams until 5 Dec (one `max … GROUP BY` over them), which \
         made the replay log's generation below run at about 14,000 events/s instead of \
         55,000.",
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
         four stock streams grow (compare the burst's first and last quarters). A restart, \
         a second process or a cache eviction starts a stock stream from its snapshot \
         (`services::snapshots`, one every 500 events) and folds only the events after it: \
         on a stream of 100,000 events {} ms, against {} ms from its first event ({} of \
         it; since 5 Dec, before which every restart paid the whole history).",
        v(report, "command_long"),
        ratio(report, "command_long"),
        v(report, "cold_stock"),
        base(report, "cold_stock"),
        ratio(report, "cold_stock"),
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
        "- **Replay** (order_status {} events/s, stock_levels {}, timers {}, order_milestones {}; all four together with `replay_many` {}; raw scan {}). \
         Replay reads pages of {} with `read_all_text` (payloads as JSON text) on a task of its \
         own, one page ahead, and deserialises each payload straight into its `DomainEvent` \
         on a blocking thread (upcasting older versions first), while the projections \
         apply the page before: reading and writing overlap, and no \
         `serde_json::Value` is built per payload (the raw baseline builds one, which is \
         why a single projection's replay can run at or above the raw scan). Each \
         projection writes a page in one statement (order_milestones: two when a page \
         continues order streams, to read their progress): order_status an UPDATE of the \
         orders that have a row and an INSERT of those that have none in one statement, \
         without reading the rows first; stock_levels, since 5 Dec, likewise (each \
         SKU's change in the page: its last stock.set and the units moved after it); \
         timers one DELETE (in a CTE) and INSERT keeping the order of effects; \
         order_milestones reads what `reserved`/`paid` need from `order_milestone_progress` \
         instead of folding every order stream again. What is left is the server's work \
         per row written (index maintenance, WAL). `replay_many` reads the log once and \
         hands each page (shared, not copied; one queued at most per projection) to one \
         task per projection, each writing in its own transaction on its own connection: \
         the four projections' statements run at the same time in four backends instead \
         of one after another in one, and each commits only when all have applied the \
         whole log. The slowest projection sets the pace, and the four backends share \
         the machine's cores, so its rate lies between the harmonic sum of the single \
         rates (one after another) and the slowest one's. Where the CPU of `replay_many` \
         goes (perf, all CPUs, 4 Dec): PostgreSQL's backends about 60%, the replaying \
         process about 30%; glibc's malloc alone took a tenth of all samples, so the \
         binaries now allocate with mimalloc (110-115k → 125-133k events/s for all four \
         on the same log; the allocator's share fell to about 4%). Of the server's time, \
         order_milestones' page statement (590,000 milestone rows and 91,000 progress \
         rows per million events) is the largest part, then the reader's scan and \
         order_status; dropping its `ON CONFLICT` (tried) changed nothing measurable. \
         What it was paying for was the table it wrote into: a rebuild used to empty the \
         live tables with `DELETE` in its transaction and insert every row again, and each \
         inserted row met the deleted row of the same key in the unique index, which \
         costs a visit to the heap to see that it is dead (the same 590,000 rows: 2.0 s \
         to insert after a `DELETE`, 1.0 s after a `TRUNCATE`). A rebuild now writes into \
         empty temporary copies of its tables and, once every projection has applied the \
         whole log, replaces the live rows with one `TRUNCATE` and one INSERT in key \
         order per table (readers see the old rows until then). On the same 1M-event log \
         (4 Dec), all four together went from 141-160k to 179-194k events/s, and \
         order_milestones alone from 142-190k to 200-216k; the final copy takes about \
         1.1 s of a 5.3 s replay. Since 5 Dec the copy of `order_milestones` has no \
         index: its rows are only added, the first of a key winning, so each row's \
         insertion into a unique index at a random place (order ids are random) is \
         replaced by one sort when the copy is installed, which keeps each key's first \
         arrival (`Projection::first_wins_tables`; 1M events, A B A B: order_milestones \
         alone 153k → 176k events/s, all four 123k → 137k). The copies are never \
         analysed, and the planner took them for small: order_status's page statement \
         joined a page's keys to its copy by hashing a scan of the whole copy, twice, \
         on every page, so the rebuild slowed down as the copy grew (about 50 ms a page \
         near the end of a million events; found with auto_explain). A rebuild now turns \
         sequential scans off for its transaction (every statement of a projection \
         finds rows by key; `runner::find_rows_by_key`, also for verify's rebuild): \
         order_status's pages take a few ms, and order_status alone went from \
         169-177k to 193k events/s, all four from 125-130k to 139k (5 Dec, one run each \
         with auto_explain on). Both cores are busy throughout: only less work per \
         event, not more overlap, raises this rate further.",
        v(report, "replay_order_status"),
        v(report, "replay_stock_levels"),
        v(report, "replay_timers"),
        v(report, "replay_order_milestones"),
        v(report, "replay_all_four"),
        v(report, "raw_scan"),
        projector::REPLAY_PAGE_SIZE,
    );
    let _ = writeln!(
        out,
        "- **End to end** ({} orders/s sustained; at half load p99 {} ms to the final \
         status, {} ms to `confirmed`, which is what issue 3 times). Each order \
         costs {} events in {} transactions and about {} ms of CPU in orderflow, {} ms in \
         PostgreSQL and {} ms in RabbitMQ: {} ms of CPU per order caps this machine's cores \
         near {} orders/s before anything else runs on it{busy} \
         **What \"sustained\" counts** (since 4 Dec): the burst is done when every \
         order is final *and* the work that follows is done too (every reservation \
         committed, every notification written); the row's note also gives the rate to \
         the last final status. The end of that work is read from the rows' own timestamps, as the final \
         statuses are, and the bench looks every 200 ms (since 5 Dec: its 50 ms poll, a \
         join over every notification, took about 0.4 of a core of PostgreSQL while the \
         burst drained). Before, the burst stopped at the last final status \
         while the notification and inventory queues still held about 13,000 and 2,800 \
         messages (0.5 scale): the notification service, with 16 of the process's \
         roughly 300 handlers, gets a small share of the cores while everything is \
         busy, and alone at the end it was bound by its one batch insert at a time \
         (about 3,500 notifications/s; now four batches go at once; and since 5 Dec, \
         late, a batch no longer waits out its 20 ms while the queue has a backlog: with \
         the wait, each of its lanes added one row per 20 ms, and the last notification \
         of a full-scale burst came 2.8 s after the last final status, then 1.1 s; \
         908–964 → 1,097–1,116 orders/s), as inventory was by \
         one commit at a time per stock stream (about 1,200 decisions/s over the four \
         SKUs; now the decisions queued for a stream are appended together, one commit \
         per turn: G H G H at 0.5 scale, 315 and 304 against 371 and 338 orders/s). \
         That figure was not a rate the system can keep \
         up, and the paced run that followed started on that backlog: its p99 was \
         mostly the backlog (at 0.3 scale, with the same build, p99 900 ms before the \
         change and 61 to 149 ms after). Same run, same bench, the build before this \
         session's changes against after: 208 against 266 orders/s drained (256 and \
         343 to the last final status). The burst's rate includes filling the \
         pipeline: every order is published at once and the intake places them all \
         before many are final (first and last quarter in the note). \
         **The work per order** (pg_stat_statements, 4 Dec, 0.5 scale, after this \
         session's changes): about 6.4 commits and 9 statements reach PostgreSQL per \
         order: 1.95 appends alone and 0.43 grouped appends (about 8 decisions each; \
         group commit, `ORDERFLOW_APPEND_SLOTS`, 8 slots by default from 4 Dec, 4 \
         since 5 Dec with pools of at most 16 connections: the \
         decisions appended while every slot is busy go in one statement), 0.5 \
         two-stream appends (shipping), one gateway-ledger statement (committed \
         without waiting for its flush since 5 Dec, see below), one customer-key \
         lookup, 0.09 notification inserts (rows of 20 ms share one since 4 Dec: 2.1 \
         inserts per order before), 0.4 NOTIFY, and about one for the followers (pages \
         read, projection writes, checkpoints). Three changes of 4 Dec cut the commits \
         per order from 12.0–12.6 to 6.2–6.4 (A B A B at 0.5 scale each): notifications \
         grouped over 20 ms (306–308 → 350–372 orders/s), a payment's request appended \
         with the gateway's answer instead of before the call (one append less), and \
         group commit on by default (292–324 → 330–375 orders/s). Stream reads went \
         from 2.5 per order to none: the workers of a process share their folded order \
         and shipment streams, so the saga, shipping and the delivery timer decide on \
         the state the worker before them left. Of an order's ~{} events, the relay \
         hands each to the services of its own process that take it, straight into \
         their consumers' lanes (since 5 Dec, late; ADR 0005, \"Events handed over\"), \
         and publishes with confirms only what service queues consumed by other \
         processes, or queues outside programs bind, need (none here); each order is \
         {} deliveries and {} publishes (counted in the burst by the process's \
         `/metrics`: the shop's command, and whatever did go through the broker). \
         The steps there: 11.5 deliveries and 8.75 publishes per order until the \
         router handed a command over in process when its process consumes the \
         command's partition (10.5 and 7.7, burst A B A B 512/540/511/547 orders/s); \
         events no queue is bound to not sent (8 of a physical order's 13 were then \
         published; A B A B 505/518 → 521/551 orders/s); and the events' hand-off \
         (1.0 deliveries per order, bursts at 0.5 scale 572 → 790 and 839 orders/s, \
         RabbitMQ's CPU per order 0.73 → 0.08–0.12 ms). The raw RabbitMQ \
         baseline above moves {} messages/s with the whole machine to itself (a \
         publish with confirm and a delivery with ack each): at {} deliveries per order \
         that is {} orders/s for the broker alone, before PostgreSQL or orderflow use a \
         cycle; {with_postgres}. {thousand} At half load the latency is the sum of the hops (command → \
         OrderPlaced/Accepted → relay → inventory and payment → relay → saga → \
         OrderConfirmed → relay → shipping → the delivery timer → \
         ShipmentDelivered); the note on when each event is recorded shows the hops. \
         A relay hop through the broker was about 10 ms at p50 (5 Dec, 170 orders/s, \
         0.5 scale, the process's histograms over the paced run: from an event's \
         transaction start to its reading by the relay p50 ≤ 3 / p99 ≤ 15 ms, to the \
         broker's confirm p50 ≤ 10 / p99 ≤ 25 ms; the handlers p50 1–5 ms, \
         notification 25 ms by design): most of it the quorum queues' commit, which a \
         delivery waits for as the confirm does. Handed over in process, a hop is the \
         relay's read and the handler: p99 to the final status 70 ms at 286 orders/s \
         before the events' hand-off, 21–32 ms at 357–419 orders/s after (0.5 scale). \
         Every follower of the log waits for the gap-safe horizon (the oldest \
         transaction in flight), and at half load most of a hop is waiting for a core: \
         an order paced at a steady rate costs about twice the CPU of one in the burst \
         (5 Dec, 0.5 scale: the whole machine busy at 1.75–1.85 cores for 208–260 \
         orders/s, about 7 ms per order, against 3.5–4.2 ms in the burst; PostgreSQL \
         3 against 1.5, RabbitMQ 1.9 against 0.9, orderflow 1.9 against 1.2), because \
         nothing queues long enough to be batched (group commit, multiple acks, pages \
         of the log) and the followers of the log read on almost every append: about \
         36 statements per order at 200 orders/s at the start of 5 Dec, 17 after that \
         day's changes (timer looks, empty re-reads, projector pages at most every \
         10 ms), against 9 in the burst. Half of the \
         burst's rate is therefore close to what the machine can keep up without \
         queues, and the tail is queueing for the cores. The cost per order falls as \
         the rate rises, because more of it is shared (5 Dec, before the events' hand-off, 0.5 scale, CPU of all \
         three processes over 10 s of the paced run): about 24 ms at 50 orders/s \
         (1.26 cores busy; PostgreSQL served 40 statements per order), 11.7 ms at 150 \
         and 9.5 ms at 200 (1.75 and 1.9 cores), against 4.4 ms in the burst: a p99 of \
         50 ms at half load needs the cost of an order at a steady rate about halved, \
         not a faster handler. In the burst the backlog sits in the inventory's \
         consumer: on 4 Dec, with the cores busy throughout (vmstat: 1–3% idle), its \
         decisions on the four hot stock streams went 1.9 to an append, and twice the \
         handlers (64) did not move the rate (373 and 401 against 387 and 394 orders/s, \
         A B A B at 0.5 scale). On 5 Dec, late, with less CPU per order and the cores \
         no longer saturated (about 80% busy), the events offered to the inventory sat \
         at their limit (8 × its prefetch) through most of the burst while every other \
         consumer's were nearly empty (the process's `/metrics` every 250 ms: offered \
         less handled), so the relay waited on it; with 128 lanes instead of 32 (256 \
         prefetch) more decisions queue for a stream's turn and go in one commit: \
         full-scale bursts 1,103 and 1,143 → 1,209 and 1,169 orders/s. The \
         gateway simulator's ledger commits without waiting for its WAL flush (a pool \
         of its own with `synchronous_commit = off`; safe, since the payment's append \
         that records the answer flushes the log up to it): one flushing commit less \
         per order, B A B A at 0.5 scale 460/456 and 484/455 orders/s (5 Dec; an earlier \
         try had shown 5–10% fewer WAL flushes at 100 orders/s and no \
         measurable change). The delivery timer, due at \
         once here, is handed by shipping to the scheduler of its process and fired \
         from memory (since 5 Dec; ARCHITECTURE, \"Durable timers\"): about 3 ms at \
         p50 and 5 ms at p99 from shipment to delivery, against 18–19 and 25–50 ms \
         through the timers table (the projector's page, then the scheduler's look), \
         which remains the path of every timer due later and the guarantee after a \
         crash.",
        v(report, "e2e_orders"),
        v(report, "e2e_p99"),
        v(report, "e2e_p99_confirmed"),
        v(report, "e2e_events_per_order"),
        v(report, "e2e_tx_per_order"),
        v(report, "e2e_cpu_orderflow"),
        v(report, "e2e_cpu_postgres"),
        v(report, "e2e_cpu_rabbit"),
        fmt_value(cpu_per_order),
        fmt_value(cap),
        v(report, "e2e_events_per_order"),
        v(report, "e2e_msgs_per_order"),
        v(report, "e2e_publishes_per_order"),
        v(report, "rabbit"),
        v(report, "e2e_msgs_per_order"),
        v(report, "e2e_broker_ceiling"),
    );
    out.push_str(&scale_out(report));
    out.push_str(&flood(report));
    out
}

/// The scale-out paragraph: the burst with the workers in processes of their own, and
/// with a second process of the busiest one. Empty when the phase did not get there.
fn scale_out(report: &Report) -> String {
    let (Some(split), Some(scaled)) = (
        report.get("e2e_orders_split"),
        report.get("e2e_orders_scaled"),
    ) else {
        return String::new();
    };
    let busiest = scaled
        .what
        .split_once("two of ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .map_or("the busiest worker", |(name, _)| name);
    // The bench's orders all reserve on four SKUs: two inventories share those streams.
    let hot_streams = if busiest == "inventory" {
        " Two inventory processes also decide on the same four hot stock streams (every \
         order of the bench reserves on one of four SKUs): a reservation decided on one \
         process's cached state of a stream the other has just appended to conflicts \
         and is read and decided again: work that a shop's orders, spread over many \
         SKUs, would rarely cause."
    } else {
        ""
    };
    let limit = machine_limit(report, split.value);
    let gain = scaled.value / split.value.max(f64::MIN_POSITIVE);
    let verdict = if gain >= 1.05 {
        " In this run the second process raised the split run's rate: with each worker \
         alone in a process, the busiest one held the others back, and a second one gets \
         it a second share of the cores; all workers in one process still did more on \
         the same cores."
    } else if gain <= 0.95 {
        " In this run the second process lowered the rate: what it adds (connections, \
         channels, caches, conflicts) cost more than the share of the cores it got."
    } else {
        " In this run the second process changed the rate by less than 5%."
    };
    format!(
        "- **Scale out** (each of the nine workers in a process of its own: {} orders/s, \
         {} of all workers in one process; with a second process of {busiest}, the one \
         that used the most CPU of those that scale out (a second relay only stands by: \
         one relay publishes at a time): {} orders/s, {} of one process each). Every process runs \
         on the same two cores as PostgreSQL and RabbitMQ (each split row's note says how \
         busy they were and what each server cost per order): a second process of the \
         busiest worker adds a consumer, its connections and its caches, not a core, so \
         here it can only share the same CPU differently; on a machine with idle cores \
         it is how a worker scales (competing consumers on its queue, ordered per order \
         by its partitions). Splitting the workers apart costs CPU of its own: each \
         process opens its own connections and publishing channels and keeps its own \
         caches (the inventory's folded stock streams, the commands worker's known \
         SKUs). The split row's note gives each worker's CPU per order.{limit}{verdict}{hot_streams}\n",
        fmt_value(split.value),
        ratio(report, "e2e_orders_split"),
        fmt_value(scaled.value),
        ratio(report, "e2e_orders_scaled"),
    )
}

/// Whether the split burst was bound by the machine: its CPU per order against the
/// cores, and the rate that allows.
fn machine_limit(report: &Report, split_rate: f64) -> String {
    let Some(cpu) = report.value("e2e_cpu_split").filter(|cpu| *cpu > 0.0) else {
        return String::new();
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cap = cores * 1000.0 / cpu;
    let one = report
        .get("e2e_cpu_split")
        .and_then(|row| row.baseline.as_ref())
        .map_or(f64::NAN, |(_, one)| *one);
    let share = split_rate / cap;
    let verdict = if share >= 0.9 {
        "the machine, not a worker, set its rate, and a second process of any worker can \
         only take cores from the others"
    } else {
        "the rest of its time was waiting, on the slowest worker or on round trips, which \
         a second process of that worker can shorten"
    };
    format!(
        " With each worker apart an order cost {} ms of CPU (orderflow's processes, \
         PostgreSQL and RabbitMQ together; {} in one process), which caps these {} cores \
         near {} orders/s; the split burst ran at {} ({:.0}% of that cap): {verdict}.",
        fmt_value(cpu),
        fmt_value(one),
        cores,
        fmt_value(cap),
        fmt_value(split_rate),
        100.0 * share
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Row;

    fn row(key: &'static str, section: &'static str, what: &str, value: f64) -> Row {
        Row {
            key,
            section,
            what: what.to_owned(),
            value,
            unit: "events/s",
            baseline: Some(("raw".to_owned(), 100.0)),
            note: String::new(),
        }
    }

    fn at(hour: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2026, 1, 1, hour, 0, 0)
            .single()
            .unwrap_or_default()
    }

    /// A full run's document: a row and a target per phase, and a note.
    fn full_run() -> String {
        let mut report = Report::default();
        report.context("load average (1 min)", "1.00 before, 2.00 after");
        report.phase = "storage";
        report.add(row("batch_1", "event store", "`append_batch`", 11.0));
        report.target("batched append ≥ 50% of raw", true, "old storage");
        report.phase = "replay";
        report.add(row("raw_scan", "raw PostgreSQL", "ordered scan by …", 22.0));
        report.add(row("replay_x", "projector", "`projector::replay` x", 33.0));
        report.target("replay ≥ 1 events/s", false, "old replay");
        report.note("generated 5 order-flow events");
        report.phase = "e2e";
        report.add(row("e2e_orders", "end to end", "sustained orders/s", 44.0));
        report.note("CPU time during the burst: old");
        render(&report, at(1), at(2), None, &["storage", "replay", "e2e"])
    }

    #[test]
    fn a_partial_run_keeps_the_other_phases_figures_marked_as_carried_over() {
        let previous = Previous::parse(&full_run());
        assert_eq!(previous.run, "2026-01-01 01:00:00 → 02:00:00 (UTC)");
        assert_eq!(previous.load, "1.00 before, 2.00 after");
        let phases: Vec<&str> = previous.rows.iter().map(|(p, _)| *p).collect();
        assert_eq!(phases, ["storage", "replay", "replay", "e2e"]);

        let mut report = Report {
            phase: "replay",
            ..Report::default()
        };
        report.add(row("replay_x", "projector", "`projector::replay` x", 99.0));
        report.target("replay ≥ 1 events/s", true, "new replay");
        let doc = render(&report, at(3), at(4), Some(&previous), &["replay"]);

        assert!(doc.contains("| 99.0 events/s |"), "this run's figure");
        assert!(
            !doc.contains("| 33.0 events/s |"),
            "the old replay figure is gone"
        );
        assert!(!doc.contains("old replay"));
        let carried: Vec<&str> = doc
            .lines()
            .filter(|l| l.contains("carried over from the run of 2026-01-01 01:00:00"))
            .collect();
        assert!(
            carried.iter().any(|l| l.contains("| 11.0 events/s |")),
            "storage row kept"
        );
        assert!(
            carried.iter().any(|l| l.contains("| 44.0 events/s |")),
            "e2e row kept"
        );
        assert!(
            carried.iter().any(|l| l.contains("old storage")),
            "storage target kept"
        );
        assert!(carried
            .iter()
            .any(|l| l.contains("CPU time during the burst: old")));
        assert!(carried.iter().any(|l| l.starts_with("- **End to end**")));
        assert!(doc.contains("- **carried over**: the figures of storage, e2e"));
        // storage rows stay first, e2e after this run's replay rows
        let position = |needle: &str| doc.find(needle).unwrap_or(usize::MAX);
        assert!(position("| 11.0 events/s |") < position("| 99.0 events/s |"));
        assert!(position("| 99.0 events/s |") < position("| 44.0 events/s |"));

        // a second partial run keeps the first mark instead of stacking another
        let again = render(
            &report,
            at(5),
            at(6),
            Some(&Previous::parse(&doc)),
            &["replay"],
        );
        assert!(again.contains(
            "- **carried over**: the figures of storage, e2e are not of this run but of the run of 2026-01-01 01:00:00 → 02:00:00 (UTC) (load average (1 min) 1.00 before, 2.00 after)"
        ));
        assert_eq!(again.matches("- **carried over**").count(), 1);
        let storage_row = again.lines().find(|l| l.contains("| 11.0 events/s |"));
        assert_eq!(
            storage_row.map(|l| l.matches("carried over").count()),
            Some(1)
        );
        assert!(storage_row.is_some_and(|l| l.contains("2026-01-01 01:00:00")));
    }

    #[test]
    fn a_full_run_carries_nothing_over() {
        let previous = Previous::parse(&full_run());
        let mut report = Report {
            phase: "storage",
            ..Report::default()
        };
        report.add(row("batch_1", "event store", "`append_batch`", 12.0));
        let doc = render(
            &report,
            at(3),
            at(4),
            Some(&previous),
            &["storage", "replay", "e2e"],
        );
        assert!(!doc.contains("carried over from"));
        assert!(!doc.contains("| 11.0 events/s |"));
    }

    #[test]
    fn rows_and_paragraphs_are_told_apart_by_phase() {
        assert_eq!(
            row_phase("event store", "`read_all`, pages of 1000"),
            "replay"
        );
        assert_eq!(
            row_phase("event store", "`append`, 1 event per call"),
            "storage"
        );
        assert_eq!(row_phase("raw RabbitMQ", "publish"), "e2e");
        assert_eq!(target_phase("memory bounded under a flood of 5"), "flood");
        assert_eq!(paragraph_phase("- **Reading the log** (…)"), "replay");
        assert_eq!(paragraph_phase("- **Hot streams** (…)"), "storage");
        assert_eq!(note_phase("phase Replay failed: boom"), "replay");
    }
}
