//! Running it (issue 7): `/metrics` moves when orders flow, `orderflow workers` lists
//! the running process and marks a killed one gone, and `--wait` returns once the read
//! model shows the command's effect (read-your-writes).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use uuid::Uuid;

use crate::harness::{order, System, DEADLINE};
use testkit::http::{sample, scrape};

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn metrics_move_when_orders_flow() -> anyhow::Result<()> {
    let addr = free_addr()?;
    let sys = System::start(&[("ORDERFLOW_HTTP_ADDR", &addr.to_string())]).await?;
    sys.set_stock("MET-1", 10).await?;
    let id = Uuid::new_v4();
    sys.place(order(id, &[("MET-1", 2, 500)], "tok_ok", None))
        .await?;
    sys.wait_status(id, "completed", DEADLINE).await?;

    let wanted = [
        "orderflow_messages_handled_total{worker=\"router\"}",
        "orderflow_messages_handled_total{worker=\"commands\"}",
        "orderflow_messages_handled_total{worker=\"order\"}",
        "orderflow_messages_handled_total{worker=\"inventory\"}",
        "orderflow_messages_handled_total{worker=\"payment\"}",
        "orderflow_handler_duration_seconds_count{worker=\"payment\"}",
        "orderflow_events_appended_total",
        "orderflow_events_projected_total{projection=\"order_status\"}",
        // The services of this process take the relay's events in process; the
        // broker sees only the commands (nothing outside is bound to the events).
        "orderflow_messages_handed_over_total{queue=\"orderflow.inventory\"}",
        "orderflow_relay_delay_seconds_count",
        "orderflow_relay_read_delay_seconds_count",
        "orderflow_log_head_position",
        "orderflow_orders{status=\"completed\"}",
    ];
    let text = testkit::wait_until("the counters to move", DEADLINE, || async {
        let text = scrape(addr).await?;
        Ok(wanted
            .iter()
            .all(|series| sample(&text, series).is_some_and(|v| v > 0.0))
            .then_some(text))
    })
    .await
    .with_context(|| sys.log_hint())?;

    // caught up, and nothing failed on the way
    for series in [
        "orderflow_messages_dead_lettered_total{worker=\"commands\"}",
        "orderflow_circuit_breaker_state{breaker=\"payment_gateway\"}",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
    }
    let text = testkit::wait_until("the followers to report no lag", DEADLINE, || async {
        let text = scrape(addr).await?;
        Ok([
            "orderflow_follower_lag_events{follower=\"projection:order_status\"}",
            "orderflow_follower_lag_events{follower=\"relay.v2\"}",
            "orderflow_follower_lag_seconds{follower=\"relay.v2\"}",
        ]
        .iter()
        .all(|series| sample(&text, series) == Some(0.0))
        .then_some(text))
    })
    .await?;
    assert!(
        sample(&text, "orderflow_open_timers").is_some(),
        "no open timers gauge in\n{text}"
    );
    assert_eq!(sample(&text, "orderflow_live_processes"), Some(1.0));
    Ok(())
}

#[tokio::test]
async fn workers_lists_the_running_process_and_marks_a_killed_one_gone() -> anyhow::Result<()> {
    let mut sys = System::start(&[("ORDERFLOW_HEARTBEAT_INTERVAL", "200ms")]).await?;
    let out = sys.cli(&["workers"]).await?;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(1 live, 0 gone"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("live"))
        .context("no live row")?;
    for worker in ["projector", "relay", "timers", "commands", "notification"] {
        assert!(row.contains(worker), "{row}");
    }

    sys.kill_worker().await?;
    let text = testkit::wait_until("the killed process to be gone", DEADLINE, || async {
        let text = stdout(&sys.cli(&["workers"]).await?);
        Ok(text.contains("(0 live, 1 gone").then_some(text))
    })
    .await?;
    assert!(text.lines().any(|l| l.starts_with("gone")), "{text}");

    // started again: a new live row beside the gone one
    sys.start_worker().await?;
    testkit::wait_until("the restarted process to be live", DEADLINE, || async {
        let text = stdout(&sys.cli(&["workers"]).await?);
        Ok(text.contains("(1 live, 1 gone").then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn place_order_wait_prints_the_status_the_read_model_already_shows() -> anyhow::Result<()> {
    let sys = System::start(&[]).await?;
    sys.set_stock("WAIT-1", 10).await?;
    let id = Uuid::new_v4().to_string();
    let out = sys
        .cli(&[
            "place-order",
            "--order-id",
            &id,
            "--item",
            "WAIT-1:1:500",
            "--digital",
            "--wait",
            "--timeout",
            "20s",
        ])
        .await?;
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&id.as_str()), "{text}");
    let status_line = lines.get(1).context("no status line")?;
    let printed = status_line
        .strip_prefix(&format!("{id} "))
        .with_context(|| format!("not a status line: {status_line}"))?;
    // read-your-writes: the row is there as soon as the command returns
    let (now, _) = sys.status(id.parse()?).await?.context("no order row")?;
    assert!(
        ["pending", "confirmed", "completed"].contains(&printed),
        "{printed}"
    );
    assert!(
        now == printed || now == "confirmed" || now == "completed",
        "{now} after {printed}"
    );

    // --wait-final: until the order settles
    let id = Uuid::new_v4().to_string();
    let out = sys
        .cli(&[
            "place-order",
            "--order-id",
            &id,
            "--item",
            "WAIT-1:1:500",
            "--digital",
            "--wait-final",
        ])
        .await?;
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("{id} completed")),
        "{}",
        stdout(&out)
    );

    // a review: waits in under_review; approving with --wait-final ends completed
    let id = Uuid::new_v4().to_string();
    let out = sys
        .cli(&[
            "place-order",
            "--order-id",
            &id,
            "--item",
            "WAIT-1:1:150000",
            "--digital",
            "--wait-final",
        ])
        .await?;
    assert!(
        stdout(&out).contains(&format!("{id} under_review")),
        "{}",
        stdout(&out)
    );
    let out = sys.cli(&["approve", &id, "--wait-final"]).await?;
    assert!(
        stdout(&out).contains(&format!("{id} completed")),
        "{}",
        stdout(&out)
    );
    Ok(())
}

#[tokio::test]
async fn wait_gives_up_at_its_deadline_naming_what_it_waited_for() -> anyhow::Result<()> {
    let mut sys = System::start(&[]).await?;
    sys.kill_worker().await?;
    let id = Uuid::new_v4().to_string();
    let started = std::time::Instant::now();
    let out = sys
        .cli(&["cancel", &id, "--wait", "--timeout", "500ms"])
        .await?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no event caused by command"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    Ok(())
}
