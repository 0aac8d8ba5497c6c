//! What the projector asks the catalog about its tables, and how it names them in SQL.
use sqlx::PgConnection;

use crate::ProjectorError;

/// A table's columns in order, and which of them form its primary key.
pub(crate) async fn columns_of(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, bool)>, ProjectorError> {
    Ok(sqlx::query_as(
        "SELECT a.attname::text, coalesce(a.attnum = ANY (i.indkey::int2[]), false)
           FROM pg_attribute a
           LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
          WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
    )
    .bind(format!("public.{}", ident(table)))
    .fetch_all(conn)
    .await?)
}

/// A quoted SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
