use std::time::Duration;

use services::gateway::{
    CaptureOutcome, CaptureRequest, GatewayError, PaymentGateway, RefundRequest, Simulator,
};
use testkit::TestDb;

use crate::support::ledger;

fn simulator(db: &TestDb) -> Simulator {
    Simulator::new(db.pool().clone(), Duration::ZERO, 0.0)
}

fn capture(key: &str, token: &str) -> CaptureRequest {
    CaptureRequest {
        idempotency_key: key.to_owned(),
        token: token.to_owned(),
        amount_cents: 1_234,
        currency: "EUR".to_owned(),
    }
}

fn refund(key: &str) -> RefundRequest {
    RefundRequest {
        idempotency_key: key.to_owned(),
        capture_key: "capture-1".to_owned(),
        amount_cents: 1_234,
    }
}

#[tokio::test]
async fn a_capture_repeated_with_its_key_returns_the_first_result_and_moves_money_once(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let gateway = simulator(&db);
    let first = gateway.capture(capture("capture-1", "tok_ok")).await?;
    let CaptureOutcome::Captured { reference } = &first else {
        anyhow::bail!("tok_ok not captured: {first:?}");
    };
    assert!(!reference.is_empty());
    // a second process (a restarted worker) asks again with the same key
    let again = simulator(&db)
        .capture(capture("capture-1", "tok_ok"))
        .await?;
    assert_eq!(again, first);
    assert_eq!(
        ledger(&db.store, "capture-1").await?,
        vec![("capture".to_owned(), "captured".to_owned(), 1_234)]
    );

    let other = gateway.capture(capture("capture-2", "tok_ok")).await?;
    assert_ne!(other, first, "another key is another payment");
    Ok(())
}

#[tokio::test]
async fn the_simulator_beside_the_shop_commits_its_ledger_without_waiting_for_the_flush_and_stays_idempotent(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let gateway = Simulator::beside(db.pool(), Duration::ZERO, 0.0);
    let mode = |pool: &sqlx::PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
                .fetch_one(&pool)
                .await
        }
    };
    assert_eq!(mode(gateway.ledger()).await?, "off");
    assert_eq!(
        mode(db.pool()).await?,
        "on",
        "the shop's own pool is untouched"
    );

    let first = gateway.capture(capture("capture-1", "tok_ok")).await?;
    let again = Simulator::beside(db.pool(), Duration::ZERO, 0.0)
        .capture(capture("capture-1", "tok_ok"))
        .await?;
    assert_eq!(again, first);
    assert_eq!(
        ledger(&db.store, "capture-1").await?,
        vec![("capture".to_owned(), "captured".to_owned(), 1_234)],
        "the row is in the shop's database, seen through its own pool"
    );
    Ok(())
}

#[tokio::test]
async fn declined_tokens_are_declined_and_move_no_money() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let gateway = simulator(&db);
    for (key, token) in [("k-decline", "tok_decline"), ("k-other", "tok_whatever")] {
        let outcome = gateway.capture(capture(key, token)).await?;
        assert!(
            matches!(outcome, CaptureOutcome::Declined { .. }),
            "{token}: {outcome:?}"
        );
        assert_eq!(gateway.capture(capture(key, token)).await?, outcome);
        assert_eq!(
            ledger(&db.store, key).await?,
            vec![("capture".to_owned(), "declined".to_owned(), 0)]
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_flaky_token_fails_twice_then_captures() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let gateway = simulator(&db);
    for attempt in 1..=2 {
        match gateway.capture(capture("flaky", "tok_flaky")).await {
            Err(GatewayError::Transient(_)) => {}
            other => anyhow::bail!("attempt {attempt}: {other:?}"),
        }
        assert!(ledger(&db.store, "flaky").await?.is_empty());
    }
    let third = gateway.capture(capture("flaky", "tok_flaky")).await?;
    assert!(
        matches!(third, CaptureOutcome::Captured { .. }),
        "{third:?}"
    );
    assert_eq!(gateway.capture(capture("flaky", "tok_flaky")).await?, third);
    assert_eq!(ledger(&db.store, "flaky").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_timeout_token_never_answers() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let gateway = simulator(&db);
    let call = tokio::time::timeout(
        Duration::from_millis(300),
        gateway.capture(capture("hang", "tok_timeout")),
    )
    .await;
    assert!(call.is_err(), "answered: {call:?}");
    assert!(ledger(&db.store, "hang").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_refund_repeated_with_its_key_moves_money_back_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let gateway = simulator(&db);
    gateway.capture(capture("capture-1", "tok_ok")).await?;
    let first = gateway.refund(refund("refund-1")).await?;
    let again = simulator(&db).refund(refund("refund-1")).await?;
    assert_eq!(again, first);
    assert_eq!(
        ledger(&db.store, "refund-1").await?,
        vec![("refund".to_owned(), "refunded".to_owned(), -1_234)]
    );
    let net: i64 = sqlx::query_scalar("SELECT sum(amount_cents)::bigint FROM gateway_ledger")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(net, 0);
    Ok(())
}

#[tokio::test]
async fn a_failure_rate_of_one_always_fails_transiently() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let gateway = Simulator::new(db.pool().clone(), Duration::ZERO, 1.0);
    for i in 0..20 {
        let key = format!("k-{i}");
        assert!(matches!(
            gateway.capture(capture(&key, "tok_ok")).await,
            Err(GatewayError::Transient(_))
        ));
        assert!(matches!(
            gateway.refund(refund(&key)).await,
            Err(GatewayError::Transient(_))
        ));
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM gateway_ledger")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(rows, 0, "nothing was recorded");
    Ok(())
}
