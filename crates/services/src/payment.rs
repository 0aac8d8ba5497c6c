//! Payment: records the request (which starts the payment timer), calls the gateway
//! with an idempotency key per order and step, records the outcome, and compensates
//! (void before capture, refund after) when the order does not keep the money.
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use chrono::Utc;
use domain::events::OrderAccepted;
use domain::payment::{self, ChargeOutcome, GatewayAction};
use domain::{streams, DomainEvent, EventEnvelope, PaymentInput, PaymentState};
use eventstore::EventStore;
use futures::future::BoxFuture;
use tracing::{info, warn};
use uuid::Uuid;

use crate::breaker::{gateway_breaker, CircuitState, GatewayBreaker, StateLog};
use crate::exec::{decide_on_cached, load_cached, Cause, StreamCache};
use crate::gateway::{
    CaptureOutcome, CaptureRequest, GatewayError, PaymentGateway, RefundRequest, VoidOutcome,
    VoidRequest,
};
use crate::worker::EventService;
use crate::ServiceError;

/// Every gateway call gives up after this long (a hung gateway is a transient failure).
pub const GATEWAY_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Test-only failpoint: when this variable is set (to anything), the payment worker
/// aborts the whole process right after the gateway confirmed a capture and before
/// `PaymentCaptured` is appended: the crash window the capture's idempotency key covers.
/// The chaos tests (`tests/chaos`) set it; nothing else should.
pub const FAULT_CRASH_AFTER_CAPTURE: &str = "ORDERFLOW_FAULT_CRASH_AFTER_CAPTURE";

/// Transient failures of a void or refund retried here before the message is retried
/// later through the bus's delay queues.
const COMPENSATION_TRIES_IN_PROCESS: u32 = 5;

/// How long past the payment's expiry this worker keeps trying before it leaves the
/// order to the payment timer.
const GIVE_UP_AFTER_EXPIRY: chrono::Duration = chrono::Duration::seconds(5);

pub struct Payments {
    store: EventStore,
    gateway: Arc<dyn PaymentGateway>,
    call_timeout: Duration,
    breaker: GatewayBreaker,
    circuit: StateLog,
    /// [`FAULT_CRASH_AFTER_CAPTURE`] was set at start (test-only failpoint).
    crash_after_capture: bool,
    /// Folded payment streams: a payment's few decisions (request, capture) follow each
    /// other in this process and need no read of the stream in between.
    payments: StreamCache<PaymentState>,
}

/// Payment streams kept folded at once.
const CACHED_PAYMENTS: usize = 10_000;

impl Payments {
    pub fn new(store: EventStore, gateway: Arc<dyn PaymentGateway>) -> Payments {
        let (breaker, circuit) = gateway_breaker();
        Payments {
            store,
            gateway,
            call_timeout: GATEWAY_CALL_TIMEOUT,
            breaker,
            circuit,
            crash_after_capture: std::env::var_os(FAULT_CRASH_AFTER_CAPTURE).is_some(),
            payments: StreamCache::new(CACHED_PAYMENTS),
        }
    }

    /// The payment's state as this process last decided or read it. It can lag behind
    /// a decision made elsewhere (the payment timer, another process); acting on it
    /// then is harmless: every gateway call carries the step's idempotency key, and
    /// recording its outcome on a stale state is refused and decided again on the
    /// stream. The process that made the other decision settles after it itself.
    async fn current(&self, order_id: Uuid) -> Result<PaymentState, ServiceError> {
        let stream = streams::payment(order_id);
        match self.payments.cached(&stream) {
            Some((state, _)) => Ok(state),
            None => Ok(load_cached(&self.store, &self.payments, &stream)
                .await?
                .state),
        }
    }

    /// The gateway circuit's state, as last seen.
    pub fn circuit_state(&self) -> CircuitState {
        self.circuit.state()
    }

    async fn decide(
        &self,
        order_id: Uuid,
        cause: &Cause,
        input: PaymentInput,
    ) -> Result<PaymentState, ServiceError> {
        let stream = streams::payment(order_id);
        let decided = decide_on_cached(
            &self.store,
            &self.payments,
            &stream,
            cause,
            |s: &PaymentState| payment::decide(s, input.clone()),
        )
        .await?;
        for e in decided.events() {
            info!(%order_id, event = e.event_type(), "payment recorded");
        }
        Ok(decided.state().clone())
    }

    pub async fn react(&self, env: &EventEnvelope) -> Result<(), ServiceError> {
        let cause = Cause::new(env.event_id, env.correlation_id, "payment");
        match &env.event {
            DomainEvent::OrderAccepted(e) => {
                self.request(e, &cause).await?;
                self.settle(e.order_id, &cause).await
            }
            DomainEvent::OrderCancelled(e) => {
                self.decide(
                    e.order_id,
                    &cause.for_handler("payment.cancel"),
                    PaymentInput::OrderCancelled {
                        order_id: e.order_id,
                    },
                )
                .await?;
                self.settle(e.order_id, &cause).await
            }
            _ => Ok(()),
        }
    }

