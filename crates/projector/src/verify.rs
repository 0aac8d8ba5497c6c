//! `orderflow replay --verify [--swap]`: rebuild read models beside the live ones,
//! show how they differ, and replace the live rows only when asked.
//!
//! Everything happens in one transaction:
//! 1. take each projection's checkpoint lock (as `replay` does): the live projector
//!    waits, so the live tables stay at their checkpoint `C` meanwhile;
//! 2. create the schema [`SHADOW_SCHEMA`] with an empty copy of each read-model table
//!    (`LIKE public.t INCLUDING ALL`) and put it first on the transaction's
//!    `search_path` (`SET LOCAL`): the projections' unqualified table names then
//!    write the copies, while `events` and `checkpoints` still resolve to `public`;
//! 3. rebuild each projection from the start of the log up to its own checkpoint `C`,
//!    with the same `apply_page` as live projection: the copies are what the live
//!    tables should hold at `C`, so any difference is a real one, not lag;
//! 4. diff each copy against its live table by primary key, naming the columns that
//!    differ;
//! 5. with `swap` (and differences), replace the live rows by the rebuilt ones. The
//!    checkpoint stays `C`, which is what the rebuilt rows reflect: the live projector
//!    continues after `C`, applying nothing twice and skipping nothing;
//! 6. drop the schema and commit (swap) or roll back (no swap: nothing was changed,
//!    and the rollback removes the shadow schema even if the process dies midway).
use std::fmt;

use domain::EventEnvelope;
use eventstore::{EventStore, LogPosition, RecordedEvent};
use sqlx::PgConnection;
use tracing::{info, warn};

use crate::runner::{checkpoint_name, ensure_schema, find_rows_by_key};
use crate::tables::{columns_of, ident};
use crate::{Projection, ProjectorError, PAGE_SIZE};

/// Where the rebuilt tables live while they are compared. Created and dropped inside
/// the verifying transaction, so never visible to anyone else.
pub const SHADOW_SCHEMA: &str = "orderflow_verify";

/// Differing rows listed per table; beyond that they are only counted.
pub const MAX_DIFFS_LISTED: i64 = 100;

