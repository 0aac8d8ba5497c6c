//! The payment gateway, behind a trait, and the built-in simulator with the contract's
//! test tokens. The simulator keeps its ledger in its own table (`gateway_ledger`), as
//! a real gateway keeps it on its side: a worker that crashes between a capture and its
//! event and captures again with the same idempotency key gets the first result back,
//! and no money moves twice.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    pub idempotency_key: String,
    pub token: String,
    pub amount_cents: i64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub idempotency_key: String,
    /// The idempotency key of the capture being refunded.
    pub capture_key: String,
    pub amount_cents: i64,
}

/// Void whatever was or would be captured under `capture_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidRequest {
    pub capture_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidOutcome {
    /// Nothing was captured under the key, and a later capture with it will be refused.
    Voided,
    /// A capture under the key happened already (to be recorded, then refunded).
    AlreadyCaptured { reference: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureOutcome {
    Captured { reference: String },
    Declined { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refunded {
    pub reference: String,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Worth retrying: the gateway failed this time.
    #[error("gateway failed transiently: {0}")]
    Transient(String),
    #[error("gateway storage error: {0}")]
    Storage(#[from] sqlx::Error),
}

/// What orderflow needs from a payment gateway. Every call carries an idempotency key.
pub trait PaymentGateway: Send + Sync + 'static {
    /// Authorises and captures in one step.
    fn capture(
        &self,
        request: CaptureRequest,
    ) -> BoxFuture<'_, Result<CaptureOutcome, GatewayError>>;
    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<Refunded, GatewayError>>;
    /// Voids a capture key (for a payment the order no longer wants).
    fn void(&self, request: VoidRequest) -> BoxFuture<'_, Result<VoidOutcome, GatewayError>>;
}

/// How the simulator treats a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenBehaviour {
    Approve,
    Decline,
    /// Fails transiently on the first `FLAKY_FAILURES` attempts, then approves.
    Flaky,
    /// Never answers.
    Hang,
}

const FLAKY_FAILURES: u32 = 2;

fn behaviour(token: &str) -> TokenBehaviour {
    match token {
        "tok_ok" => TokenBehaviour::Approve,
        "tok_flaky" => TokenBehaviour::Flaky,
        "tok_timeout" => TokenBehaviour::Hang,
        _ => TokenBehaviour::Decline,
    }
}

/// The built-in gateway simulator (contract section 2, "Test payment tokens").
pub struct Simulator {
    pool: PgPool,
    latency: Duration,
    failure_rate: f64,
    /// Attempts per idempotency key, for `tok_flaky`.
    attempts: Mutex<HashMap<String, u32>>,
}

/// Connections of the simulator's own pool ([`Simulator::beside`]): a ledger write is
/// one short statement, and the payment handlers that wait for one are few at a time.
const LEDGER_CONNECTIONS: u32 = 4;

impl Simulator {
    /// The simulator on the database of `pool`, with a small pool of its own whose
    /// commits do not wait for their WAL flush (`synchronous_commit = off`). That is
    /// safe here, and only here: every ledger write is followed by the payment's
    /// append, whose commit flushes the WAL up to itself and so the ledger row before
    /// it. A crash in between loses the row and the event together, and the
    /// redelivered message captures once, as if the first call had never reached the
    /// gateway. A real gateway keeps its ledger on its side; the simulator's
    /// bookkeeping should cost the shop's database as little as it can (one commit per
    /// payment, a fifth of the flushing commits of an order in the bench's burst).
    pub fn beside(pool: &PgPool, latency: Duration, failure_rate: f64) -> Simulator {
        let options = (*pool.connect_options())
            .clone()
            .options([("synchronous_commit", "off")]);
        let own = PgPoolOptions::new()
            .max_connections(LEDGER_CONNECTIONS)
            .connect_lazy_with(options);
        Simulator::new(own, latency, failure_rate)
    }

    pub fn new(pool: PgPool, latency: Duration, failure_rate: f64) -> Simulator {
        Simulator {
            pool,
            latency,
            failure_rate,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// The pool the ledger is written through.
    pub fn ledger(&self) -> &PgPool {
        &self.pool
    }

    fn count_attempt(&self, key: &str) -> u32 {
        let mut attempts = match self.attempts.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = attempts.entry(key.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    async fn simulate_network(&self) -> Result<(), GatewayError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.failure_rate > 0.0 && rand::rng().random_bool(self.failure_rate.clamp(0.0, 1.0)) {
            return Err(GatewayError::Transient("simulated network failure".into()));
        }
        Ok(())
    }

    async fn recorded(&self, key: &str) -> Result<Option<(String, String)>, GatewayError> {
        Ok(sqlx::query_as(
            "SELECT outcome, reference FROM gateway_ledger WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records the outcome for the key, or returns the one recorded first.
    async fn record(
        &self,
        key: &str,
        kind: &str,
        outcome: &str,
        reference: &str,
        amount_cents: i64,
    ) -> Result<(String, String), GatewayError> {
        // One round trip in the usual cases: ours inserted, or the first one committed
        // before this statement began. A first one committed while it ran is not in
        // its snapshot: then it is read afterwards.
        let first: Option<(String, String)> = sqlx::query_as(
            "WITH ours AS (
                 INSERT INTO gateway_ledger (idempotency_key, kind, outcome, reference, amount_cents)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING
                 RETURNING outcome, reference)
             SELECT outcome, reference FROM ours
             UNION ALL
             SELECT outcome, reference FROM gateway_ledger
              WHERE idempotency_key = $1 AND NOT EXISTS (SELECT 1 FROM ours)",
        )
        .bind(key)
        .bind(kind)
        .bind(outcome)
        .bind(reference)
        .bind(amount_cents)
        .fetch_optional(&self.pool)
        .await?;
        match first {
            Some(first) => Ok(first),
            None => self
                .recorded(key)
                .await?
                .ok_or_else(|| GatewayError::Transient(format!("ledger lost entry {key}"))),
        }
    }

    async fn capture_inner(&self, request: CaptureRequest) -> Result<CaptureOutcome, GatewayError> {
        self.simulate_network().await?;
        let behaviour = behaviour(&request.token);
        // A token whose answer is the same every time goes straight to `record`, which
        // returns the key's first outcome if there is one (one statement, not two).
        // The others would answer a repeat differently (fail, or never answer), so the
        // ledger is asked first.
        if !matches!(behaviour, TokenBehaviour::Approve | TokenBehaviour::Decline) {
            if let Some(first) = self.recorded(&request.idempotency_key).await? {
                return Ok(capture_outcome(first));
            }
        }
        let (outcome, reference) = match behaviour {
            TokenBehaviour::Approve => ("captured", format!("sim-{}", uuid::Uuid::new_v4())),
            TokenBehaviour::Decline => ("declined", "card declined".to_owned()),
            TokenBehaviour::Flaky => {
                if self.count_attempt(&request.idempotency_key) <= FLAKY_FAILURES {
                    return Err(GatewayError::Transient("tok_flaky: try again".into()));
                }
                ("captured", format!("sim-{}", uuid::Uuid::new_v4()))
            }
            TokenBehaviour::Hang => return std::future::pending().await,
        };
        let amount = if outcome == "captured" {
            request.amount_cents
        } else {
            0
        };
        let first = self
            .record(
                &request.idempotency_key,
                "capture",
                outcome,
                &reference,
                amount,
            )
            .await?;
        Ok(capture_outcome(first))
    }

    async fn refund_inner(&self, request: RefundRequest) -> Result<Refunded, GatewayError> {
        self.simulate_network().await?;
        // `record` returns the key's first refund if there is one.
        let reference = format!("sim-refund-{}", uuid::Uuid::new_v4());
        let (_, reference) = self
            .record(
                &request.idempotency_key,
                "refund",
                "refunded",
                &reference,
                -request.amount_cents,
            )
            .await?;
        Ok(Refunded { reference })
    }
}

impl Simulator {
    async fn void_inner(&self, request: VoidRequest) -> Result<VoidOutcome, GatewayError> {
        self.simulate_network().await?;
        // The key's first outcome wins: a capture made before stays a capture; a void
        // made first makes every later capture with the key a decline.
        let (outcome, reference) = self
            .record(&request.capture_key, "void", "voided", "voided", 0)
            .await?;
        Ok(if outcome == "captured" {
            VoidOutcome::AlreadyCaptured { reference }
        } else {
            VoidOutcome::Voided
        })
    }
}

fn capture_outcome((outcome, reference): (String, String)) -> CaptureOutcome {
    if outcome == "captured" {
        CaptureOutcome::Captured { reference }
    } else {
        CaptureOutcome::Declined { reason: reference }
    }
}

impl PaymentGateway for Simulator {
    fn capture(
        &self,
        request: CaptureRequest,
    ) -> BoxFuture<'_, Result<CaptureOutcome, GatewayError>> {
        Box::pin(self.capture_inner(request))
    }

    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<Refunded, GatewayError>> {
        Box::pin(self.refund_inner(request))
    }

    fn void(&self, request: VoidRequest) -> BoxFuture<'_, Result<VoidOutcome, GatewayError>> {
        Box::pin(self.void_inner(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_the_contracts_behaviours() {
        assert_eq!(behaviour("tok_ok"), TokenBehaviour::Approve);
        assert_eq!(behaviour("tok_decline"), TokenBehaviour::Decline);
        assert_eq!(behaviour("tok_flaky"), TokenBehaviour::Flaky);
        assert_eq!(behaviour("tok_timeout"), TokenBehaviour::Hang);
        assert_eq!(behaviour("tok_anything_else"), TokenBehaviour::Decline);
    }
}
