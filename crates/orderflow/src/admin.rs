//! Operator set-up that is not a migration: roles are cluster-wide, so creating one is
//! an explicit step, run once by someone who may (`orderflow setup-role`).
use std::process::ExitCode;

use anyhow::Context;
use eventstore::EventStore;

/// Creates (or updates) a least-privilege login role for the workers: it may read every
/// table, append to `events` but not change or delete events, and write the read models
/// and the services' tables. Tables added by later migrations need the command again.
pub async fn setup_role(
    store: &EventStore,
    role: &str,
    password: Option<String>,
) -> anyhow::Result<ExitCode> {
    if !is_plain_identifier(role) {
        anyhow::bail!("role name '{role}' must be lower-case letters, digits and underscores, starting with a letter");
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(store.pool())
            .await
            .context("cannot read the roles")?;
    let verb = if exists { "ALTER" } else { "CREATE" };
    // format() quotes the name (%I) and the password (%L) on the server.
    let statements = [
        format!("SELECT format('{verb} ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', $1::text, $2::text)"),
        "SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), $1::text)".to_owned(),
        "SELECT format('GRANT USAGE ON SCHEMA public TO %I', $1::text)".to_owned(),
        "SELECT format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO %I', $1::text)".to_owned(),
        "SELECT format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO %I', $1::text)".to_owned(),
        // The log is append-only: no UPDATE, DELETE or TRUNCATE (the triggers refuse them
        // for every role anyway); the migrations' bookkeeping is read-only.
        "SELECT format('REVOKE UPDATE, DELETE, TRUNCATE ON events FROM %I', $1::text)".to_owned(),
        "SELECT format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON _sqlx_migrations FROM %I', $1::text)".to_owned(),
    ];
    let mut tx = eventstore::begin(store.pool())
        .await
        .context("cannot open a transaction")?;
    for statement in &statements {
        let sql: String = sqlx::query_scalar(statement)
            .bind(role)
            .bind(password.as_deref())
            .fetch_one(&mut *tx)
            .await
            .with_context(|| format!("cannot prepare the grants for {role}"))?;
        sqlx::raw_sql(&sql)
            .execute(&mut *tx)
            .await
            .with_context(|| {
                format!("cannot set up role {role} (does this role may create roles and grant?)")
            })?;
    }
    tx.commit()
        .await
        .context("cannot commit the role's grants")?;
    println!(
        "role {role} {}: it may append events but not change them; run the workers with DATABASE_URL=postgres://{role}:…@host/db",
        if exists { "updated" } else { "created" }
    );
    Ok(ExitCode::SUCCESS)
}

fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_plain_identifiers() {
        assert!(is_plain_identifier("orderflow_worker"));
        assert!(!is_plain_identifier("Worker"));
        assert!(!is_plain_identifier("1worker"));
        assert!(!is_plain_identifier("worker; drop table events"));
        assert!(!is_plain_identifier(""));
    }
}
