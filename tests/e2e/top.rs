//! `orderflow top --once` (issue 7): one frame as plain text, read from the running
//! system: its figures move when orders flow, a queue nobody consumes shows its
//! messages, a dead-lettered command shows in the dead-letter count, and the payment
//! circuit is read from the payment process's `/metrics`.

use std::time::Duration;

use anyhow::Context;
use uuid::Uuid;

use crate::harness::{order, System, DEADLINE};

/// One frame of `orderflow top --once`; fails unless it exits 0.
async fn top_once(sys: &System) -> anyhow::Result<String> {
    let out = sys.cli(&["top", "--once"]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "top --once failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// Waits until a frame of `top --once` satisfies `shown`, and returns it. A run that
/// fails counts as "not yet" (the PostgreSQL server is shared, and may refuse a
/// connection for a moment); at the deadline the error names the last failure or frame.
async fn wait_frame(
    sys: &System,
    what: &str,
    deadline: Duration,
    shown: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let last = std::sync::Mutex::new(String::new());
    let found = testkit::wait_until(what, deadline, || async {
        let frame = top_once(sys).await;
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        match frame {
            Ok(text) if shown(&text) => Ok(Some(text)),
            Ok(text) => {
                *last = text;
                Ok(None)
            }
            Err(error) => {
                *last = format!("{error:#}");
                Ok(None)
            }
        }
    })
    .await;
    found.map_err(|error| {
        let last = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        error.context(format!(
            "last frame or failure:\n{last}\n{}",
            sys.log_hint()
        ))
    })
}

/// The words of the frame's line whose first word (after the border) is `label`,
/// without the borders: `["completed", "2"]`.
fn row(text: &str, label: &str) -> Vec<String> {
    text.lines()
        .flat_map(|line| line.split('│'))
        .map(|cell| {
            cell.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|words| words.first().map(String::as_str) == Some(label))
        .unwrap_or_default()
}

/// The number right after `label` in its row.
fn figure(text: &str, label: &str) -> Option<i64> {
    row(text, label).get(1)?.parse().ok()
}

fn free_addr() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

#[tokio::test]
async fn top_once_shows_orders_flowing_and_a_dead_letter() -> anyhow::Result<()> {
    let addr = free_addr()?;
    let sys = System::start(&[("ORDERFLOW_HTTP_ADDR", &addr)]).await?;
    // the live view needs a terminal, and says what to use instead
    let out = sys.cli(&["top"]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("use --once"),
        "{stderr}"
    );

    let before = wait_frame(&sys, "a first frame", DEADLINE, |_| true).await?;
    assert_eq!(figure(&before, "completed"), Some(0), "{before}");
    assert_eq!(
        figure(&before, "orderflow.dead-letter"),
        Some(0),
        "{before}"
    );
    assert!(row(&before, "dead").contains(&"0".to_owned()), "{before}");

    sys.set_stock("TOP-1", 10).await?;
    let ids = sys.place_orders(2, &[("TOP-1", 1, 500)], "tok_ok").await?;
    sys.publish_raw("order.place", b"not json", Uuid::new_v4())
        .await?;
    for id in &ids {
        sys.wait_status(*id, "completed", DEADLINE).await?;
    }

    let text = wait_frame(
        &sys,
        "top to show the orders and the dead letter",
        DEADLINE,
        |text| {
            figure(text, "completed") == Some(2) && figure(text, "orderflow.dead-letter") == Some(1)
        },
    )
    .await?;
    assert!(row(&text, "dead").contains(&"1".to_owned()), "{text}");
    assert!(text.contains("placed in the last minute: 2"), "{text}");
    let head = text
        .lines()
        .find_map(|l| l.split("log head ").nth(1)?.split_whitespace().next())
        .and_then(|n| n.parse::<i64>().ok())
        .context("no log head in the title")?;
    assert!(head > 10, "log head {head} after two orders: {text}");
    // the intake (the router's queue) is consumed by the running process
    assert_eq!(
        row(&text, "orderflow.commands.router").get(2),
        Some(&"1".to_owned()),
        "{text}"
    );
    // the running process, and its payment circuit read from its /metrics
    assert!(
        text.lines()
            .any(|l| l.starts_with("│live ") && l.contains("all workers")),
        "{text}"
    );
    let circuit = text
        .lines()
        .find(|l| l.contains("payment circuit"))
        .context("no circuit line")?;
    assert!(circuit.contains("closed"), "{text}");
    assert!(row(&text, "relay").len() > 1, "no relay lag row: {text}");
    Ok(())
}

#[tokio::test]
async fn top_once_shows_messages_waiting_for_a_missing_worker() -> anyhow::Result<()> {
    // No payment, inventory or notification worker: their queues fill up.
    let sys = System::start_only(&[], &["commands", "projector", "relay"]).await?;
    sys.set_stock("TOP-2", 10).await?;
    let id = Uuid::new_v4();
    sys.place(order(id, &[("TOP-2", 1, 500)], "tok_ok", None))
        .await?;
    // the order's row and its OrderAccepted reach top by different paths
    // (projector, relay): wait for both
    let text = wait_frame(
        &sys,
        "top to show the payment queue waiting",
        DEADLINE,
        |text| figure(text, "orderflow.payment") >= Some(1) && figure(text, "pending") == Some(1),
    )
    .await?;
    assert_eq!(
        row(&text, "orderflow.payment").get(2),
        Some(&"0".to_owned()),
        "{text}"
    );
    assert!(figure(&text, "orderflow.inventory") >= Some(1), "{text}");
    // no payment process: no circuit to read
    assert!(
        text.contains("no payment process serves /metrics"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn top_once_shows_the_payment_circuit_open_when_the_gateway_keeps_failing(
) -> anyhow::Result<()> {
    let addr = free_addr()?;
    // Every gateway call fails transiently: payments retry until the breaker opens.
    let sys = System::start(&[
        ("ORDERFLOW_HTTP_ADDR", &addr),
        ("ORDERFLOW_GATEWAY_FAILURE_RATE", "1.0"),
    ])
    .await?;
    sys.set_stock("TOP-3", 100).await?;
    for _ in 0..12 {
        sys.place(order(Uuid::new_v4(), &[("TOP-3", 1, 500)], "tok_ok", None))
            .await?;
    }
    // The breaker judges a full 10 s window of calls before it opens.
    let deadline = Duration::from_secs(45);
    let text = wait_frame(&sys, "top to show the circuit open", deadline, |text| {
        text.lines().any(|l| l.contains("payment circuit OPEN"))
    })
    .await?;
    // the summary, and the payment process's own line under it
    assert_eq!(text.matches("OPEN").count(), 2, "{text}");
    Ok(())
}
