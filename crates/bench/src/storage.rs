//! Storage: raw PostgreSQL inserts beside the event store's `append` / `append_batch`,
//! and a full command (read a 10-event stream, fold, decide, append) beside the same
//! SQL done by hand.
use std::sync::Arc;

use domain::{streams, DomainEvent, StockInput, StockState};
use eventstore::{EventStore, ExpectedVersion, NewEvent, StreamAppend};
use sqlx::PgPool;
use uuid::Uuid;

use crate::fixtures::{self, metadata_json, new_event};
use crate::infra::{create_raw_table, BenchDb};
use crate::measure::{run_clients, Timed, Until};
use crate::report::{Report, Row};
use crate::Ctx;

/// Streams each writer of the one-event benchmarks cycles through (the first call on a
/// stream says `NoStream`, later ones `Exact`).
const STREAMS_PER_WRITER: usize = 100;
/// Events per `append_batch` call / rows per multi-row INSERT.
const BATCH: usize = 100;
/// Streams per batch.
const STREAMS_PER_BATCH: usize = 10;
/// Events in each stream a command reads.
const COMMAND_STREAM_LEN: usize = 10;
/// Events in the long (hot SKU) stock stream.
const LONG_STREAM_LEN: usize = 5_000;
/// Events in the stock stream a restarted process folds (months of a popular SKU).
const COLD_STREAM_LEN: usize = 100_000;
/// Cold folds timed each way (the median is reported).
const COLD_FOLDS: usize = 5;

const RAW_INSERT_ONE: &str = "INSERT INTO raw_events \
    (stream_name, stream_version, event_id, event_type, schema_version, payload, metadata) \
    VALUES ($1, $2, $3, $4, $5, $6, $7)";

const RAW_INSERT_MANY: &str = "INSERT INTO raw_events \
    (stream_name, stream_version, event_id, event_type, schema_version, payload, metadata) \
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::int[], \
                         $6::jsonb[], $7::jsonb[])";

pub async fn run(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let db = BenchDb::new(&ctx.database_url, &ctx.run_id, "storage")?;
    let result = measure(ctx, &db, report).await;
    db.drop().await;
    result
}

fn key(clients: usize, one: &'static str, eight: &'static str) -> &'static str {
    if clients == 1 {
        one
    } else {
        eight
    }
}

