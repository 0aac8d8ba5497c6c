//! Pages: live projection (pages of `PAGE_SIZE`, a transaction each) and replay (pages
//! of `REPLAY_PAGE_SIZE`, read ahead) cut the log in different places; an order whose
//! events span pages must come out the same either way, in every table the
//! projections write (the milestones' progress included).
use chrono::Utc;
use domain::events::{PaymentCaptured, PaymentRequested, StockReserved};
use domain::{streams, DomainEvent, OrderInput};
use eventstore::EventStore;
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

/// More events than a live page, on a stock stream no order uses.
async fn filler(store: &EventStore) -> anyhow::Result<()> {
    let events: Vec<DomainEvent> = (0..projector::PAGE_SIZE + 100)
        .map(|_| {
            DomainEvent::StockReserved(StockReserved {
                sku: "F".to_owned(),
                order_id: Uuid::new_v4(),
                line: 0,
                quantity: 1,
            })
        })
        .collect();
    append(store, &streams::stock("F"), &events).await
}

fn requested(order_id: Uuid) -> DomainEvent {
    DomainEvent::PaymentRequested(PaymentRequested {
        order_id,
        amount_cents: 300,
        currency: "EUR".to_owned(),
        payment_token: "tok_ok".to_owned(),
        expires_at: Utc::now() + chrono::Duration::seconds(30),
    })
}

fn captured(order_id: Uuid) -> PaymentCaptured {
    PaymentCaptured {
        order_id,
        amount_cents: 300,
        gateway_reference: "sim-test".to_owned(),
        unwanted: false,
    }
}

#[tokio::test]
async fn orders_spanning_pages_give_the_same_rows_live_and_replayed() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    set_stock(store, "A", 100).await?;
    set_stock(store, "B", 100).await?;

    // Spanning: placed, one line reserved and its payment requested in the first live
    // page; the other line, the capture and the shipment pages later.
    let mut spanning = OrderScript::new(store);
    spanning
        .place(vec![line("A", 1, 100), line("B", 2, 100)], true)
        .await?;
    let first_line = StockReserved {
        sku: "A".to_owned(),
        order_id: spanning.order_id,
        line: 0,
        quantity: 1,
    };
    append(
        store,
        &streams::stock("A"),
        &[DomainEvent::StockReserved(first_line.clone())],
    )
    .await?;
    spanning.order(OrderInput::LineReserved(first_line)).await?;
    append(
        store,
        &streams::payment(spanning.order_id),
        &[requested(spanning.order_id)],
    )
    .await?;
    filler(store).await?;
    let second_line = StockReserved {
        sku: "B".to_owned(),
        order_id: spanning.order_id,
        line: 1,
        quantity: 2,
    };
    append(
        store,
        &streams::stock("B"),
        &[DomainEvent::StockReserved(second_line.clone())],
    )
    .await?;
    spanning
        .order(OrderInput::LineReserved(second_line))
        .await?;
    filler(store).await?;
    let capture = captured(spanning.order_id);
    append(
        store,
        &streams::payment(spanning.order_id),
        &[DomainEvent::PaymentCaptured(capture.clone())],
    )
    .await?;
    spanning.order(OrderInput::PaymentCaptured(capture)).await?;
    spanning
        .ship(Utc::now() + chrono::Duration::hours(1))
        .await?;

    // Within one page: a payment timer scheduled and cancelled (one append).
    let mut quick = OrderScript::new(store);
    quick.place(vec![line("A", 1, 300)], true).await?;
    quick.reserve_all().await?;
    quick.capture(300).await?;
    wait_readable(store).await?;
    assert!(store.count().await? > 2 * projector::PAGE_SIZE);

    catch_up_all(store).await?;
    let live = every_row(store).await?;

    let milestones_of = |order_id: Uuid| -> Vec<&str> {
        let mut names: Vec<&str> = live
            .1
            .iter()
            .filter(|r| r.order_id == order_id)
            .map(|r| r.milestone.as_str())
            .collect();
        names.sort_unstable();
        names
    };
    let expected = ["accepted", "confirmed", "paid", "placed", "reserved"];
    assert_eq!(milestones_of(quick.order_id), expected);
    let mut shipped = expected.to_vec();
    shipped.push("shipped");
    shipped.sort_unstable();
    assert_eq!(milestones_of(spanning.order_id), shipped);
    // timers: no payment timeout is left; the spanning order waits for its delivery
    let timers = &live.0 .2;
    assert_eq!(timers.len(), 1, "{timers:?}");
    assert_eq!(
        (timers[0].1.as_str(), timers[0].2),
        ("delivery", spanning.order_id)
    );
    assert!(!live.2.is_empty(), "progress is kept per order stream");

    let projections = projector::all_projections();
    let applied = projector::replay_many(store, &projections, |_| {}).await?;
    assert_eq!(i64::try_from(applied)?, store.count().await?);
    assert_eq!(every_row(store).await?, live);
    Ok(())
}

