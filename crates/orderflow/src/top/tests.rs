//! The dashboard drawn into ratatui's `TestBackend` from hand-made snapshots, and the
//! snapshot read from a real database and broker (a database and vhost of its own).
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use ratatui::backend::TestBackend;
use ratatui::style::Color;
use ratatui::Terminal;
use services::metrics::FollowerLag;
use services::registry::Process;
use uuid::Uuid;

use super::history::{History, Point};
use super::render::{self, buffer_text, Dashboard};
use super::snapshot::{self, Breaker, Circuit, QueueDepth, Snapshot, Sources};

fn at(second: i64) -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(second)
}

fn process(gone: bool) -> Process {
    Process {
        id: Uuid::new_v4(),
        host: "vm-1".into(),
        pid: 4242,
        workers: vec!["payment".into(), "relay".into()],
        version: "0.1.0".into(),
        http_addr: Some("127.0.0.1:9464".into()),
        heartbeat_interval_ms: 5000,
        started_at: at(0),
        last_heartbeat: at(10),
        silent_seconds: 1.5,
        gone,
    }
}

/// A busy system: orders in most statuses, one follower behind, dead letters, an open
/// circuit.
fn busy() -> Snapshot {
    let orders = snapshot::STATUSES
        .iter()
        .zip([3, 1, 2, 0, 5, 42, 7, 1])
        .map(|(s, n)| ((*s).to_owned(), n))
        .collect();
    let queue = |name: &str, messages, consumers| QueueDepth {
        name: name.into(),
        messages,
        consumers,
    };
    Snapshot {
        taken_at: at(100),
        orders,
        placed_last_minute: 17,
        log_ahead_of_server: false,
        head: 98765,
        followers: vec![
            FollowerLag {
                follower: "projection:order_status".into(),
                behind_events: 0,
                behind_seconds: 0.0,
                last_applied_age_seconds: Some(0.2),
            },
            FollowerLag {
                follower: "relay".into(),
                behind_events: 1234,
                behind_seconds: 45.0,
                last_applied_age_seconds: Some(50.0),
            },
        ],
        open_timers: 6,
        queues: Ok(vec![
            queue("orderflow.commands.intake", 0, 2),
            queue("orderflow.payment", 57, 0),
            queue("orderflow.dead-letter", 3, 0),
        ]),
        processes: vec![process(false), process(true)],
        breakers: vec![Breaker {
            process: "vm-1:4242".into(),
            state: Circuit::Open,
        }],
    }
}

fn history_of(points: &[(i64, i64, i64, i64)]) -> History {
    let mut history = History::new();
    for (second, placed, finished, head) in points {
        history.push(Point {
            at: at(*second),
            placed: *placed,
            finished: *finished,
            head: *head,
        });
    }
    history
}

/// Draws the dashboard on a `TestBackend` as the live terminal would.
fn draw(snapshot: &Snapshot, history: &History) -> anyhow::Result<Terminal<TestBackend>> {
    let dashboard = Dashboard {
        snapshot,
        history,
        hint: Some(super::HINT),
    };
    let mut terminal = Terminal::new(TestBackend::new(120, dashboard.height()))?;
    terminal.draw(|frame| frame.render_widget(&dashboard, frame.area()))?;
    Ok(terminal)
}

/// The line of the frame that holds `needle`.
fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines().find(|l| l.contains(needle)).unwrap_or("")
}

/// The foreground colour of the first cell where `needle` starts.
fn colour_of(terminal: &Terminal<TestBackend>, needle: &str) -> Option<Color> {
    let buf = terminal.backend().buffer();
    let width = usize::from(buf.area.width);
    let first = needle.chars().next()?.to_string();
    for (y, row) in buf.content().chunks(width).enumerate() {
        let line: String = row.iter().map(|c| c.symbol()).collect();
        if let Some(byte) = line.find(needle) {
            let x = line[..byte].chars().count();
            let cell = &row[x];
            assert_eq!(cell.symbol(), first, "row {y}");
            return Some(cell.fg);
        }
    }
    None
}