async fn measure(ctx: &Ctx, db: &BenchDb, report: &mut Report) -> anyhow::Result<()> {
    let store = db.store(10).await?;
    let pool = db.pool(10).await?;
    create_raw_table(&pool).await?;
    let sample = fixtures::sample_event();
    let payload = Arc::new(sample.to_payload());
    report.context(
        "storage payload",
        format!(
            "every row: an `OrderPlaced` payload of {} bytes of JSON + metadata",
            payload.to_string().len()
        ),
    );

    eprintln!("== storage: single-row appends");
    let mut raw_single_8 = 0.0;
    for clients in [1, 8] {
        let raw = raw_single(&pool, &payload, clients, ctx).await?;
        let ours = store_single(&store, &payload, clients, ctx).await?;
        let row = Row {
            key: key(clients, "append1_1", "append1_8"),
            section: "event store",
            what: format!("`append`, 1 event per call, {clients} writer(s)"),
            value: ours.rate(1.0),
            unit: "events/s",
            baseline: Some((
                format!("single-row INSERT per transaction, {clients} client(s)"),
                raw.rate(1.0),
            )),
            note: format!(
                "p50 {:.2} / p99 {:.2} ms (raw {:.2} / {:.2} ms)",
                ours.p_ms(50.0),
                ours.p_ms(99.0),
                raw.p_ms(50.0),
                raw.p_ms(99.0)
            ),
        };
        if clients == 8 {
            raw_single_8 = raw.rate(1.0);
            ratio_target(
                report,
                "append, 1 event per call, 8 writers ≥ 70% of raw single-row INSERT (issue 6)",
                &row,
                0.7,
            );
        }
        report.add(row);
    }

    eprintln!("== storage: batches of {BATCH}");
    for clients in [1, 8] {
        let raw = raw_batch(&pool, &payload, clients, ctx).await?;
        let ours = store_batch(&store, &payload, clients, ctx).await?;
        let row = Row {
            key: key(clients, "batch_1", "batch_8"),
            section: "event store",
            what: format!(
                "`append_batch`, {BATCH} events in {STREAMS_PER_BATCH} streams per call, {clients} writer(s)"
            ),
            value: ours.rate(BATCH as f64),
            unit: "events/s",
            baseline: Some((
                format!("multi-row INSERT (UNNEST) of {BATCH} rows per transaction, {clients} client(s)"),
                raw.rate(BATCH as f64),
            )),
            note: format!(
                "p50 {:.2} / p99 {:.2} ms per call (raw {:.2} / {:.2} ms)",
                ours.p_ms(50.0),
                ours.p_ms(99.0),
                raw.p_ms(50.0),
                raw.p_ms(99.0)
            ),
        };
        ratio_target(
            report,
            format!("batched append ≥ 50% of raw multi-row INSERT ({clients} writer(s))"),
            &row,
            0.5,
        );
        report.add(row);
    }

    eprintln!("== storage: commands (read {COMMAND_STREAM_LEN} events, fold, decide, append)");
    for clients in [1, 8] {
        let count = ctx.commands.div_ceil(clients) * clients;
        prepare_command_streams(&store, &pool, clients, count).await?;
        let raw = raw_command(&pool, &payload, clients, count).await?;
        let ours = store_command(&store, clients, count).await?;
        if clients == 8 {
            // Issue 6 holds the command to the plain insert's rate, not to the raw
            // command's: the read and the decision are the event store's overhead.
            let against_insert = Row {
                key: "command_8_vs_insert",
                section: "event store",
                what: String::new(),
                value: ours.rate(1.0),
                unit: "commands/s",
                baseline: Some((String::new(), raw_single_8)),
                note: String::new(),
            };
            ratio_target(
                report,
                "command (read the stream, decide, append), 8 tasks ≥ 50% of raw single-row INSERT with 8 clients (issue 6)",
                &against_insert,
                0.5,
            );
        }
        report.add(Row {
            key: key(clients, "command_1", "command_8"),
            section: "event store",
            what: format!(
                "command: `read_stream` ({COMMAND_STREAM_LEN} events) → `fold` → `stock::decide` → `append`, {clients} task(s)"
            ),
            value: ours.rate(1.0),
            unit: "commands/s",
            baseline: Some((
                format!("one transaction: SELECT the {COMMAND_STREAM_LEN} rows + INSERT 1, {clients} client(s)"),
                raw.rate(1.0),
            )),
            note: format!(
                "{count} commands; p50 {:.2} / p99 {:.2} ms (raw {:.2} / {:.2} ms)",
                ours.p_ms(50.0),
                ours.p_ms(99.0),
                raw.p_ms(50.0),
                raw.p_ms(99.0)
            ),
        });
    }

    let len = LONG_STREAM_LEN;
    eprintln!("== storage: the same command on one stock stream of {len} events");
    let long = long_stream_command(&store, len, ctx).await?;
    let short = report.value("command_1").unwrap_or(0.0);
    report.add(Row {
        key: "command_long",
        section: "event store",
        what: format!("the same command on a stock stream of {len} events, 1 task"),
        value: long.rate(1.0),
        unit: "commands/s",
        baseline: Some(("the command on a 10-event stream, 1 task (above)".to_owned(), short)),
        note: format!(
            "p50 {:.2} / p99 {:.2} ms; a handler without a cache reads and folds the whole stock stream on every reservation",
            long.p_ms(50.0),
            long.p_ms(99.0)
        ),
    });

    let len = COLD_STREAM_LEN;
    eprintln!("== storage: a stock stream of {len} events folded by a cache that does not hold it");
    let (from_start, from_snapshot) = cold_folds(&store, len).await?;
    report.add(Row {
        key: "cold_stock",
        section: "event store",
        what: format!(
            "the first decision's fold of a stock stream of {len} events after a restart, from its snapshot"
        ),
        value: from_snapshot,
        unit: "ms",
        baseline: Some(("the same fold from the stream's first event".to_owned(), from_start)),
        note: format!(
            "median of {COLD_FOLDS} each; a snapshot every {} events (services::snapshots)",
            services::snapshots::SNAPSHOT_EVERY
        ),
    });
    Ok(())
}

