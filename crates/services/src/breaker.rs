//! The circuit breaker around the payment gateway (the `failsafe` crate's state
//! machine): it opens when too few calls succeed over a time window with enough calls
//! in it, lets a probe through after a jittered pause (half-open), and closes on
//! success. A few timeouts among normal traffic do not open it: it takes at least
//! `MIN_CALLS` calls in the window with fewer than half succeeding. While it is open,
//! payments wait and retry (the payment timer still applies); orders do not fail.
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failsafe::backoff::EqualJittered;
use failsafe::failure_policy::SuccessRateOverTimeWindow;
use failsafe::{Config, StateMachine};
use tracing::{info, warn};

/// Fewer successes than this share of calls in the window opens the circuit.
const REQUIRED_SUCCESS_RATE: f64 = 0.5;
/// Calls the window must hold before the rate counts.
const MIN_CALLS: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);
/// Open for between half of and this long, growing while probes keep failing.
const OPEN_MIN: Duration = Duration::from_secs(1);
const OPEN_MAX: Duration = Duration::from_secs(30);

/// The breaker's state as the instrument last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

/// Logs state changes and remembers the current state (for metrics and tests).
#[derive(Debug, Clone, Default)]
pub struct StateLog {
    state: Arc<AtomicU8>,
}

impl StateLog {
    /// Remembers `state` and reports it on `/metrics` (0 closed, 1 open, 2 half-open).
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::CIRCUIT_STATE, "breaker" => "payment_gateway")
            .set(f64::from(state));
    }

    pub fn state(&self) -> CircuitState {
        match self.state.load(Ordering::Relaxed) {
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }
}

impl failsafe::Instrument for StateLog {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.set(1);
        warn!("payment gateway circuit opened: too many calls failing; payments wait");
    }

    fn on_half_open(&self) {
        self.set(2);
        info!("payment gateway circuit half-open: probing the gateway");
    }

    fn on_closed(&self) {
        self.set(0);
        info!("payment gateway circuit closed: the gateway answers again");
    }
}

pub type GatewayBreaker = StateMachine<SuccessRateOverTimeWindow<EqualJittered>, StateLog>;

/// A breaker with orderflow's defaults, and the handle on its state.
pub fn gateway_breaker() -> (GatewayBreaker, StateLog) {
    let (machine, log) = breaker(MIN_CALLS, OPEN_MIN, OPEN_MAX);
    log.set(0);
    (machine, log)
}

/// A breaker with other thresholds (tests use small ones).
pub fn breaker(
    min_calls: u32,
    open_min: Duration,
    open_max: Duration,
) -> (GatewayBreaker, StateLog) {
    let log = StateLog::default();
    let policy = failsafe::failure_policy::success_rate_over_time_window(
        REQUIRED_SUCCESS_RATE,
        min_calls,
        WINDOW,
        failsafe::backoff::equal_jittered(open_min, open_max),
    );
    let machine = Config::new()
        .failure_policy(policy)
        .instrument(log.clone())
        .build();
    (machine, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_failures_among_successes_keep_it_closed() {
        let (b, log) = gateway_breaker();
        for i in 0..100 {
            assert!(b.is_call_permitted());
            if i % 10 == 0 {
                b.on_error();
            } else {
                b.on_success();
            }
        }
        assert_eq!(log.state(), CircuitState::Closed);
    }

    #[test]
    fn mostly_failing_calls_open_it_then_a_successful_probe_closes_it() {
        failsafe::clock::freeze(|clock| {
            let (b, log) = breaker(5, Duration::from_secs(2), Duration::from_secs(4));
            // The policy judges a full window of calls.
            clock.advance(WINDOW);
            for _ in 0..50 {
                if b.is_call_permitted() {
                    b.on_error();
                }
            }
            assert_eq!(log.state(), CircuitState::Open);
            assert!(!b.is_call_permitted(), "an open circuit rejects calls");
            clock.advance(Duration::from_secs(5));
            assert!(
                b.is_call_permitted(),
                "after the pause a probe goes through"
            );
            assert_eq!(log.state(), CircuitState::HalfOpen);
            b.on_success();
            assert_eq!(log.state(), CircuitState::Closed);
        });
    }
}
