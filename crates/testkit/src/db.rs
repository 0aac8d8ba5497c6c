//! `TestDb`: a fresh, migrated PostgreSQL database per test, dropped afterwards.

use crate::url::with_path;
use anyhow::Context;
use eventstore::EventStore;
use sqlx::PgPool;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A throw-away database `orderflow_test_<uuid>` on the server of `DATABASE_URL`,
/// created and migrated by `eventstore::connect` and dropped `WITH (FORCE)` on drop.
#[derive(Debug)]
pub struct TestDb {
    /// The URL of the test database (same server, role and options as `DATABASE_URL`).
    pub url: String,
    pub name: String,
    pub store: EventStore,
}

impl TestDb {
    /// Fails (never skips) when the server cannot be reached.
    pub async fn new() -> anyhow::Result<TestDb> {
        let base =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let name = format!("orderflow_test_{}", uuid::Uuid::new_v4().simple());
        let url = with_path(&base, &name)?;
        let store = eventstore::connect(&url)
            .await
            .with_context(|| format!("creating test database {name} (is PostgreSQL running?)"))?;
        Ok(TestDb { url, name, store })
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A store of its own on the same database, as a second process would have.
    pub async fn second_store(&self) -> anyhow::Result<EventStore> {
        Ok(eventstore::connect(&self.url).await?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // `close()` marks the pool closed at once (no new connections, waiters fail); its
        // future, which would wait for connections driven by the test's runtime, is not
        // awaited: FORCE below ends whatever is still connected.
        drop(self.store.pool().close());
        let url = self.url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on; a fresh thread
        // with a runtime of its own can.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(eventstore::drop_database(&url))?;
            anyhow::Ok(())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop test database {name}: {error:#}"),
            Err(_) => eprintln!("dropping test database {name} panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::url::with_path;

    #[test]
    fn with_database_replaces_the_path_and_keeps_options() {
        assert_eq!(
            with_path("postgres://u:p@h:5432/postgres?sslmode=disable", "t").ok(),
            Some("postgres://u:p@h:5432/t?sslmode=disable".to_string())
        );
        assert_eq!(
            with_path("postgres://h", "t").ok(),
            Some("postgres://h/t".to_string())
        );
    }
}