/// How long a cache that does not hold a stock stream of `len` events takes to fold it:
/// from the stream's first event, and from its snapshot (ms, medians).
async fn cold_folds(store: &EventStore, len: usize) -> anyhow::Result<(f64, f64)> {
    use services::exec::{load_cached, StreamCache};
    use services::snapshots;

    let sku = format!("cold{len}");
    let stream = streams::stock(&sku);
    fill_stock_stream(store, &sku, len).await?;
    let mut from_start = Vec::with_capacity(COLD_FOLDS);
    for _ in 0..COLD_FOLDS {
        let cache = StreamCache::<StockState>::new(1);
        let started = std::time::Instant::now();
        load_cached(store, &cache, &stream).await?;
        from_start.push(started.elapsed().as_secs_f64() * 1e3);
    }
    // The first cache that keeps snapshots finds none, folds from the start, leaves one.
    let first = StreamCache::with_snapshots(1, snapshots::stock());
    load_cached(store, &first, &stream).await?;
    let mut from_snapshot = Vec::with_capacity(COLD_FOLDS);
    for _ in 0..COLD_FOLDS {
        let cache = StreamCache::with_snapshots(1, snapshots::stock());
        let started = std::time::Instant::now();
        let loaded = load_cached(store, &cache, &stream).await?;
        from_snapshot.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            cache.reads() == 1 && loaded.version == Some(len as i64 - 1),
            "the fold from the snapshot ended at {:?}, not at the stream's last version",
            loaded.version
        );
    }
    Ok((median(from_start), median(from_snapshot)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn bench_event(payload: &serde_json::Value) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        event_type: "OrderPlaced".to_owned(),
        schema_version: 1,
        payload: payload.clone(),
        metadata: fixtures::metadata(),
    }
}

async fn raw_single(
    pool: &PgPool,
    payload: &Arc<serde_json::Value>,
    clients: usize,
    ctx: &Ctx,
) -> anyhow::Result<Timed> {
    let (pool, payload) = (pool.clone(), Arc::clone(payload));
    run_clients(clients, Until::Elapsed(ctx.op_duration), move |c, i| {
        let (pool, payload) = (pool.clone(), Arc::clone(&payload));
        async move {
            let event = bench_event(&payload);
            sqlx::query(RAW_INSERT_ONE)
                .bind(format!("raw1-{clients}-{c}-{}", i % STREAMS_PER_WRITER))
                .bind((i / STREAMS_PER_WRITER) as i64)
                .bind(event.event_id)
                .bind(&event.event_type)
                .bind(event.schema_version)
                .bind(&event.payload)
                .bind(metadata_json(&event.metadata))
                .execute(&pool)
                .await?;
            Ok(())
        }
    })
    .await
}

async fn store_single(
    store: &EventStore,
    payload: &Arc<serde_json::Value>,
    clients: usize,
    ctx: &Ctx,
) -> anyhow::Result<Timed> {
    let (store, payload) = (store.clone(), Arc::clone(payload));
    run_clients(clients, Until::Elapsed(ctx.op_duration), move |c, i| {
        let (store, payload) = (store.clone(), Arc::clone(&payload));
        async move {
            let stream = format!("bench1-{clients}-{c}-{}", i % STREAMS_PER_WRITER);
            let round = i / STREAMS_PER_WRITER;
            let expected = match round {
                0 => ExpectedVersion::NoStream,
                r => ExpectedVersion::Exact(r as i64 - 1),
            };
            store
                .append(&stream, expected, vec![bench_event(&payload)])
                .await?;
            Ok(())
        }
    })
    .await
}

async fn raw_batch(
    pool: &PgPool,
    payload: &Arc<serde_json::Value>,
    clients: usize,
    ctx: &Ctx,
) -> anyhow::Result<Timed> {
    let (pool, payload) = (pool.clone(), Arc::clone(payload));
    run_clients(clients, Until::Elapsed(ctx.op_duration), move |c, i| {
        let (pool, payload) = (pool.clone(), Arc::clone(&payload));
        async move {
            let per_stream = BATCH / STREAMS_PER_BATCH;
            let mut names = Vec::with_capacity(BATCH);
            let mut versions = Vec::with_capacity(BATCH);
            let mut ids = Vec::with_capacity(BATCH);
            let mut types = Vec::with_capacity(BATCH);
            let mut schema_versions = Vec::with_capacity(BATCH);
            let mut payloads = Vec::with_capacity(BATCH);
            let mut metadata = Vec::with_capacity(BATCH);
            for k in 0..BATCH {
                let event = bench_event(&payload);
                names.push(format!("rawb-{clients}-{c}-{i}-{}", k / per_stream));
                versions.push((k % per_stream) as i64);
                ids.push(event.event_id);
                types.push(event.event_type);
                schema_versions.push(event.schema_version);
                metadata.push(metadata_json(&event.metadata));
                payloads.push(event.payload);
            }
            sqlx::query(RAW_INSERT_MANY)
                .bind(&names)
                .bind(&versions)
                .bind(&ids)
                .bind(&types)
                .bind(&schema_versions)
                .bind(&payloads)
                .bind(&metadata)
                .execute(&pool)
                .await?;
            Ok(())
        }
    })
    .await
}

