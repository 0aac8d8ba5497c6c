//! `orderflow top`: a live terminal dashboard of the whole system (orders per status,
//! throughput, the log followers' lag, queue depths, dead letters, the payment
//! circuit, the running processes), refreshed every `--interval`; `--once` prints one
//! frame as plain text, for scripts, CI and output that is not a terminal.
//!
//! `snapshot` gathers the figures, `history` turns successive snapshots into rates,
//! `render` draws them (a pure function of both), and this module runs the loop.
mod history;
mod render;
mod scrape;
mod snapshot;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::style::{Color, Style};
use ratatui::widgets::{Paragraph, Wrap};
use ratatui::{DefaultTerminal, Frame};
use services::settings::Settings;
use tokio::sync::mpsc;

use history::History;
use render::Dashboard;
use snapshot::{Snapshot, Sources};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Print one frame as plain text and exit (no terminal needed).
    #[arg(long)]
    pub once: bool,
    /// How often the dashboard refreshes.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
}

/// At least 100 ms: each refresh runs a handful of queries and passive declares.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if interval < Duration::from_millis(100) {
        return Err(format!("{text} is below the shortest interval, 100ms"));
    }
    Ok(interval)
}

const HINT: &str = "q, Esc or Ctrl-C quits";

pub async fn top(settings: &Settings, args: TopArgs) -> anyhow::Result<ExitCode> {
    if !args.once && !std::io::stdout().is_terminal() {
        anyhow::bail!("orderflow top needs a terminal; use --once to print one frame");
    }
    let store = crate::store(settings).await?;
    let mut sources = Sources::open(store, &settings.amqp_url).await;
    if args.once {
        return once(&mut sources).await;
    }
    live(sources, args.interval).await
}

async fn once(sources: &mut Sources) -> anyhow::Result<ExitCode> {
    let snapshot = sources.snapshot().await?;
    let mut history = History::new();
    history.record(&snapshot);
    let dashboard = Dashboard {
        snapshot: &snapshot,
        history: &history,
        hint: None,
    };
    print!("{}", render::to_text(&dashboard, render::TEXT_WIDTH));
    Ok(ExitCode::SUCCESS)
}

/// Restores the terminal however `live` ends: return, error or panic (ratatui's
/// `try_init` installs a panic hook that restores it too).
struct TerminalGuard(DefaultTerminal);

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// What the keyboard asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Quit,
    Redraw,
}

fn input_of(event: &Event) -> Option<Input> {
    match event {
        Event::Key(KeyEvent {
            code,
            modifiers,
            kind: KeyEventKind::Press,
            ..
        }) => match code {
            KeyCode::Char('q') | KeyCode::Esc => Some(Input::Quit),
            // Raw mode turns Ctrl-C into a key instead of a signal.
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => Some(Input::Quit),
            _ => None,
        },
        Event::Resize(..) => Some(Input::Redraw),
        _ => None,
    }
}

/// Reads the keyboard on a thread of its own (crossterm's reads block) until the
/// receiver is gone.
fn keyboard() -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        while !tx.is_closed() {
            match event::poll(Duration::from_millis(200)) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(_) => break,
            }
            let Ok(event) = event::read() else { break };
            if let Some(input) = input_of(&event) {
                if tx.blocking_send(input).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// How long one refresh may take before the frame says the sources do not answer.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

async fn live(mut sources: Sources, interval: Duration) -> anyhow::Result<ExitCode> {
    let mut terminal = TerminalGuard(ratatui::try_init()?);
    let mut keys = keyboard();
    let mut history = History::new();
    let mut last: Option<Snapshot> = None;
    let mut error: Option<String> = None;
    loop {
        let next = tokio::time::Instant::now() + interval;
        let refresh = tokio::time::timeout(SNAPSHOT_TIMEOUT, sources.snapshot());
        let redraw = || {
            terminal
                .0
                .draw(|frame| draw(frame, last.as_ref(), &history, error.as_deref()))
                .map(drop)
        };
        let Some(refreshed) = or_quit(refresh, &mut keys, redraw).await? else {
            return Ok(ExitCode::SUCCESS);
        };
        // A failed refresh keeps the last good frame on screen, with the reason.
        error = match refreshed {
            Ok(Ok(snapshot)) => {
                history.record(&snapshot);
                last = Some(snapshot);
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("no answer within {SNAPSHOT_TIMEOUT:?}")),
        };
        let redraw = || {
            terminal
                .0
                .draw(|frame| draw(frame, last.as_ref(), &history, error.as_deref()))
                .map(drop)
        };
        let pause = tokio::time::sleep_until(next);
        if or_quit(pause, &mut keys, redraw).await?.is_none() {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Runs `work`, redrawing the frame first and whenever the terminal asks, and answering
/// the keyboard meanwhile, so that a slow database never keeps `q` from quitting.
/// `None` when the user quit first.
async fn or_quit<T>(
    work: impl std::future::Future<Output = T>,
    keys: &mut mpsc::Receiver<Input>,
    mut redraw: impl FnMut() -> std::io::Result<()>,
) -> anyhow::Result<Option<T>> {
    tokio::pin!(work);
    loop {
        redraw()?;
        tokio::select! {
            value = &mut work => return Ok(Some(value)),
            _ = tokio::signal::ctrl_c() => return Ok(None),
            input = keys.recv() => match input {
                Some(Input::Redraw) => {}
                Some(Input::Quit) | None => return Ok(None),
            },
        }
    }
}

fn draw(frame: &mut Frame, snapshot: Option<&Snapshot>, history: &History, error: Option<&str>) {
    let area = frame.area();
    let Some(snapshot) = snapshot else {
        let text = error.unwrap_or("reading the first snapshot…");
        frame.render_widget(
            Paragraph::new(format!("orderflow top\n\n{text}\n\n{HINT}"))
                .style(Style::new().fg(Color::Red))
                .wrap(Wrap { trim: false }),
            area,
        );
        return;
    };
    let hint = match error {
        Some(why) => format!("refresh failed, showing the last snapshot: {why}  ({HINT})"),
        None => HINT.to_owned(),
    };
    let dashboard = Dashboard {
        snapshot,
        history,
        hint: Some(&hint),
    };
    frame.render_widget(&dashboard, area);
}

#[cfg(test)]
mod tests;
