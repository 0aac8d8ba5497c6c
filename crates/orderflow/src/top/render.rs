//! The dashboard as ratatui widgets: a pure function of a [`Snapshot`] and the
//! [`History`] of earlier ones, so the same code draws the live terminal, the
//! `--once` text and the tests' `TestBackend`.
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, LineGauge, Paragraph, Row, Sparkline, Table, Widget, Wrap};

use super::history::{History, Rates};
use super::snapshot::{Circuit, Snapshot};

/// Lag at or above this many seconds fills a follower's gauge (the alert level
/// docs/OPERATIONS.md suggests).
pub const LAG_ALERT_SECONDS: f64 = 30.0;
/// Lag above this is worth a yellow.
const LAG_WARN_SECONDS: f64 = 5.0;

/// Width of the `--once` frame.
pub const TEXT_WIDTH: u16 = 110;

const ORDERS_HEIGHT: u16 = 11;

/// One frame: the snapshot, the history it joins, and the line at the bottom.
pub struct Dashboard<'a> {
    pub snapshot: &'a Snapshot,
    pub history: &'a History,
    /// What the keys do (interactive) or nothing (`--once`).
    pub hint: Option<&'a str>,
}

impl Dashboard<'_> {
    /// Rows the whole dashboard needs to show every line.
    pub fn height(&self) -> u16 {
        1 + self.alert_height()
            + ORDERS_HEIGHT
            + self.followers_height()
            + self.queues_height()
            + self.processes_height()
            + u16::from(self.hint.is_some())
    }

    fn alert_height(&self) -> u16 {
        u16::from(self.snapshot.log_ahead_of_server)
    }

    fn followers_height(&self) -> u16 {
        rows(self.snapshot.followers.len()).max(1) + 2
    }

    fn queues_height(&self) -> u16 {
        let queues = match &self.snapshot.queues {
            Ok(queues) => rows(queues.len()) + 1,
            Err(_) => 2,
        };
        let health = rows(self.snapshot.breakers.len()).max(1) + 3;
        queues.max(health) + 2
    }

    fn processes_height(&self) -> u16 {
        rows(self.snapshot.processes.len()).max(1) + 3
    }
}

fn rows(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

impl Widget for &Dashboard<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let [title, alert, orders, followers, queues, processes, hint] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(self.alert_height()),
            Constraint::Length(ORDERS_HEIGHT),
            Constraint::Length(self.followers_height()),
            Constraint::Length(self.queues_height()),
            Constraint::Min(3),
            Constraint::Length(u16::from(self.hint.is_some())),
        ])
        .areas(area);
        title_line(self.snapshot).render(title, buf);
        if self.snapshot.log_ahead_of_server {
            restore_alert().render(alert, buf);
        }
        let [orders, throughput] =
            Layout::horizontal([Constraint::Length(30), Constraint::Fill(1)]).areas(orders);
        orders_table(self.snapshot).render(orders, buf);
        render_throughput(self.snapshot, self.history, throughput, buf);
        render_followers(self.snapshot, followers, buf);
        let [queues, health] =
            Layout::horizontal([Constraint::Length(56), Constraint::Fill(1)]).areas(queues);
        render_queues(self.snapshot, queues, buf);
        health_panel(self.snapshot).render(health, buf);
        processes_table(self.snapshot).render(processes, buf);
        if let Some(text) = self.hint {
            Paragraph::new(Line::from(text).style(Style::new().fg(Color::DarkGray)))
                .render(hint, buf);
        }
    }
}

fn panel(title: &str) -> Block<'_> {
    Block::new().borders(Borders::ALL).title(Span::styled(
        format!(" {title} "),
        Style::new().add_modifier(Modifier::BOLD),
    ))
}

fn header(cells: Vec<&str>) -> Row<'_> {
    Row::new(cells).style(Style::new().add_modifier(Modifier::BOLD))
}

pub fn title_line(snapshot: &Snapshot) -> Paragraph<'static> {
    Paragraph::new(Line::from(vec![
        Span::styled("orderflow top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  {} UTC  log head {}  orders {}  open timers {}",
            snapshot.taken_at.format("%Y-%m-%d %H:%M:%S"),
            snapshot.head,
            snapshot.orders_total(),
            snapshot.open_timers
        )),
    ]))
}

/// A logical restore into another server left the log's transaction ids ahead of the
/// server's: nothing new is projected or relayed, yet every lag reads 0.
pub fn restore_alert() -> Paragraph<'static> {
    Paragraph::new(
        "LOG AHEAD OF THE SERVER'S TRANSACTION IDS: followers read nothing new \
         (OPERATIONS.md, Backup and restore)",
    )
    .style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD))
}