#[tokio::test]
async fn a_timer_cancelled_and_scheduled_again_in_a_later_page_keeps_only_the_new_one(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let order_id = Uuid::new_v4();
    let payment = streams::payment(order_id);
    append(store, &payment, &[requested(order_id)]).await?;
    catch_up(store, &projector::timers::TimersProjection).await?;
    let first = timer_rows(store).await?;
    assert_eq!(first.len(), 1);

    // one page: the capture cancels the first wait, a new request starts another
    append(
        store,
        &payment,
        &[
            DomainEvent::PaymentCaptured(captured(order_id)),
            requested(order_id),
        ],
    )
    .await?;
    catch_up(store, &projector::timers::TimersProjection).await?;
    let second = timer_rows(store).await?;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second[0].0, first[0].0, "the new request's timer");
    let newest = last_of(store, &payment, "PaymentRequested").await?;
    assert_eq!(second[0].0, newest.event_id);

    projector::replay(
        store,
        std::sync::Arc::new(projector::timers::TimersProjection),
        |_| {},
    )
    .await?;
    assert_eq!(timer_rows(store).await?, second);
    Ok(())
}

/// An order that ended keeps no progress row: placed in one page (a row), cancelled in
/// the next (the row goes), then a reservation that arrives after the cancellation,
/// on a stream with no row, is folded from the log. The milestones are those a replay
/// gives, which never writes the row at all.
#[tokio::test]
async fn an_order_that_ended_keeps_no_progress_and_a_later_event_is_folded_from_the_log(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let mut order = OrderScript::new(store);
    order.place(vec![line("A", 1, 300)], true).await?;
    wait_readable(store).await?;
    catch_up_all(store).await?;
    assert_eq!(
        progress_rows(store).await?.len(),
        1,
        "an order under way keeps its progress"
    );

    order
        .order(OrderInput::Cancel(domain::commands::CancelOrder {
            order_id: order.order_id,
            reason: "changed my mind".to_owned(),
        }))
        .await?;
    wait_readable(store).await?;
    catch_up_all(store).await?;
    assert_eq!(
        progress_rows(store).await?,
        vec![],
        "the ended order's row is gone"
    );

    // A reservation that arrives after the cancellation (the saga asks for its release).
    order.reserve_all().await?;
    wait_readable(store).await?;
    catch_up_all(store).await?;
    let live = every_row(store).await?;
    assert_eq!(live.2, vec![], "no row for the ended order");
    let mut reached: Vec<&str> = live.1.iter().map(|r| r.milestone.as_str()).collect();
    reached.sort_unstable();
    assert_eq!(reached, ["accepted", "cancelled", "placed"]);

    projector::replay_many(store, &projector::all_projections(), |_| {}).await?;
    assert_eq!(every_row(store).await?, live);
    Ok(())
}
