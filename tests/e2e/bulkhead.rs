//! Bulkheads: payments whose gateway call hangs hold their own handlers, not the
//! payment worker; another order's payment goes through meanwhile.

use std::time::Duration;

use uuid::Uuid;

use crate::harness::{order, payment_stream, System};

/// Hung payments stay `pending` for the whole test: their payment timer is far away.
const PAYMENT_TIMEOUT: &str = "30s";
const HUNG: usize = 6;

#[tokio::test(flavor = "multi_thread")]
async fn hung_payments_do_not_starve_other_orders() -> anyhow::Result<()> {
    let system = System::start(&[("ORDERFLOW_PAYMENT_TIMEOUT", PAYMENT_TIMEOUT)]).await?;
    system.set_stock("GADGET", 100).await?;

    let hung = system
        .place_orders(HUNG, &[("GADGET", 1, 1000)], "tok_timeout")
        .await?;
    // Each has asked for its payment: its first call timed out, so its request is
    // recorded, and its handler is waiting on the gateway again.
    for id in &hung {
        system
            .wait_event(&payment_stream(*id), "PaymentRequested", 1)
            .await?;
    }

    let ok = Uuid::new_v4();
    system
        .place(order(ok, &[("GADGET", 1, 1000)], "tok_ok", None))
        .await?;
    let reason = system
        .wait_status(ok, "completed", Duration::from_secs(20))
        .await?;
    assert_eq!(reason, None);
    assert_eq!(
        system.count(&payment_stream(ok), "PaymentCaptured").await?,
        1
    );

    for id in &hung {
        let status = system.status(*id).await?;
        assert_eq!(
            status,
            Some(("pending".to_owned(), None)),
            "order {id} should still wait for its payment; {}",
            system.log_hint()
        );
        let payments = system.event_types(&payment_stream(*id)).await?;
        assert_eq!(payments, ["PaymentRequested"], "order {id}");
    }
    Ok(())
}
