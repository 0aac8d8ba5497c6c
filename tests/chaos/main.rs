//! Chaos tests: the workers run as separate processes (`orderflow run --only <worker>`)
//! on a database and a vhost of their own while the test kills them, drops their broker
//! connections and kills their database connections; afterwards nothing is lost, nothing
//! is charged twice, nothing is oversold, and `orderflow audit` passes.
//!
//! Only this test's own resources are touched (its vhost, its database, its processes),
//! so other tests may run beside it. The tests of this binary run one at a time.
//! `scripts/chaos` runs the long version of `storm` (and may restart the real broker).

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;

mod crash_after_capture;
mod faults;
mod fleet;
mod publisher;
mod storm;

/// One system at a time: the chaos tests are heavy and time-bounded.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The environment of a worker process of `system`: its database and vhost, plus `extra`.
fn worker_env(system: &harness::System, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", system.db.url.as_str()),
        ("AMQP_URL", system.vhost.url.as_str()),
        ("ORDERFLOW_DELIVERY_DELAY", "200ms"),
        ("ORDERFLOW_EXPRESS_DELIVERY_DELAY", "100ms"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}