    /// Records the payment's request, with the gateway's answer when it comes at once:
    /// the call [`payment::first_call`] asks for is made before anything is recorded,
    /// and the request and its answer take one append (one commit less per order than
    /// recording the request first). A crash between the call and the append is
    /// covered by the capture key: the redelivered `OrderAccepted` asks again and gets
    /// the same answer, or, if the order was cancelled meanwhile, voids the key, which
    /// reports a capture made under it (then recorded and refunded). A transient
    /// failure records the request alone (its payment timer starts) and leaves the
    /// retries to [`Payments::settle`].
    async fn request(&self, accepted: &OrderAccepted, cause: &Cause) -> Result<(), ServiceError> {
        let order_id = accepted.order_id;
        // Read, not assumed new: a payment voided up front by another process (or
        // before a restart) must be known before the gateway is asked to capture, or
        // the customer who cancelled would be charged and refunded. A read costs less
        // than the append it saves.
        let state = self.current(order_id).await?;
        let outcome = match payment::first_call(&state, accepted) {
            // Requested already: `settle` goes on from the stream. (A refund is never a
            // first call.)
            None | Some(GatewayAction::Refund { .. }) => return Ok(()),
            Some(GatewayAction::Capture {
                amount_cents,
                token,
                idempotency_key,
            }) => {
                let request = CaptureRequest {
                    idempotency_key,
                    token,
                    amount_cents,
                    currency: accepted.currency.clone(),
                };
                self.charge(order_id, request).await
            }
            Some(GatewayAction::VoidCapture { capture_key }) => self
                .call(self.gateway.void(VoidRequest { capture_key }))
                .await
                .map(|outcome| match outcome {
                    VoidOutcome::AlreadyCaptured { reference } => ChargeOutcome::Captured {
                        gateway_reference: reference,
                    },
                    VoidOutcome::Voided => ChargeOutcome::Declined {
                        reason: "the order was cancelled before its payment".into(),
                    },
                }),
        };
        let cause = cause.for_handler("payment.request");
        let now = Utc::now();
        match outcome {
            Ok(outcome) => {
                let input = PaymentInput::Answered {
                    accepted: accepted.clone(),
                    now,
                    outcome,
                };
                self.decide(order_id, &cause, input).await.map(|_| ())
            }
            Err(ServiceError::Gateway(GatewayError::Transient(reason))) => {
                let input = PaymentInput::Request(accepted.clone(), now);
                let state = self.decide(order_id, &cause, input).await?;
                if state.requested.is_none() {
                    // Cancelled before the request (voided up front): a capture this
                    // call may have made is known only by voiding its key, which the
                    // message's next handling does (`first_call`).
                    return Err(GatewayError::Transient(reason).into());
                }
                warn!(%order_id, %reason, "gateway call failed transiently; the request is recorded and the call is retried");
                Ok(())
            }
            Err(other) => Err(other),
        }
    }

    /// Asks the gateway to capture; its answer as the domain takes it, after the
    /// test-only failpoint.
    async fn charge(
        &self,
        order_id: Uuid,
        request: CaptureRequest,
    ) -> Result<ChargeOutcome, ServiceError> {
        Ok(match self.call(self.gateway.capture(request)).await? {
            CaptureOutcome::Captured { reference } => {
                if self.crash_after_capture {
                    crash_after_capture(order_id);
                }
                ChargeOutcome::Captured {
                    gateway_reference: reference,
                }
            }
            CaptureOutcome::Declined { reason } => ChargeOutcome::Declined { reason },
        })
    }

