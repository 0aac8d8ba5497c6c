//! `stock_levels`: units free to sell (`on_hand`) and units held for orders (`reserved`).
use domain::{DomainEvent, EventEnvelope};
use futures::future::BoxFuture;
use sqlx::PgConnection;

use crate::runner::{Projection, ProjectorError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Level {
    pub on_hand: i64,
    pub reserved: i64,
}

/// The SKU an event changes the level of, if any.
fn sku_of(event: &DomainEvent) -> Option<&str> {
    use DomainEvent::*;
    match event {
        StockSet(e) => Some(&e.sku),
        StockReserved(e) => Some(&e.sku),
        StockReleased(e) => Some(&e.sku),
        StockCommitted(e) => Some(&e.sku),
        _ => None,
    }
}

/// Folds one event into a SKU's level.
pub fn apply(level: Level, event: &DomainEvent) -> Level {
    use DomainEvent::*;
    match event {
        // Sets the units free to sell; reservations stay as they are.
        StockSet(e) => Level {
            on_hand: e.quantity,
            ..level
        },
        StockReserved(e) => Level {
            on_hand: level.on_hand - e.quantity,
            reserved: level.reserved + e.quantity,
        },
        StockReleased(e) => Level {
            on_hand: level.on_hand + e.quantity,
            reserved: level.reserved - e.quantity,
        },
        StockCommitted(e) => Level {
            reserved: level.reserved - e.quantity,
            ..level
        },
        _ => level,
    }
}

/// What a page does to one SKU's level, whatever it was before: `on_hand` is set to
/// `set_to` (the page's last `stock.set`, if any) and then moves by `on_hand_by`;
/// `reserved` moves by `reserved_by`. Folding the page's events with [`apply`] from
/// any level gives the same level, so the page is written without reading the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    pub set_to: Option<i64>,
    pub on_hand_by: i64,
    pub reserved_by: i64,
}

impl Change {
    fn then(self, event: &DomainEvent) -> Change {
        use DomainEvent::*;
        match event {
            // Sets the units free to sell: what moved them before no longer counts.
            StockSet(e) => Change {
                set_to: Some(e.quantity),
                on_hand_by: 0,
                ..self
            },
            _ => {
                let moved = apply(Level::default(), event);
                Change {
                    on_hand_by: self.on_hand_by + moved.on_hand,
                    reserved_by: self.reserved_by + moved.reserved,
                    ..self
                }
            }
        }
    }

    /// The level after this change from `level`.
    pub fn applied_to(self, level: Level) -> Level {
        Level {
            on_hand: self.set_to.unwrap_or(level.on_hand) + self.on_hand_by,
            reserved: level.reserved + self.reserved_by,
        }
    }
}

/// Each SKU's change in a page, in SKU order.
pub fn page_changes(events: &[EventEnvelope]) -> Vec<(String, Change)> {
    let mut changes: std::collections::BTreeMap<&str, Change> = Default::default();
    for env in events {
        if let Some(sku) = sku_of(&env.event) {
            let change = changes.entry(sku).or_default();
            *change = change.then(&env.event);
        }
    }
    changes
        .into_iter()
        .map(|(sku, change)| (sku.to_owned(), change))
        .collect()
}

pub struct StockLevelsProjection;

impl Projection for StockLevelsProjection {
    fn name(&self) -> &'static str {
        "stock_levels"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["stock_levels"]
    }

    fn apply_page<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectorError>> {
        Box::pin(async move { write(conn, &page_changes(events)).await })
    }
}

