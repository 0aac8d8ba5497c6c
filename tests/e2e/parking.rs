//! Operator repair, per order (issue 7): a message whose retries run out parks its
//! order instead of going to the dead-letter queue; the order's later messages wait
//! behind it in order while other orders flow; `orderflow resume` finishes it once the
//! cause is fixed. The poison is real: a trigger in the test's database refuses every
//! append to one order's stream.

use anyhow::Context;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{order, System, DEADLINE, DEAD_LETTER_QUEUE, INTAKE_QUEUE};

/// Orders at or above 500.00 wait for review: the poisoned order's approve must come
/// after its place, or the order would never leave review.
const THRESHOLD: (&str, &str) = ("ORDERFLOW_REVIEW_THRESHOLD_CENTS", "50000");
const OTHERS: usize = 100;
const POISON_ERROR: &str = "poisoned for the test";

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes every append to `order-<order_id>` fail, as a broken database object would.
async fn poison(system: &System, order_id: Uuid) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "CREATE FUNCTION poison_order() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.stream_name = 'order-{order_id}' THEN
             RAISE EXCEPTION '{POISON_ERROR}: %', NEW.stream_name;
           END IF;
           RETURN NEW;
         END $$"
    ))
    .execute(system.pool())
    .await?;
    sqlx::query(
        "CREATE TRIGGER poison_order BEFORE INSERT ON events
         FOR EACH ROW EXECUTE FUNCTION poison_order()",
    )
    .execute(system.pool())
    .await?;
    Ok(())
}

/// The cause is fixed.
async fn cure(system: &System) -> anyhow::Result<()> {
    sqlx::query("DROP TRIGGER poison_order ON events")
        .execute(system.pool())
        .await?;
    Ok(())
}