pub fn orders_table(snapshot: &Snapshot) -> Table<'static> {
    let rows = snapshot.orders.iter().map(|(status, n)| {
        let style = match status.as_str() {
            "cancelled" | "rejected" if *n > 0 => Style::new().fg(Color::Yellow),
            "under_review" if *n > 0 => Style::new().fg(Color::Cyan),
            _ => Style::new(),
        };
        Row::new(vec![status.clone(), n.to_string()]).style(style)
    });
    Table::new(rows, [Constraint::Length(14), Constraint::Fill(1)])
        .header(header(vec!["status", "orders"]))
        .block(panel("orders"))
}

fn rate(rates: Option<Rates>, pick: fn(&Rates) -> f64) -> String {
    rates.map_or_else(|| "-".to_owned(), |r| format!("{:.1}/s", pick(&r)))
}

/// Per-second rates now and over the last minute, and a sparkline of placements.
pub fn throughput_lines(snapshot: &Snapshot, history: &History) -> Paragraph<'static> {
    let now = history.current();
    let minute = history.last_minute();
    let line = |name: &str, pick: fn(&Rates) -> f64| {
        Line::from(format!(
            "{name:<9} {:>9}   last minute {:>9}",
            rate(now, pick),
            rate(minute, pick)
        ))
    };
    Paragraph::new(vec![
        line("placed", |r| r.placed),
        line("finished", |r| r.finished),
        line("events", |r| r.events),
        Line::from(format!(
            "placed in the last minute: {}",
            snapshot.placed_last_minute
        )),
    ])
}

fn render_throughput(snapshot: &Snapshot, history: &History, area: Rect, buf: &mut Buffer) {
    let block = panel("throughput");
    let inner = block.inner(area);
    block.render(area, buf);
    let [text, label, spark] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(1),
        Constraint::Fill(1),
    ])
    .areas(inner);
    throughput_lines(snapshot, history).render(text, buf);
    Paragraph::new("orders placed per second, one bar per refresh")
        .style(Style::new().fg(Color::DarkGray))
        .render(label, buf);
    placed_sparkline(history, spark.width).render(spark, buf);
}

/// Orders placed per second, the newest at the right edge.
pub fn placed_sparkline(history: &History, width: u16) -> Sparkline<'static> {
    let data = history.placed_per_second();
    let shown = data.len().saturating_sub(usize::from(width));
    Sparkline::default()
        .data(data[shown..].to_vec())
        .style(Style::new().fg(Color::Green))
}

fn lag_style(seconds: f64) -> Style {
    if seconds >= LAG_ALERT_SECONDS {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else if seconds >= LAG_WARN_SECONDS {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new().fg(Color::Green)
    }
}

/// One line per follower: its name, a gauge of its lag against the alert level, and
/// the lag in positions and seconds.
fn render_followers(snapshot: &Snapshot, area: Rect, buf: &mut Buffer) {
    let block = panel("log followers (lag behind the head)");
    let inner = block.inner(area);
    block.render(area, buf);
    if snapshot.followers.is_empty() {
        Paragraph::new("no checkpoints yet: no projector or relay has run").render(inner, buf);
        return;
    }
    let lines =
        Layout::vertical(vec![Constraint::Length(1); snapshot.followers.len()]).split(inner);
    for (lag, line) in snapshot.followers.iter().zip(lines.iter()) {
        let [name, gauge] =
            Layout::horizontal([Constraint::Length(28), Constraint::Fill(1)]).areas(*line);
        Paragraph::new(lag.follower.clone()).render(name, buf);
        follower_gauge(lag).render(gauge, buf);
    }
}

pub fn follower_gauge(lag: &services::metrics::FollowerLag) -> LineGauge<'static> {
    let ratio = (lag.behind_seconds / LAG_ALERT_SECONDS).clamp(0.0, 1.0);
    LineGauge::default()
        .ratio(ratio)
        .label(format!(
            "{:>7} behind {:>6.1}s ",
            lag.behind_events, lag.behind_seconds
        ))
        // Blocks rather than lines, so the fill shows in `--once` text too.
        .filled_symbol("█")
        .unfilled_symbol("░")
        .filled_style(lag_style(lag.behind_seconds))
        .unfilled_style(Style::new().fg(Color::DarkGray))
}

