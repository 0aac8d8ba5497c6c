//! `stock_levels`: units free to sell (`on_hand`) and units held for orders (`reserved`).
use std::collections::HashMap;

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
        Box::pin(async move {
            let mut skus: Vec<String> = events
                .iter()
                .filter_map(|e| sku_of(&e.event).map(str::to_owned))
                .collect();
            if skus.is_empty() {
                return Ok(());
            }
            skus.sort();
            skus.dedup();
            let mut levels = load(conn, &skus).await?;
            for env in events {
                if let Some(sku) = sku_of(&env.event) {
                    let level = levels.get(sku).copied().unwrap_or_default();
                    levels.insert(sku.to_owned(), apply(level, &env.event));
                }
            }
            upsert(conn, &levels).await
        })
    }
}

async fn load(
    conn: &mut PgConnection,
    skus: &[String],
) -> Result<HashMap<String, Level>, ProjectorError> {
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT sku, on_hand, reserved FROM stock_levels WHERE sku = ANY($1)")
            .bind(skus)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(sku, on_hand, reserved)| (sku, Level { on_hand, reserved }))
        .collect())
}

async fn upsert(
    conn: &mut PgConnection,
    levels: &HashMap<String, Level>,
) -> Result<(), ProjectorError> {
    sqlx::query(
        "INSERT INTO stock_levels (sku, on_hand, reserved)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[])
         ON CONFLICT (sku) DO UPDATE SET on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved",
    )
    .bind(levels.keys().cloned().collect::<Vec<_>>())
    .bind(levels.values().map(|l| l.on_hand).collect::<Vec<_>>())
    .bind(levels.values().map(|l| l.reserved).collect::<Vec<_>>())
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
}
