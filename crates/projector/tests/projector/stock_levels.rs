use domain::events::{
    StockCommitted, StockReleased, StockReservationFailed, StockReserved, StockSetRefused,
};
use domain::{streams, DomainEvent};
use projector::stock_levels::StockLevelsProjection;
use testkit::TestDb;
use uuid::Uuid;

use crate::support::*;

#[tokio::test]
async fn set_reserve_release_and_commit_move_units_between_on_hand_and_reserved(
) -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let p = StockLevelsProjection;
    let (o1, o2) = (Uuid::new_v4(), Uuid::new_v4());
    let sku = || "A".to_owned();
    let stock = streams::stock("A");

    set_stock(store, "A", 10).await?;
    catch_up(store, &p).await?;
    assert_eq!(stock_rows(store).await?, vec![(sku(), 10, 0)]);

    append(
        store,
        &stock,
        &[
            DomainEvent::StockReserved(StockReserved {
                sku: sku(),
                order_id: o1,
                line: 0,
                quantity: 3,
            }),
            DomainEvent::StockReserved(StockReserved {
                sku: sku(),
                order_id: o2,
                line: 0,
                quantity: 2,
            }),
        ],
    )
    .await?;
    catch_up(store, &p).await?;
    assert_eq!(stock_rows(store).await?, vec![(sku(), 5, 5)]);

    // a set changes what is free to sell and leaves reservations as they are
    set_stock(store, "A", 20).await?;
    catch_up(store, &p).await?;
    assert_eq!(stock_rows(store).await?, vec![(sku(), 20, 5)]);

    append(
        store,
        &stock,
        &[DomainEvent::StockReleased(StockReleased {
            sku: sku(),
            order_id: o2,
            line: 0,
            quantity: 2,
        })],
    )
    .await?;
    catch_up(store, &p).await?;
    assert_eq!(stock_rows(store).await?, vec![(sku(), 22, 3)]);

    append(
        store,
        &stock,
        &[DomainEvent::StockCommitted(StockCommitted {
            sku: sku(),
            order_id: o1,
            line: 0,
            quantity: 3,
        })],
    )
    .await?;
    catch_up(store, &p).await?;
    assert_eq!(stock_rows(store).await?, vec![(sku(), 22, 0)]);
    Ok(())
}

#[tokio::test]
async fn refused_sets_and_failed_reservations_change_nothing() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let stock = streams::stock("B");
    set_stock(store, "B", 4).await?;
    append(
        store,
        &stock,
        &[
            DomainEvent::StockSetRefused(StockSetRefused {
                sku: "B".into(),
                quantity: -1,
                reason: "negative".into(),
            }),
            DomainEvent::StockReservationFailed(StockReservationFailed {
                sku: "B".into(),
                order_id: Uuid::new_v4(),
                line: 0,
                requested: 9,
                available: 4,
            }),
        ],
    )
    .await?;
    catch_up(store, &StockLevelsProjection).await?;
    assert_eq!(stock_rows(store).await?, vec![("B".to_owned(), 4, 0)]);
    Ok(())
}

#[tokio::test]
async fn skus_are_kept_apart_and_events_of_one_page_are_applied_in_order() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let o = Uuid::new_v4();
    set_stock(store, "A", 5).await?;
    set_stock(store, "B", 7).await?;
    append(
        store,
        &streams::stock("A"),
        &[
            DomainEvent::StockReserved(StockReserved {
                sku: "A".into(),
                order_id: o,
                line: 0,
                quantity: 5,
            }),
            DomainEvent::StockReleased(StockReleased {
                sku: "A".into(),
                order_id: o,
                line: 0,
                quantity: 5,
            }),
            DomainEvent::StockReserved(StockReserved {
                sku: "A".into(),
                order_id: o,
                line: 1,
                quantity: 4,
            }),
        ],
    )
    .await?;
    set_stock(store, "A", 0).await?;
    catch_up(store, &StockLevelsProjection).await?;
    assert_eq!(
        stock_rows(store).await?,
        vec![("A".to_owned(), 0, 4), ("B".to_owned(), 7, 0)]
    );
    Ok(())
}
