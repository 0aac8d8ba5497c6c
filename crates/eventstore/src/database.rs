//! Connecting, and creating the database named in the URL when it is missing.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::StoreError;

/// SQLSTATE `invalid_catalog_name`: the database in the URL does not exist.
const INVALID_CATALOG_NAME: &str = "3D000";
/// SQLSTATE `duplicate_database`: someone created it between our check and our CREATE.
const DUPLICATE_DATABASE: &str = "42P04";
/// The maintenance database that exists on every server.
const MAINTENANCE_DATABASE: &str = "postgres";

/// Parses the URL without ever echoing it (it may hold a password).
pub(crate) fn parse_options(database_url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(database_url)?)
}

/// Opens a pool on `options`, creating the database first when the server says it does
/// not exist. Trying the target first means a role that may use, but not create, an
/// existing database still connects.
pub(crate) async fn open_pool(
    options: PgConnectOptions,
    max_connections: u32,
) -> Result<PgPool, StoreError> {
    // One plain connection first: it fails at once with the server's or the network's
    // own words ("connection refused"), where a pool would retry until its timeout.
    match PgConnection::connect_with(&options).await {
        Ok(conn) => {
            let _ = conn.close().await;
        }
        Err(error) if sqlstate(&error).as_deref() == Some(INVALID_CATALOG_NAME) => {
            create_database(&options).await?;
        }
        Err(error) => return Err(error.into()),
    }
    Ok(pool_options(max_connections).connect_with(options).await?)
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    // An unreachable server should fail a command in seconds, not half a minute.
    // No ping before handing out a pooled connection: it is a round trip per query
    // (about a third of all round trips in the order flow). A connection that died
    // while idle fails its next statement instead, which every caller already treats
    // as a transient error and retries (docs/RELIABILITY.md).
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(std::time::Duration::from_secs(10))
        .test_before_acquire(false)
}

/// `CREATE DATABASE` through the maintenance database of the same server.
pub(crate) async fn create_database(options: &PgConnectOptions) -> Result<(), StoreError> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        // No database in the URL: the server's default (the role's name) is meant, and
        // there is nothing of ours to create.
        return Ok(());
    };
    let maintenance = options.clone().database(MAINTENANCE_DATABASE);
    let mut conn = PgConnection::connect_with(&maintenance).await?;
    let created = sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&name)))
        .execute(&mut conn)
        .await;
    // Close politely either way; a failure to close changes nothing for the caller.
    let _ = conn.close().await;
    match created {
        Ok(_) => {
            tracing::info!(database = %name, "created the database");
            Ok(())
        }
        // Another process won the race: the database is there, which is all we want.
        Err(error) if sqlstate(&error).as_deref() == Some(DUPLICATE_DATABASE) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// `DROP DATABASE ... WITH (FORCE)` through the maintenance database (for tests and
/// tools; never called by the running system).
pub async fn drop_database(database_url: &str) -> Result<(), StoreError> {
    let options = parse_options(database_url)?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let maintenance = options.clone().database(MAINTENANCE_DATABASE);
    let mut conn = PgConnection::connect_with(&maintenance).await?;
    let dropped = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(&name)
    ))
    .execute(&mut conn)
    .await;
    let _ = conn.close().await;
    dropped?;
    Ok(())
}

/// Quotes an SQL identifier (`CREATE DATABASE` takes no bind parameters).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQLSTATE of a database error, if it is one.
pub(crate) fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_ident_doubles_embedded_quotes() {
        assert_eq!(quote_ident("orderflow"), "\"orderflow\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn parse_options_error_does_not_echo_the_password() {
        let error = parse_options("postgres://user:s3cret@:not-a-port/db")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!error.contains("s3cret"), "{error}");
    }
}