async fn store_batch(
    store: &EventStore,
    payload: &Arc<serde_json::Value>,
    clients: usize,
    ctx: &Ctx,
) -> anyhow::Result<Timed> {
    let (store, payload) = (store.clone(), Arc::clone(payload));
    run_clients(clients, Until::Elapsed(ctx.op_duration), move |c, i| {
        let (store, payload) = (store.clone(), Arc::clone(&payload));
        async move {
            let per_stream = BATCH / STREAMS_PER_BATCH;
            let appends = (0..STREAMS_PER_BATCH)
                .map(|s| StreamAppend {
                    stream_name: format!("benchb-{clients}-{c}-{i}-{s}"),
                    expected_version: ExpectedVersion::NoStream,
                    events: (0..per_stream).map(|_| bench_event(&payload)).collect(),
                })
                .collect();
            store.append_batch(appends).await?;
            Ok(())
        }
    })
    .await
}

fn command_sku(clients: usize, j: usize) -> String {
    format!("cmd{clients}x{j}")
}

/// `count` stock streams of `COMMAND_STREAM_LEN` events (StockSet + reservations) in the
/// log, and copies of them in `raw_events`.
async fn prepare_command_streams(
    store: &EventStore,
    pool: &PgPool,
    clients: usize,
    count: usize,
) -> anyhow::Result<()> {
    let writers = 4;
    let batches = count.div_ceil(STREAMS_PER_BATCH);
    let store = store.clone();
    run_clients(
        writers,
        Until::Ops(batches.div_ceil(writers)),
        move |w, i| {
            let store = store.clone();
            async move {
                let batch = i * writers + w;
                let appends: Vec<StreamAppend> = (batch * STREAMS_PER_BATCH
                    ..((batch + 1) * STREAMS_PER_BATCH).min(count))
                    .map(|j| {
                        let sku = command_sku(clients, j);
                        let mut events = vec![new_event(&DomainEvent::StockSet(
                            domain::events::StockSet {
                                sku: sku.clone(),
                                quantity: 1_000_000,
                            },
                        ))];
                        for line in 1..COMMAND_STREAM_LEN {
                            events.push(new_event(&DomainEvent::StockReserved(
                                domain::events::StockReserved {
                                    sku: sku.clone(),
                                    order_id: Uuid::new_v4(),
                                    line: line as u32,
                                    quantity: 1,
                                },
                            )));
                        }
                        StreamAppend {
                            stream_name: streams::stock(&sku),
                            expected_version: ExpectedVersion::NoStream,
                            events,
                        }
                    })
                    .collect();
                if !appends.is_empty() {
                    store.append_batch(appends).await?;
                }
                Ok(())
            }
        },
    )
    .await?;
    sqlx::query(
        "INSERT INTO raw_events \
           (stream_name, stream_version, event_id, event_type, schema_version, payload, metadata) \
         SELECT stream_name, stream_version, event_id, event_type, schema_version, payload, metadata \
         FROM events WHERE stream_name LIKE $1 ORDER BY global_position",
    )
    .bind(format!("stock-cmd{clients}x%"))
    .execute(pool)
    .await?;
    // Set hint bits and statistics on both copies alike, so neither side pays for it.
    sqlx::query("VACUUM ANALYZE raw_events")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    Ok(())
}