/// Writes a page's changes in one statement (one round trip, no read first): an UPDATE
/// of the SKUs that have a row and an INSERT of those that have none. Only one
/// projector applies a page at a time (the projection's lock), so no row appears in
/// between.
async fn write(
    conn: &mut PgConnection,
    changes: &[(String, Change)],
) -> Result<(), ProjectorError> {
    if changes.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH page AS (
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
               AS p(sku, set_to, on_hand_by, reserved_by)
         ), updated AS (
             UPDATE stock_levels s
                SET on_hand = coalesce(p.set_to, s.on_hand) + p.on_hand_by,
                    reserved = s.reserved + p.reserved_by
               FROM page p WHERE s.sku = p.sku
             RETURNING s.sku
         )
         INSERT INTO stock_levels (sku, on_hand, reserved)
         SELECT sku, coalesce(set_to, 0) + on_hand_by, reserved_by FROM page
          WHERE sku NOT IN (SELECT sku FROM updated)",
    )
    .bind(
        changes
            .iter()
            .map(|(sku, _)| sku.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(changes.iter().map(|(_, c)| c.set_to).collect::<Vec<_>>())
    .bind(
        changes
            .iter()
            .map(|(_, c)| c.on_hand_by)
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .iter()
            .map(|(_, c)| c.reserved_by)
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::events::{StockCommitted, StockReleased, StockReserved, StockSet};
    use uuid::Uuid;

    #[test]
    fn reservation_release_and_commit_move_units_between_columns() {
        let o = Uuid::nil();
        let sku = || "A".to_owned();
        let events = [
            DomainEvent::StockSet(StockSet {
                sku: sku(),
                quantity: 10,
            }),
            DomainEvent::StockReserved(StockReserved {
                sku: sku(),
                order_id: o,
                line: 0,
                quantity: 3,
            }),
            DomainEvent::StockReserved(StockReserved {
                sku: sku(),
                order_id: o,
                line: 1,
                quantity: 2,
            }),
            DomainEvent::StockReleased(StockReleased {
                sku: sku(),
                order_id: o,
                line: 1,
                quantity: 2,
            }),
            DomainEvent::StockSet(StockSet {
                sku: sku(),
                quantity: 4,
            }),
            DomainEvent::StockCommitted(StockCommitted {
                sku: sku(),
                order_id: o,
                line: 0,
                quantity: 3,
            }),
        ];
        let level = events.iter().fold(Level::default(), apply);
        assert_eq!(
            level,
            Level {
                on_hand: 4,
                reserved: 0
            }
        );
    }

    #[test]
    fn a_pages_change_gives_the_level_its_events_fold_to_from_any_level() {
        let o = Uuid::nil();
        let reserve = |q| {
            DomainEvent::StockReserved(StockReserved {
                sku: "A".into(),
                order_id: o,
                line: 0,
                quantity: q,
            })
        };
        let release = |q| {
            DomainEvent::StockReleased(StockReleased {
                sku: "A".into(),
                order_id: o,
                line: 0,
                quantity: q,
            })
        };
        let commit = |q| {
            DomainEvent::StockCommitted(StockCommitted {
                sku: "A".into(),
                order_id: o,
                line: 0,
                quantity: q,
            })
        };
        let set = |q| {
            DomainEvent::StockSet(StockSet {
                sku: "A".into(),
                quantity: q,
            })
        };
        let pages = [
            vec![reserve(3), release(1), commit(2)],
            vec![reserve(3), set(7), reserve(2), commit(3)],
            vec![set(5), set(9)],
            vec![release(2), set(1), release(1)],
        ];
        let starts = [
            Level::default(),
            Level {
                on_hand: 10,
                reserved: 4,
            },
        ];
        for page in &pages {
            let envs: Vec<EventEnvelope> = page
                .iter()
                .enumerate()
                .map(|(i, event)| {
                    let i = i64::try_from(i).unwrap_or_default();
                    crate::test_events::envelope("stock-A", i, i, event.clone())
                })
                .collect();
            let changes = page_changes(&envs);
            let [(sku, change)] = changes.as_slice() else {
                panic!("one SKU, one change: {changes:?}");
            };
            assert_eq!(sku, "A");
            for start in starts {
                assert_eq!(
                    change.applied_to(start),
                    page.iter().fold(start, apply),
                    "{page:?} from {start:?}"
                );
            }
        }
    }
}