/// `(message_id, routing_key, replayed)` of the order's parked messages, in order.
async fn parked_messages(
    system: &System,
    order_id: Uuid,
) -> anyhow::Result<Vec<(String, String, bool)>> {
    Ok(sqlx::query_as(
        "SELECT message_id, routing_key, replayed_at IS NOT NULL FROM parked_messages
          WHERE order_id = $1 ORDER BY seq",
    )
    .bind(order_id)
    .fetch_all(system.pool())
    .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_parks_its_order_while_others_complete_and_resume_finishes_it(
) -> anyhow::Result<()> {
    let system = System::start(&[THRESHOLD]).await?;
    system.set_stock("PARK-RING", 10).await?;
    system.set_stock("PARK-BOOK", 10 * OTHERS as i64).await?;
    let poisoned = Uuid::new_v4();
    poison(&system, poisoned).await?;

    let place = system
        .place(order(
            poisoned,
            &[("PARK-RING", 1, 60_000)],
            "tok_ok",
            Some("standard"),
        ))
        .await?;
    testkit::wait_until("the order to be parked", DEADLINE, || async {
        Ok((parked_messages(&system, poisoned).await?.len() == 1).then_some(()))
    })
    .await
    .with_context(|| system.log_hint())?;
    let approve = system
        .send(
            "order.approve",
            json!({"order_id": poisoned, "reviewer": "alice"}),
        )
        .await?;

    // A command that cannot be decoded still goes to the dead-letter queue, parked
    // order or not (contract section 2).
    let undecodable = system
        .send("order.cancel", json!({"order_id": poisoned}))
        .await?;
    let dead = system.take_dead_letters(1).await?;
    assert_eq!(dead[0].message_id, Some(undecodable.to_string()));
    assert!(
        dead[0].error().is_some_and(|e| e.contains("reason")),
        "{:?}",
        dead[0].error()
    );

    let others = system
        .place_orders(OTHERS, &[("PARK-BOOK", 1, 1_000)], "tok_ok")
        .await?;
    for id in &others {
        system.wait_status(*id, "completed", DEADLINE).await?;
    }

    // The approve waits behind the place, in order, instead of overtaking it.
    testkit::wait_until("the approve to wait behind the place", DEADLINE, || async {
        Ok((parked_messages(&system, poisoned).await?.len() == 2).then_some(()))
    })
    .await
    .with_context(|| system.log_hint())?;
    assert_eq!(
        parked_messages(&system, poisoned).await?,
        [
            (place.to_string(), "order.place".to_owned(), false),
            (approve.to_string(), "order.approve".to_owned(), false),
        ]
    );
    assert_eq!(system.status(poisoned).await?, None, "nothing was recorded");
    assert_eq!(system.queue_depth(DEAD_LETTER_QUEUE).await?, 0);

    let listed = stdout(&system.cli(&["parked"]).await?);
    let line = listed
        .lines()
        .find(|l| l.contains(&poisoned.to_string()))
        .with_context(|| format!("order {poisoned} not in `orderflow parked`:\n{listed}"))?;
    assert!(line.contains(INTAKE_QUEUE), "{line}");
    assert!(line.contains(POISON_ERROR), "{line}");
    assert!(
        line.split_whitespace().any(|word| word == "2"),
        "two messages waiting: {line}"
    );

    // Resumed before the cause is fixed: it fails again and stays parked, in order.
    let early = system
        .cli(&["resume", &poisoned.to_string(), "--wait"])
        .await?;
    let stderr = String::from_utf8_lossy(&early.stderr);
    assert!(!early.status.success(), "{}", stdout(&early));
    assert!(
        stderr.contains("stays parked") && stderr.contains(POISON_ERROR),
        "{stderr}"
    );
    assert_eq!(parked_messages(&system, poisoned).await?.len(), 2);

    cure(&system).await?;
    let resumed = system
        .cli(&["resume", &poisoned.to_string(), "--wait"])
        .await?;
    assert!(
        resumed.status.success(),
        "resume failed: {}{}",
        stdout(&resumed),
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        system.wait_status(poisoned, "delivered", DEADLINE).await?,
        None
    );
    assert!(parked_messages(&system, poisoned)
        .await?
        .iter()
        .all(|(_, _, replayed)| *replayed));
    assert_eq!(
        stdout(&system.cli(&["parked"]).await?).trim(),
        "no parked orders"
    );
    let again = system.cli(&["resume", &poisoned.to_string()]).await?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not parked"));
    assert_eq!(system.queue_depth(DEAD_LETTER_QUEUE).await?, 0);
    system.audit().await?;

    // The timeline shows the parked messages, their replays and the events they caused.
    let timeline = stdout(
        &system
            .cli(&["order", "timeline", &poisoned.to_string()])
            .await?,
    );
    let numbered = |needle: &str| {
        timeline
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().next())
            .map(|n| format!("#{n}"))
            .with_context(|| format!("no {needle} in the timeline:\n{timeline}"))
    };
    let parked_place = numbered(&format!("message {place} (order.place)"))?;
    for needle in [
        "parked",
        "replayed",
        "OrderPlaced",
        "OrderApproved",
        "PaymentCaptured",
        "StockReserved",
        "ShipmentDelivered",
    ] {
        assert!(timeline.contains(needle), "no {needle} in:\n{timeline}");
    }
    let placed = timeline
        .lines()
        .find(|l| l.contains("OrderPlaced on order-"))
        .context("no OrderPlaced line")?;
    assert!(
        placed.split_whitespace().any(|word| word == parked_place),
        "OrderPlaced should name its parked command {parked_place} as cause:\n{timeline}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_timeline_shows_open_timers_with_their_cause() -> anyhow::Result<()> {
    let system = System::start(&[THRESHOLD]).await?;
    system.set_stock("PARK-WATCH", 1).await?;
    let id = Uuid::new_v4();
    system
        .place(order(id, &[("PARK-WATCH", 1, 80_000)], "tok_ok", None))
        .await?;
    system.wait_status(id, "under_review", DEADLINE).await?;
    let timeline = testkit::wait_until("the review timer", DEADLINE, || async {
        let text = stdout(&system.cli(&["order", "timeline", &id.to_string()]).await?);
        Ok(text.contains("review_expiry").then_some(text))
    })
    .await?;
    let sent = timeline
        .lines()
        .find(|l| l.contains("OrderSentForReview"))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("no OrderSentForReview in:\n{timeline}"))?;
    let timer = timeline
        .lines()
        .find(|l| l.contains("review_expiry"))
        .context("no timer line")?;
    assert!(timer.contains("timer"), "{timer}");
    assert!(
        timer.split_whitespace().any(|w| w == format!("#{sent}")),
        "the timer should name OrderSentForReview (#{sent}) as its cause:\n{timeline}"
    );
    let unknown = system
        .cli(&["order", "timeline", &Uuid::new_v4().to_string()])
        .await?;
    assert!(!unknown.status.success());
    Ok(())
}