#[test]
fn the_frame_shows_every_figure_of_the_snapshot() -> anyhow::Result<()> {
    let history = history_of(&[
        (40, 20, 10, 90000),
        (99, 50, 40, 98000),
        (100, 62, 41, 98765),
    ]);
    let terminal = draw(&busy(), &history)?;
    let text = buffer_text(terminal.backend().buffer());

    assert!(line_with(&text, "completed").contains("42"), "{text}");
    assert!(line_with(&text, "under_review").contains('1'), "{text}");
    assert!(
        line_with(&text, "orderflow top").contains("log head 98765"),
        "{text}"
    );
    // rates: 12 placed in the last second, 42 over the last 60 s
    assert!(line_with(&text, "placed ").contains("12.0/s"), "{text}");
    assert!(line_with(&text, "placed ").contains("0.7/s"), "{text}");
    assert!(line_with(&text, "events ").contains("765.0/s"), "{text}");
    assert!(text.contains("placed in the last minute: 17"), "{text}");
    // the sparkline of placements, under its label, right of the orders panel
    let bars = text
        .lines()
        .skip_while(|l| !l.contains("orders placed per second"))
        .skip(1)
        .take(4)
        .any(|l| l.chars().skip(31).any(|c| "▁▂▃▄▅▆▇█".contains(c)));
    assert!(bars, "no sparkline in\n{text}");
    let relay = line_with(&text, "relay ");
    assert!(
        relay.contains("1234 behind") && relay.contains("45.0s"),
        "{relay}"
    );
    // 45 s behind is past the alert level: a full gauge; caught up: an empty one
    assert!(relay.contains("████") && !relay.contains('░'), "{relay}");
    let caught_up = line_with(&text, "projection:order_status");
    assert!(
        caught_up.contains("░░░░") && !caught_up.contains('█'),
        "{caught_up}"
    );
    assert!(
        line_with(&text, "orderflow.payment").contains("57"),
        "{text}"
    );
    assert!(line_with(&text, "dead letters").contains('3'), "{text}");
    assert!(
        line_with(&text, "payment circuit").contains("OPEN"),
        "{text}"
    );
    assert!(line_with(&text, "live processes").contains('1'), "{text}");
    assert!(
        text.contains("gone") && text.contains("payment,relay"),
        "{text}"
    );
    assert!(text.contains("q, Esc or Ctrl-C quits"), "{text}");
    Ok(())
}

#[test]
fn trouble_is_coloured() -> anyhow::Result<()> {
    let terminal = draw(&busy(), &History::new())?;
    assert_eq!(colour_of(&terminal, "OPEN"), Some(Color::Red));
    assert_eq!(
        colour_of(&terminal, "3  (orderflow dlq list)"),
        Some(Color::Red)
    );
    // messages waiting with no consumer
    assert_eq!(
        colour_of(&terminal, "orderflow.payment"),
        Some(Color::Yellow)
    );
    assert_eq!(
        colour_of(&terminal, "orderflow.commands.intake"),
        Some(Color::Reset)
    );

    let mut calm = busy();
    calm.breakers[0].state = Circuit::Closed;
    calm.queues = Ok(vec![QueueDepth {
        name: "orderflow.dead-letter".into(),
        messages: 0,
        consumers: 0,
    }]);
    let terminal = draw(&calm, &History::new())?;
    assert_eq!(colour_of(&terminal, "closed"), Some(Color::Green));
    let text = buffer_text(terminal.backend().buffer());
    assert!(!text.contains("OPEN"), "{text}");
    assert!(!text.contains("dlq list"), "{text}");
    Ok(())
}

#[test]
fn an_unreachable_broker_is_said_and_rates_wait_for_a_second_snapshot() -> anyhow::Result<()> {
    let mut snapshot = busy();
    snapshot.queues = Err("cannot connect to RabbitMQ".into());
    snapshot.breakers.clear();
    let history = history_of(&[(100, 62, 41, 98765)]);
    let text = render::to_text(
        &Dashboard {
            snapshot: &snapshot,
            history: &history,
            hint: None,
        },
        render::TEXT_WIDTH,
    );
    assert!(
        text.contains("RabbitMQ: cannot connect to RabbitMQ"),
        "{text}"
    );
    assert!(
        line_with(&text, "dead letters").contains("unknown"),
        "{text}"
    );
    assert!(
        text.contains("no payment process serves /metrics"),
        "{text}"
    );
    assert!(line_with(&text, "placed ").contains(" -"), "{text}");
    // plain text: no escape sequences, nothing past the width
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text
        .lines()
        .all(|l| l.chars().count() <= usize::from(render::TEXT_WIDTH)));
    Ok(())
}

#[test]
fn a_log_ahead_of_the_server_is_shown_in_red_only_then() -> anyhow::Result<()> {
    let mut snapshot = busy();
    let text = buffer_text(draw(&snapshot, &History::new())?.backend().buffer());
    assert!(!text.contains("LOG AHEAD"), "{text}");
    snapshot.log_ahead_of_server = true;
    let terminal = draw(&snapshot, &History::new())?;
    assert_eq!(colour_of(&terminal, "LOG AHEAD"), Some(Color::Red));
    let text = buffer_text(terminal.backend().buffer());
    assert!(
        text.contains("(OPERATIONS.md, Backup and restore)"),
        "{text}"
    );
    // and nothing else is pushed off the frame
    assert!(text.contains("q, Esc or Ctrl-C quits"), "{text}");
    Ok(())
}

#[test]
fn the_interval_has_a_floor() {
    assert_eq!(
        super::parse_interval("250ms"),
        Ok(Duration::from_millis(250))
    );
    assert!(super::parse_interval("10ms").is_err());
    assert!(super::parse_interval("soon").is_err());
}