    /// Makes the gateway calls the payment's state asks for until none is left.
    /// Transient failures are retried with exponential backoff and jitter.
    pub async fn settle(&self, order_id: Uuid, cause: &Cause) -> Result<(), ServiceError> {
        let mut backoff = retry_schedule();
        let mut failures = 0u32;
        loop {
            let state = self.current(order_id).await?;
            let Some(action) = payment::next_action(&state) else {
                return Ok(());
            };
            let capturing = matches!(action, GatewayAction::Capture { .. });
            let result = match action {
                GatewayAction::Capture {
                    amount_cents,
                    token,
                    idempotency_key,
                } => {
                    self.capture(
                        order_id,
                        cause,
                        &state,
                        amount_cents,
                        token,
                        idempotency_key,
                    )
                    .await
                }
                GatewayAction::Refund {
                    amount_cents,
                    idempotency_key,
                } => {
                    self.refund(order_id, cause, amount_cents, idempotency_key)
                        .await
                }
                GatewayAction::VoidCapture { capture_key } => {
                    self.void(order_id, cause, capture_key).await
                }
            };
            match result {
                Ok(()) => backoff.reset(),
                Err(ServiceError::Gateway(GatewayError::Transient(reason))) => {
                    if capturing && past_expiry(&state) {
                        warn!(%order_id, %reason, "gateway still failing past the payment's expiry; leaving it to the payment timer");
                        return Ok(());
                    }
                    // Compensations (void, refund) must happen: after a few tries the
                    // message is retried later through the bus, never given up.
                    failures += 1;
                    if !capturing && failures > COMPENSATION_TRIES_IN_PROCESS {
                        return Err(GatewayError::Transient(reason).into());
                    }
                    let pause = backoff.next_backoff().unwrap_or(Duration::from_secs(1));
                    warn!(%order_id, %reason, ?pause, "gateway call failed transiently; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn capture(
        &self,
        order_id: Uuid,
        cause: &Cause,
        state: &PaymentState,
        amount_cents: i64,
        token: String,
        idempotency_key: String,
    ) -> Result<(), ServiceError> {
        let currency = state
            .requested
            .as_ref()
            .map(|r| r.currency.clone())
            .unwrap_or_default();
        let request = CaptureRequest {
            idempotency_key,
            token,
            amount_cents,
            currency,
        };
        let input = self.charge(order_id, request).await?.into();
        self.decide(order_id, &cause.for_handler("payment.capture"), input)
            .await
            .map(|_| ())
    }

    /// Asks the gateway to void the capture key of a payment the order no longer
    /// wants: a capture it reports (made by a worker that died before recording it)
    /// is recorded and then refunded; otherwise the void is recorded.
    async fn void(
        &self,
        order_id: Uuid,
        cause: &Cause,
        capture_key: String,
    ) -> Result<(), ServiceError> {
        let outcome = self
            .call(self.gateway.void(VoidRequest { capture_key }))
            .await?;
        let input = match outcome {
            VoidOutcome::Voided => PaymentInput::CaptureVoided,
            VoidOutcome::AlreadyCaptured { reference } => PaymentInput::Captured {
                gateway_reference: reference,
            },
        };
        self.decide(order_id, &cause.for_handler("payment.void"), input)
            .await
            .map(|_| ())
    }

    async fn refund(
        &self,
        order_id: Uuid,
        cause: &Cause,
        amount_cents: i64,
        idempotency_key: String,
    ) -> Result<(), ServiceError> {
        let request = RefundRequest {
            idempotency_key,
            capture_key: payment::capture_key(order_id),
            amount_cents,
        };
        let refunded = self.call(self.gateway.refund(request)).await?;
        let input = PaymentInput::Refunded {
            gateway_reference: refunded.reference,
        };
        self.decide(order_id, &cause.for_handler("payment.refund"), input)
            .await
            .map(|_| ())
    }

    /// A gateway call through the circuit breaker, with its timeout. Declines are
    /// answers, so they count as successes; failures and timeouts count against it.
    async fn call<T>(
        &self,
        call: BoxFuture<'_, Result<T, GatewayError>>,
    ) -> Result<T, ServiceError> {
        if !self.breaker.is_call_permitted() {
            return Err(GatewayError::Transient("the gateway circuit is open".into()).into());
        }
        let result = match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(GatewayError::Transient(format!(
                "no answer within {:?}",
                self.call_timeout
            ))),
        };
        match &result {
            Ok(_) => self.breaker.on_success(),
            Err(GatewayError::Transient(_)) => self.breaker.on_error(),
            // Our own storage failing says nothing about the gateway.
            Err(GatewayError::Storage(_)) => {}
        }
        Ok(result?)
    }
}

/// Test-only failpoint: dies between the gateway's capture and its event, as a
/// `kill -9` at the worst moment would. On restart the capture is repeated with the
/// same idempotency key and the gateway returns the first result.
fn crash_after_capture(order_id: Uuid) -> ! {
    tracing::error!(
        %order_id,
        failpoint = FAULT_CRASH_AFTER_CAPTURE,
        "aborting after the capture"
    );
    std::process::abort();
}

fn past_expiry(state: &PaymentState) -> bool {
    state
        .requested
        .as_ref()
        .is_some_and(|r| Utc::now() > r.expires_at + GIVE_UP_AFTER_EXPIRY)
}

/// Retries of a transient gateway failure begin within a second (contract), double,
/// and are jittered so that many orders do not retry in step.
fn retry_schedule() -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        randomization_factor: 0.3,
        multiplier: 2.0,
        max_interval: Duration::from_secs(2),
        max_elapsed_time: None,
        ..backoff::ExponentialBackoff::default()
    }
}

impl EventService for Payments {
    fn name(&self) -> &'static str {
        "payment"
    }

    fn on_event(&self, env: EventEnvelope) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.react(&env).await })
    }
}