/// How a live row differs from the rebuilt one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffKind {
    /// The rebuild has the row, the live table not.
    MissingFromLive,
    /// The live table has a row the rebuild does not.
    OnlyInLive,
    /// Both have the key; `columns` lists `name: live …, rebuilt …` per differing column.
    Differs { columns: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowDiff {
    /// The primary key, as `column=value` pairs.
    pub key: String,
    pub kind: DiffKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDiff {
    pub table: String,
    /// Every differing row.
    pub total: i64,
    /// The first [`MAX_DIFFS_LISTED`] of them, by key.
    pub rows: Vec<RowDiff>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Each projection verified, with the checkpoint it was rebuilt up to.
    pub projections: Vec<(String, LogPosition)>,
    /// Events read from the log for the rebuild.
    pub events: u64,
    /// One entry per table, differing or not.
    pub tables: Vec<TableDiff>,
    /// The live rows were replaced by the rebuilt ones.
    pub swapped: bool,
}

impl VerifyReport {
    pub fn differences(&self) -> i64 {
        self.tables.iter().map(|t| t.total).sum()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for table in &self.tables {
            writeln!(f, "{}: {} rows differ", table.table, table.total)?;
            for row in &table.rows {
                match &row.kind {
                    DiffKind::MissingFromLive => writeln!(
                        f,
                        "  {} {}: missing from the live table",
                        table.table, row.key
                    )?,
                    DiffKind::OnlyInLive => {
                        writeln!(f, "  {} {}: only in the live table", table.table, row.key)?
                    }
                    DiffKind::Differs { columns } => {
                        writeln!(f, "  {} {}: {}", table.table, row.key, columns.join("; "))?
                    }
                }
            }
            let unlisted = table.total - table.rows.len() as i64;
            if unlisted > 0 {
                writeln!(f, "  … and {unlisted} more")?;
            }
        }
        let names: Vec<&str> = self.projections.iter().map(|(n, _)| n.as_str()).collect();
        let outcome = match (self.differences(), self.swapped) {
            (0, _) => "the live rows equal the rebuilt ones".to_owned(),
            (n, true) => format!("{n} differing rows replaced by the rebuilt ones (swapped)"),
            (n, false) => format!(
                "{n} differing rows; live tables left as they were (use --swap to replace them)"
            ),
        };
        writeln!(
            f,
            "verified {} against {} events: {outcome}",
            names.join(", "),
            self.events
        )
    }
}

/// Rebuilds `projections` into shadow tables, diffs them against the live ones and,
/// with `swap`, replaces the live rows; see the module docs.
pub async fn verify(
    store: &EventStore,
    projections: &[&dyn Projection],
    swap: bool,
) -> Result<VerifyReport, ProjectorError> {
    ensure_schema(store).await?;
    let mut tx = eventstore::begin(store.pool()).await?;
    let mut checkpoints = Vec::with_capacity(projections.len());
    for projection in projections {
        let at = store
            .lock_checkpoint(&mut tx, &checkpoint_name(*projection))
            .await?;
        checkpoints.push(at);
    }
    let tables: Vec<&'static str> = projections
        .iter()
        .flat_map(|p| p.tables())
        .copied()
        .collect();
    // The projections' own state tables are rebuilt in the shadow too (their live rows
    // must not see the rebuild), but only read models are compared.
    let shadowed: Vec<&'static str> = tables
        .iter()
        .copied()
        .chain(projections.iter().flat_map(|p| p.state_tables()).copied())
        .collect();
    create_shadow(&mut tx, &shadowed).await?;
    find_rows_by_key(&mut tx, true).await?;
    let events = rebuild(store, &mut tx, projections, &checkpoints).await?;
    // The comparison reads every row of both sides.
    find_rows_by_key(&mut tx, false).await?;
    let mut diffs = Vec::with_capacity(tables.len());
    for table in &tables {
        diffs.push(diff_table(&mut tx, table).await?);
    }
    let differs = diffs.iter().any(|d| d.total > 0);
    let swapped = swap && differs;
    if swapped {
        // State tables too: the rebuilt state belongs with the rebuilt rows.
        for table in &shadowed {
            replace_live_rows(&mut tx, table).await?;
        }
    }
    sqlx::query(&format!("DROP SCHEMA {SHADOW_SCHEMA} CASCADE"))
        .execute(&mut *tx)
        .await?;
    if swapped {
        tx.commit().await?;
    } else {
        // Nothing to keep: the rollback also removes the shadow schema.
        tx.rollback().await?;
    }
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    info!(projections = ?names, events, swapped, "verify finished");
    let projections: Vec<(String, LogPosition)> = names
        .into_iter()
        .map(str::to_owned)
        .zip(checkpoints)
        .collect();
    Ok(VerifyReport {
        projections,
        events,
        tables: diffs,
        swapped,
    })
}

async fn create_shadow(conn: &mut PgConnection, tables: &[&str]) -> Result<(), ProjectorError> {
    sqlx::query(&format!("CREATE SCHEMA {SHADOW_SCHEMA}"))
        .execute(&mut *conn)
        .await?;
    for table in tables {
        let table = ident(table);
        sqlx::query(&format!(
            "CREATE TABLE {SHADOW_SCHEMA}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *conn)
        .await?;
    }
    // Transaction-local: the pooled connection gets its usual path back at the end.
    sqlx::query(&format!("SET LOCAL search_path TO {SHADOW_SCHEMA}, public"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Applies the log to each projection up to its checkpoint, a page at a time, each
/// page read once for all of them. Returns the events read.
async fn rebuild(
    store: &EventStore,
    conn: &mut PgConnection,
    projections: &[&dyn Projection],
    checkpoints: &[LogPosition],
) -> Result<u64, ProjectorError> {
    let Some(target) = checkpoints.iter().max().copied() else {
        return Ok(0);
    };
    let mut after = LogPosition::START;
    let mut read = 0u64;
    while after < target {
        // Every event up to a checkpoint was readable when the projector saved it, and
        // no older one can appear later, so these pages are complete.
        let records = store.read_all(after, PAGE_SIZE).await?;
        let Some(last) = records.last().map(RecordedEvent::log_position) else {
            warn!(?after, ?target, "the log ends before a checkpoint");
            break;
        };
        let (positions, page) = decode_with_positions(&records);
        for (projection, checkpoint) in projections.iter().zip(checkpoints) {
            let upto = positions.partition_point(|p| p <= checkpoint);
            if upto > 0 {
                projection.apply_page(&mut *conn, &page[..upto]).await?;
            }
        }
        read += records
            .iter()
            .filter(|r| r.log_position() <= target)
            .count() as u64;
        after = last;
    }
    Ok(read)
}

/// The page decoded as the runner decodes it (an event this build cannot decode is
/// left out, as live projection leaves it out), with each event's log position.
fn decode_with_positions(records: &[RecordedEvent]) -> (Vec<LogPosition>, Vec<EventEnvelope>) {
    records
        .iter()
        .filter_map(|rec| match crate::to_envelope(rec) {
            Ok(env) => Some((rec.log_position(), env)),
            Err(error) => {
                warn!(global_position = rec.global_position, %error, "skipping an event the projector cannot decode");
                None
            }
        })
        .unzip()
}

#[derive(sqlx::FromRow)]
struct DiffRow {
    key: String,
    kind: String,
    columns: Vec<String>,
    total: i64,
}

/// Live `public.t` against the rebuilt shadow copy, by primary key.
async fn diff_table(conn: &mut PgConnection, table: &str) -> Result<TableDiff, ProjectorError> {
    let columns = columns_of(&mut *conn, table).await?;
    let sql =
        diff_sql(table, &columns).ok_or_else(|| ProjectorError::NoPrimaryKey(table.to_owned()))?;
    let rows: Vec<DiffRow> = sqlx::query_as(&sql)
        .bind(MAX_DIFFS_LISTED)
        .fetch_all(conn)
        .await?;
    let total = rows.first().map_or(0, |r| r.total);
    let rows = rows
        .into_iter()
        .map(|r| RowDiff {
            key: r.key,
            kind: match r.kind.as_str() {
                "missing" => DiffKind::MissingFromLive,
                "extra" => DiffKind::OnlyInLive,
                _ => DiffKind::Differs { columns: r.columns },
            },
        })
        .collect();
    Ok(TableDiff {
        table: table.to_owned(),
        total,
        rows,
    })
}

/// The diff query: a FULL JOIN on the primary key (the `EXCEPT` both ways, with the
/// columns named), one row per differing key. `None` without a primary key.
fn diff_sql(table: &str, columns: &[(String, bool)]) -> Option<String> {
    let keys: Vec<&str> = columns
        .iter()
        .filter(|(_, k)| *k)
        .map(|(c, _)| c.as_str())
        .collect();
    let values: Vec<&str> = columns
        .iter()
        .filter(|(_, k)| !*k)
        .map(|(c, _)| c.as_str())
        .collect();
    let first_key = ident(keys.first()?);
    let key_text = keys
        .iter()
        .map(|k| {
            format!(
                "format('%s=%s', {}, coalesce(l.{q}, s.{q}))",
                literal(k),
                q = ident(k)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let join_on = keys
        .iter()
        .map(|k| format!("l.{q} = s.{q}", q = ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let column_diffs = values
        .iter()
        .map(|c| {
            format!(
                "CASE WHEN l.{q} IS DISTINCT FROM s.{q} THEN format('%s: live %s, rebuilt %s', {}, \
                 quote_nullable(l.{q}), quote_nullable(s.{q})) END",
                literal(c),
                q = ident(c)
            )
        })
        .collect::<Vec<_>>();
    let column_array = if column_diffs.is_empty() {
        "ARRAY[]::text[]".to_owned()
    } else {
        format!(
            "array_remove(ARRAY[{}]::text[], NULL)",
            column_diffs.join(", ")
        )
    };
    let mut differs = vec![
        format!("l.{first_key} IS NULL"),
        format!("s.{first_key} IS NULL"),
    ];
    differs.extend(
        values
            .iter()
            .map(|c| format!("l.{q} IS DISTINCT FROM s.{q}", q = ident(c))),
    );
    let table = ident(table);
    Some(format!(
        "SELECT concat_ws(' ', {key_text}) AS key,
                CASE WHEN l.{first_key} IS NULL THEN 'missing'
                     WHEN s.{first_key} IS NULL THEN 'extra' ELSE 'differs' END AS kind,
                {column_array} AS columns,
                count(*) OVER () AS total
           FROM public.{table} l FULL JOIN {SHADOW_SCHEMA}.{table} s ON {join_on}
          WHERE {}
          ORDER BY 1
          LIMIT $1",
        differs.join(" OR ")
    ))
}

/// The live table's rows become the rebuilt ones (same columns, same order: the copy
/// was made `LIKE` it).
async fn replace_live_rows(conn: &mut PgConnection, table: &str) -> Result<(), ProjectorError> {
    let table = ident(table);
    sqlx::query(&format!("DELETE FROM public.{table}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "INSERT INTO public.{table} SELECT * FROM {SHADOW_SCHEMA}.{table}"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A quoted SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_compares_by_the_key_and_names_every_other_column() {
        let columns = [("order_id".to_owned(), true), ("status".to_owned(), false)];
        let sql = diff_sql("order_status", &columns).unwrap_or_default();
        assert!(sql.contains(r#"ON l."order_id" = s."order_id""#), "{sql}");
        assert!(
            sql.contains(r#"l."status" IS DISTINCT FROM s."status""#),
            "{sql}"
        );
        assert!(diff_sql("t", &[("a".to_owned(), false)]).is_none());
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(literal("it's"), "'it''s'");
    }
}