/// The queues' table, or why the broker could not be asked.
fn render_queues(snapshot: &Snapshot, area: Rect, buf: &mut Buffer) {
    match &snapshot.queues {
        Ok(_) => queues_table(snapshot).render(area, buf),
        Err(why) => Paragraph::new(format!("RabbitMQ: {why}"))
            .style(Style::new().fg(Color::Red))
            .wrap(Wrap { trim: true })
            .block(panel("queues"))
            .render(area, buf),
    }
}

pub fn queues_table(snapshot: &Snapshot) -> Table<'static> {
    let rows: Vec<Row> = match &snapshot.queues {
        Ok(queues) => queues
            .iter()
            .map(|q| {
                let dead = q.name == bus::DEAD_LETTER_QUEUE;
                let retry = q.name.starts_with("orderflow.retry.");
                let style = if dead && q.messages > 0 {
                    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
                } else if q.messages > 0 && q.consumers == 0 && !dead && !retry {
                    // Waiting with nobody to take it: a worker is missing.
                    Style::new().fg(Color::Yellow)
                } else {
                    Style::new()
                };
                Row::new(vec![
                    q.name.clone(),
                    q.messages.to_string(),
                    q.consumers.to_string(),
                ])
                .style(style)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    Table::new(
        rows,
        [
            Constraint::Length(28),
            Constraint::Length(10),
            Constraint::Length(10),
        ],
    )
    .header(header(vec!["queue", "ready", "consumers"]))
    .block(panel("queues"))
}

fn circuit_style(state: Circuit) -> Style {
    match state {
        Circuit::Closed => Style::new().fg(Color::Green),
        Circuit::Open => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Circuit::HalfOpen => Style::new().fg(Color::Yellow),
        Circuit::Unknown => Style::new().fg(Color::DarkGray),
    }
}

/// Dead letters, the circuit of every payment process, open timers, live processes.
pub fn health_panel(snapshot: &Snapshot) -> Paragraph<'static> {
    let dead = match snapshot.dead_letters() {
        Some(0) => Span::styled("0", Style::new().fg(Color::Green)),
        Some(n) => Span::styled(
            format!("{n}  (orderflow dlq list)"),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        None => Span::raw("unknown"),
    };
    let mut lines = vec![
        Line::from(vec![Span::raw("dead letters    "), dead]),
        Line::from(format!(
            "live processes  {}",
            snapshot.live_processes().count()
        )),
    ];
    lines.push(match snapshot.circuit() {
        None => Line::from("payment circuit no payment process serves /metrics"),
        Some(worst) => Line::from(vec![
            Span::raw("payment circuit "),
            Span::styled(worst.label(), circuit_style(worst)),
        ]),
    });
    lines.extend(snapshot.breakers.iter().map(|b| {
        Line::from(vec![
            Span::raw(format!("  {:<22} ", b.process)),
            Span::styled(b.state.label(), circuit_style(b.state)),
        ])
    }));
    Paragraph::new(lines).block(panel("health"))
}

pub fn processes_table(snapshot: &Snapshot) -> Table<'static> {
    let rows = snapshot.processes.iter().map(|p| {
        let style = if p.gone {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        };
        Row::new(vec![
            if p.gone { "gone" } else { "live" }.to_owned(),
            p.host.clone(),
            p.pid.to_string(),
            format!("{:.1}s", p.silent_seconds),
            p.http_addr.clone().unwrap_or_else(|| "-".to_owned()),
            workers(&p.workers),
        ])
        .style(style)
    });
    Table::new(
        rows,
        [
            Constraint::Length(5),
            Constraint::Length(16),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(22),
            Constraint::Fill(1),
        ],
    )
    .header(header(vec![
        "state", "host", "pid", "silent", "http", "workers",
    ]))
    .block(panel("processes (orderflow workers)"))
}

/// A process's workers, or "all workers" (the common case, and the list is long).
fn workers(names: &[String]) -> String {
    let all = services::runtime::ALL_WORKERS;
    if names.len() == all.len() && all.iter().all(|w| names.iter().any(|n| n == w)) {
        return "all workers".to_owned();
    }
    names.join(",")
}

/// The dashboard drawn into a buffer of its full height, as plain text (no colours),
/// trailing spaces trimmed.
pub fn to_text(dashboard: &Dashboard<'_>, width: u16) -> String {
    let area = Rect::new(0, 0, width, dashboard.height());
    let mut buf = Buffer::empty(area);
    dashboard.render(area, &mut buf);
    buffer_text(&buf)
}

/// The symbols of a buffer, one line per row.
pub fn buffer_text(buf: &Buffer) -> String {
    let width = usize::from(buf.area.width.max(1));
    buf.content()
        .chunks(width)
        .map(|row| {
            let line: String = row.iter().map(|cell| cell.symbol()).collect();
            line.trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
