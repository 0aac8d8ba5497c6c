//! Safe upgrades (issue 7 item 5), on a log written by the running system:
//! `orderflow check` accepts what real orders leave behind and flags an event no
//! decoder knows; `orderflow replay --verify` finds a corrupted read-model row, leaves
//! it without `--swap` and repairs it with `--swap`.

use std::process::Output;
use std::time::Duration;

use eventstore::{ExpectedVersion, Metadata, NewEvent};
use serde_json::json;
use uuid::Uuid;

use crate::harness::{order, System, DEADLINE, TERMINAL};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shown(out: &Output) -> String {
    format!(
        "exit {}\n{}{}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An order's lines `(sku, quantity, unit_price_cents)`, token and shipping method.
type Road<'a> = (&'a [(&'a str, i64, i64)], &'a str, Option<&'a str>);

/// Orders down every road: delivered, completed, declined, out of stock, reviewed and
/// approved, cancelled in review, invalid; plus a refused stock.set. Returns the
/// delivered order's id.
async fn real_orders(sys: &System) -> anyhow::Result<Uuid> {
    sys.set_stock("UPG-A", 10).await?;
    sys.set_stock("UPG-B", 1).await?;
    sys.send("stock.set", json!({"sku": "UPG-A", "quantity": -1}))
        .await?;
    let delivered = Uuid::new_v4();
    let mut waits = vec![delivered];
    sys.place(order(
        delivered,
        &[("UPG-A", 2, 500)],
        "tok_ok",
        Some("standard"),
    ))
    .await?;
    let roads: [Road; 4] = [
        (&[("UPG-A", 1, 300)], "tok_ok", None), // completed
        (&[("UPG-A", 1, 300)], "tok_decline", Some("express")), // declined
        (&[("UPG-A", 1, 300), ("UPG-B", 5, 10)], "tok_ok", None), // out of stock
        (&[("UPG-A", 0, 300)], "tok_ok", None), // invalid
    ];
    for (lines, token, shipping) in roads {
        let id = Uuid::new_v4();
        sys.place(order(id, lines, token, shipping)).await?;
        waits.push(id);
    }
    let approved = Uuid::new_v4();
    let withdrawn = Uuid::new_v4();
    for id in [approved, withdrawn] {
        sys.place(order(
            id,
            &[("UPG-A", 1, 200_000)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;
        sys.wait_status(id, "under_review", DEADLINE).await?;
    }
    sys.send(
        "order.approve",
        json!({"order_id": approved, "reviewer": "ops"}),
    )
    .await?;
    sys.send(
        "order.cancel",
        json!({"order_id": withdrawn, "reason": "changed my mind"}),
    )
    .await?;
    waits.extend([approved, withdrawn]);
    for id in waits {
        testkit::wait_until(&format!("order {id} to end"), DEADLINE, || async {
            Ok(sys
                .status(id)
                .await?
                .filter(|(status, _)| TERMINAL.contains(&status.as_str())))
        })
        .await?;
    }
    sys.wait_commands_handled().await?;
    Ok(delivered)
}

/// `orderflow replay --verify` until it reports no difference: the read models are
/// eventually consistent, and the last orders' final events may still be projected.
async fn wait_verified(sys: &System) -> anyhow::Result<Output> {
    let found = testkit::wait_until(
        "replay --verify to find no difference",
        Duration::from_secs(10),
        || async {
            let out = sys.cli(&["replay", "--verify"]).await?;
            Ok(out.status.success().then_some(out))
        },
    )
    .await;
    match found {
        Ok(out) => Ok(out),
        Err(error) => {
            let last = sys.cli(&["replay", "--verify"]).await?;
            Err(error.context(shown(&last)))
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_and_verify_accept_what_real_orders_leave_and_find_what_does_not_fit(
) -> anyhow::Result<()> {
    let sys = System::start(&[("ORDERFLOW_REVIEW_THRESHOLD_CENTS", "100000")]).await?;
    let delivered = real_orders(&sys).await?;

    let check = sys.cli(&["check"]).await?;
    assert!(check.status.success(), "{}", shown(&check));
    assert!(stdout(&check).contains("check ok"), "{}", shown(&check));
    for event_type in [
        "OrderPlaced",
        "PaymentDeclined",
        "OrderLineOutOfStock",
        "OrderApproved",
        "ShipmentDelivered",
        "StockSetRefused",
    ] {
        assert!(
            stdout(&check).contains(event_type),
            "{event_type} missing:\n{}",
            shown(&check)
        );
    }
    let verified = wait_verified(&sys).await?;
    assert!(
        stdout(&verified).contains("equal the rebuilt ones"),
        "{}",
        shown(&verified)
    );

    sqlx::query("UPDATE order_status SET status = 'shipped' WHERE order_id = $1")
        .bind(delivered)
        .execute(sys.pool())
        .await?;
    let found = sys.cli(&["replay", "--verify"]).await?;
    assert!(!found.status.success(), "{}", shown(&found));
    let line =
        format!("order_status order_id={delivered}: status: live 'shipped', rebuilt 'delivered'");
    assert!(stdout(&found).contains(&line), "{}", shown(&found));
    assert_eq!(
        sys.status(delivered).await?.map(|s| s.0),
        Some("shipped".into()),
        "left as it was"
    );

    let swapped = sys
        .cli(&[
            "replay",
            "--verify",
            "--swap",
            "--projection",
            "order_status",
        ])
        .await?;
    assert!(swapped.status.success(), "{}", shown(&swapped));
    assert!(
        stdout(&swapped).contains("(swapped)"),
        "{}",
        shown(&swapped)
    );
    assert_eq!(
        sys.status(delivered).await?.map(|s| s.0),
        Some("delivered".into())
    );
    wait_verified(&sys).await?;

    // An event this build has no decoder for: a type from the future.
    sys.db
        .store
        .append(
            &format!("order-{delivered}"),
            ExpectedVersion::Any,
            vec![NewEvent {
                event_id: Uuid::new_v4(),
                event_type: "OrderGiftWrapped".into(),
                schema_version: 1,
                payload: json!({"order_id": delivered}),
                metadata: Metadata {
                    correlation_id: Uuid::new_v4(),
                    causation_id: Uuid::new_v4(),
                },
            }],
        )
        .await?;
    let flagged = sys.cli(&["check"]).await?;
    assert!(!flagged.status.success(), "{}", shown(&flagged));
    assert!(
        stdout(&flagged).lines().any(|l| l.starts_with("FAIL")
            && l.contains("OrderGiftWrapped")
            && l.contains("unknown event type")),
        "{}",
        shown(&flagged)
    );
    Ok(())
}
