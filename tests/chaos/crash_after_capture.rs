//! The payment worker dies between the gateway's capture and the append of
//! `PaymentCaptured` (the failpoint `ORDERFLOW_FAULT_CRASH_AFTER_CAPTURE`); restarted, it
//! captures again with the same idempotency key: one capture, one event.

use std::os::unix::process::ExitStatusExt;

use services::payment::FAULT_CRASH_AFTER_CAPTURE;
use uuid::Uuid;

use crate::fleet::{separate, Fleet, WORKERS};
use crate::harness::{order, payment_stream, System, DEADLINE};
use crate::{worker_env, SERIAL};

/// `(rows, captured rows, net amount)` of the gateway ledger for the order's keys.
async fn ledger(system: &System, order_id: Uuid) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE kind = 'capture' AND outcome = 'captured'),
                coalesce(sum(amount_cents), 0)::bigint
         FROM gateway_ledger WHERE idempotency_key IN ($1, $2)",
    )
    .bind(format!("capture-{order_id}"))
    .bind(format!("refund-{order_id}"))
    .fetch_one(system.pool())
    .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_worker_killed_between_capture_and_event_captures_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut system = System::start(&[]).await?;
    system.set_stock("LAMP", 3).await?;
    // From here on each worker is a process of its own; only payment has the failpoint.
    system.kill_worker().await?;
    let mut fleet = Fleet::new(
        worker_env(&system, &[]),
        &format!("{}-crash", system.db.name),
        separate(),
    )?;
    for worker in WORKERS.into_iter().filter(|w| *w != "payment") {
        fleet.spawn(worker, &[])?;
    }
    fleet.spawn("payment", &[(FAULT_CRASH_AFTER_CAPTURE, "1")])?;

    let id = Uuid::new_v4();
    system
        .place(order(id, &[("LAMP", 2, 2_500)], "tok_ok", Some("standard")))
        .await?;

    let status = fleet.wait_exit("payment", DEADLINE).await?;
    assert_eq!(
        status.signal(),
        Some(6),
        "the payment worker should have aborted (SIGABRT), it ended {status}; {}",
        fleet.log_tail("payment", 20)
    );
    // The crash window was hit: the gateway holds the capture, the log does not.
    assert_eq!(ledger(&system, id).await?, (1, 1, 5_000));
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        0
    );
    system.wait_status(id, "pending", DEADLINE).await?;

    fleet.spawn("payment", &[])?;
    assert_eq!(system.wait_status(id, "delivered", DEADLINE).await?, None);
    assert_eq!(ledger(&system, id).await?, (1, 1, 5_000));
    assert_eq!(
        system.count(&payment_stream(id), "PaymentCaptured").await?,
        1
    );
    system.wait_stock("LAMP", (1, 0)).await?;
    assert!(fleet.unexpected_exits.is_empty());
    system.audit().await
}