async fn raw_command(
    pool: &PgPool,
    payload: &Arc<serde_json::Value>,
    clients: usize,
    count: usize,
) -> anyhow::Result<Timed> {
    let (pool, payload) = (pool.clone(), Arc::clone(payload));
    run_clients(clients, Until::Ops(count / clients), move |c, i| {
        let (pool, payload) = (pool.clone(), Arc::clone(&payload));
        async move {
            let stream = streams::stock(&command_sku(clients, i * clients + c));
            // The raw baseline: sqlx itself, without the cancel-safe wrapper.
            #[allow(clippy::disallowed_methods)]
            let mut tx = pool.begin().await?;
            let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(
                "SELECT stream_version, payload FROM raw_events \
                 WHERE stream_name = $1 ORDER BY stream_version",
            )
            .bind(&stream)
            .fetch_all(&mut *tx)
            .await?;
            let next = rows.last().map_or(0, |(v, _)| v + 1);
            let event = bench_event(&payload);
            sqlx::query(RAW_INSERT_ONE)
                .bind(&stream)
                .bind(next)
                .bind(event.event_id)
                .bind("StockReserved")
                .bind(event.schema_version)
                .bind(&event.payload)
                .bind(metadata_json(&event.metadata))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await
}

async fn store_command(store: &EventStore, clients: usize, count: usize) -> anyhow::Result<Timed> {
    let store = store.clone();
    run_clients(clients, Until::Ops(count / clients), move |c, i| {
        let store = store.clone();
        async move {
            command_once(
                &store,
                command_sku(clients, i * clients + c),
                Some(COMMAND_STREAM_LEN),
            )
            .await
        }
    })
    .await
}

/// One reservation as the inventory service makes it: read the whole stock stream, fold,
/// decide, append with the expected version.
async fn command_once(
    store: &EventStore,
    sku: String,
    expect_len: Option<usize>,
) -> anyhow::Result<()> {
    let stream = streams::stock(&sku);
    let records = store.read_stream(&stream, 0).await?;
    if let Some(len) = expect_len {
        anyhow::ensure!(records.len() == len, "{stream}: {} events", records.len());
    }
    let events = records
        .iter()
        .map(|r| DomainEvent::decode(&r.event_type, r.schema_version, &r.payload))
        .collect::<Result<Vec<_>, _>>()?;
    let state: StockState = domain::fold(events.iter());
    let decided = domain::stock::decide(
        &state,
        StockInput::Reserve {
            sku,
            order_id: Uuid::new_v4(),
            line: 0,
            quantity: 1,
        },
    );
    anyhow::ensure!(
        matches!(decided.as_slice(), [DomainEvent::StockReserved(_)]),
        "{stream}: unexpected decision {decided:?}"
    );
    let expected = state
        .version
        .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
    store
        .append(&stream, expected, decided.iter().map(new_event).collect())
        .await?;
    Ok(())
}

/// The same command on one stock stream of `len` events (StockSet, then reserved and
/// committed pairs): what a hot SKU's stream costs every reservation.
async fn long_stream_command(store: &EventStore, len: usize, ctx: &Ctx) -> anyhow::Result<Timed> {
    let sku = format!("long{len}");
    fill_stock_stream(store, &sku, len).await?;
    let store = store.clone();
    run_clients(1, Until::Elapsed(ctx.op_duration), move |_, _| {
        let (store, sku) = (store.clone(), sku.clone());
        async move { command_once(&store, sku, None).await }
    })
    .await
}

/// Writes `sku`'s stock stream of `len` events: a `StockSet`, then reserved and
/// committed pairs, as a popular SKU's stream grows.
async fn fill_stock_stream(store: &EventStore, sku: &str, len: usize) -> anyhow::Result<()> {
    let sku = sku.to_owned();
    let stream = streams::stock(&sku);
    let mut events = vec![new_event(&DomainEvent::StockSet(
        domain::events::StockSet {
            sku: sku.clone(),
            quantity: 1_000_000_000,
        },
    ))];
    while events.len() < len {
        let order_id = Uuid::new_v4();
        events.push(new_event(&DomainEvent::StockReserved(
            domain::events::StockReserved {
                sku: sku.clone(),
                order_id,
                line: 0,
                quantity: 1,
            },
        )));
        if events.len() < len {
            events.push(new_event(&DomainEvent::StockCommitted(
                domain::events::StockCommitted {
                    sku: sku.clone(),
                    order_id,
                    line: 0,
                    quantity: 1,
                },
            )));
        }
    }
    let mut version: Option<i64> = None;
    for chunk in events.chunks(1_000) {
        let expected = version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let result = store.append(&stream, expected, chunk.to_vec()).await?;
        version = Some(result.next_expected_version);
    }
    Ok(())
}

/// A target on `row`'s ratio to its baseline: passes at `floor` or above.
fn ratio_target(report: &mut Report, name: impl Into<String>, row: &Row, floor: f64) {
    let ratio = row.ratio().unwrap_or(0.0);
    report.target(
        name,
        ratio >= floor,
        format!(
            "{:.0}% ({} vs {} per s)",
            ratio * 100.0,
            crate::report::fmt_value(row.value),
            crate::report::fmt_value(row.baseline.as_ref().map_or(0.0, |b| b.1))
        ),
    );
}
