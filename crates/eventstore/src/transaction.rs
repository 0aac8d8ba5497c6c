//! Beginning a transaction in a way that survives cancellation.
//!
//! sqlx 0.8's `Pool::begin`, cancelled after it sent `BEGIN` but before the answer came
//! back (a `select!`, a timeout, an aborted task at shutdown), hands the connection back
//! to the pool inside a transaction that sqlx does not know is open. The next user's
//! single-statement writes then run inside it: they "succeed", the message they answer
//! is acknowledged, and they vanish when the connection closes. The restart test caught
//! exactly that: an `order.place` logged as recorded and acknowledged whose events never
//! reached the log.
//!
//! [`begin`] runs `BEGIN` in a task of its own, so that it always runs to completion:
//! if the caller is gone by then, the finished transaction is dropped like any other
//! and sqlx rolls it back properly. Everything in this workspace begins its
//! transactions here (clippy's `disallowed-methods` refuses `Pool::begin`).
use sqlx::{PgPool, Postgres, Transaction};

/// `pool.begin()`, safe to cancel at any point.
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    #[allow(clippy::disallowed_methods)] // the one sanctioned use, see the module docs
    let task = tokio::spawn(async move { pool.begin().await });
    match task.await {
        Ok(result) => result,
        // The task panicked or the runtime is shutting down: no transaction to return.
        Err(_) => Err(sqlx::Error::WorkerCrashed),
    }
}
