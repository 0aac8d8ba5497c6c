//! Failures after something was done are compensated (contract section 3).

use serde_json::Value;
use uuid::Uuid;

use crate::harness::{order, order_stream, payment_stream, System, DEADLINE};

/// Captured minus refunded, from the payment stream.
pub fn net_captured(payments: &[(String, Value)]) -> i64 {
    payments
        .iter()
        .map(|(event_type, payload)| {
            let amount = payload["amount_cents"].as_i64().unwrap_or_default();
            match event_type.as_str() {
                "PaymentCaptured" => amount,
                "PaymentRefunded" => -amount,
                _ => 0,
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declined_payment_cancels_and_releases_reserved_stock() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("BOOK", 5).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("BOOK", 2, 1999)],
            "tok_decline",
            Some("standard"),
        ))
        .await?;

    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("payment_declined"));
    system.wait_stock("BOOK", (5, 0)).await?;
    let payments = system.events(&payment_stream(id)).await?;
    assert_eq!(net_captured(&payments), 0, "{payments:?}");
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_stock_cancels_and_refunds_or_voids_the_payment() -> anyhow::Result<()> {
    let system = System::start(&[]).await?;
    system.set_stock("RARE", 1).await?;
    system.set_stock("COMMON", 10).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("COMMON", 1, 300), ("RARE", 2, 10_000)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;

    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("out_of_stock"));
    // The payment ends settled: a capture is refunded, a request in flight voided. (A
    // void is recorded before the refund of a capture it finds, so wait for both.)
    let payments =
        testkit::wait_until("the payment to be refunded or voided", DEADLINE, || async {
            let payments = system.events(&payment_stream(id)).await?;
            let settled = payments
                .iter()
                .any(|(t, _)| t == "PaymentRefunded" || t == "PaymentVoided")
                && net_captured(&payments) == 0;
            Ok(settled.then_some(payments))
        })
        .await?;
    assert_eq!(net_captured(&payments), 0, "{payments:?}");
    let captures = payments
        .iter()
        .filter(|(t, _)| t == "PaymentCaptured")
        .count();
    let refunds = payments
        .iter()
        .filter(|(t, _)| t == "PaymentRefunded")
        .count();
    assert!(captures <= 1 && refunds == captures, "{payments:?}");
    system.wait_stock("COMMON", (10, 0)).await?;
    system.wait_stock("RARE", (1, 0)).await?;
    system.audit().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_payment_times_out_and_releases_stock() -> anyhow::Result<()> {
    let system = System::start(&[("ORDERFLOW_PAYMENT_TIMEOUT", "1s")]).await?;
    system.set_stock("CLOCK", 4).await?;
    let id = Uuid::new_v4();
    system
        .place(order(
            id,
            &[("CLOCK", 3, 2500)],
            "tok_timeout",
            Some("standard"),
        ))
        .await?;

    let reason = system.wait_status(id, "cancelled", DEADLINE).await?;
    assert_eq!(reason.as_deref(), Some("payment_timeout"));
    system.wait_stock("CLOCK", (4, 0)).await?;
    assert_eq!(system.count(&order_stream(id), "OrderConfirmed").await?, 0);
    let payments = system.events(&payment_stream(id)).await?;
    assert_eq!(net_captured(&payments), 0, "{payments:?}");
    system.audit().await
}