#[test]
fn q_esc_and_ctrl_c_quit() {
    use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
    let key = |code, modifiers| Event::Key(KeyEvent::new(code, modifiers));
    for quit in [
        key(KeyCode::Char('q'), KeyModifiers::NONE),
        key(KeyCode::Esc, KeyModifiers::NONE),
        key(KeyCode::Char('c'), KeyModifiers::CONTROL),
    ] {
        assert_eq!(super::input_of(&quit), Some(super::Input::Quit));
    }
    assert_eq!(
        super::input_of(&key(KeyCode::Char('c'), KeyModifiers::NONE)),
        None
    );
    assert_eq!(
        super::input_of(&Event::Resize(80, 24)),
        Some(super::Input::Redraw)
    );
}

// ------------------------------------------------------------ real PostgreSQL, RabbitMQ

/// Publishes `n` messages straight to `queue` (the default exchange), as a relay would.
async fn publish_to(bus: &bus::Bus, queue: &str, n: usize) -> anyhow::Result<()> {
    for _ in 0..n {
        let props = bus::OutgoingProperties::new(Uuid::new_v4().to_string());
        bus.publish("", queue, b"{}".to_vec(), props).await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_snapshot_counts_what_waits_in_the_queues() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let vhost = testkit::TestVhost::new().await?;
    let mut sources = Sources::open(db.second_store().await?, &vhost.url).await;
    let first = sources.snapshot().await?;
    assert_eq!(first.orders_total(), 0);
    assert_eq!(first.dead_letters(), Some(0));
    assert_eq!(
        first.queue("orderflow.payment").map(|q| q.messages),
        Some(0)
    );
    assert_eq!(
        first.queues.as_ref().map(Vec::len).ok(),
        Some(snapshot::orderflow_queues().len()),
        "every queue is counted: {:?}",
        first.queues
    );
    assert!(first.breakers.is_empty() && first.processes.is_empty());

    let bus = bus::Bus::connect(&vhost.url).await?;
    publish_to(&bus, "orderflow.payment", 3).await?;
    publish_to(&bus, bus::DEAD_LETTER_QUEUE, 1).await?;
    // wait_until's closure may be called again while a future is alive: share by lock.
    let sources = tokio::sync::Mutex::new(sources);
    let seen = testkit::wait_until(
        "the snapshot to count the messages",
        Duration::from_secs(10),
        || async {
            let s = sources.lock().await.snapshot().await?;
            let payment = s
                .queue("orderflow.payment")
                .map(|q| (q.messages, q.consumers));
            Ok((payment == Some((3, 0)) && s.dead_letters() == Some(1)).then_some(s))
        },
    )
    .await?;
    assert!(seen.taken_at >= first.taken_at);
    Ok(())
}

#[tokio::test]
async fn the_snapshot_counts_orders_by_status_and_recent_placements() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let vhost = testkit::TestVhost::new().await?;
    let mut sources = Sources::open(db.second_store().await?, &vhost.url).await;
    // Read-model rows as the projector writes them: one placed now, one an hour ago.
    for (status, placed_ago) in [("completed", "0 s"), ("cancelled", "1 hour")] {
        sqlx::query(
            "INSERT INTO order_status (order_id, customer_id, status, total_cents, currency,
                                       item_count, placed_at, updated_at, last_global_position)
             VALUES ($1, 'c', $2, 100, 'EUR', 1, now() - $3::interval, now(), 1)",
        )
        .bind(Uuid::new_v4())
        .bind(status)
        .bind(placed_ago)
        .execute(db.pool())
        .await?;
    }
    let s = sources.snapshot().await?;
    assert_eq!(s.orders_in("completed"), 1);
    assert_eq!(s.orders_in("cancelled"), 1);
    assert_eq!(s.orders_in("pending"), 0);
    assert_eq!(s.finished_total(), 2);
    assert_eq!(s.placed_last_minute, 1);
    Ok(())
}

#[tokio::test]
async fn the_snapshot_tells_a_log_ahead_of_the_servers_transaction_ids() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let vhost = testkit::TestVhost::new().await?;
    let mut sources = Sources::open(db.second_store().await?, &vhost.url).await;
    assert!(!sources.snapshot().await?.log_ahead_of_server);
    // As a logical restore into a younger server leaves it: an event appended by a
    // transaction id this server has not reached.
    sqlx::query(
        "INSERT INTO events (transaction_id, stream_name, stream_version, event_id, event_type,
                             schema_version, payload, metadata)
         VALUES (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 1000000,
                 'stock-RESTORED', 0, $1, 'StockSet', 1, '{}', '{}')",
    )
    .bind(Uuid::new_v4())
    .execute(db.pool())
    .await?;
    assert!(sources.snapshot().await?.log_ahead_of_server);
    Ok(())
}
