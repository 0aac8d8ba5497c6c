//! Logs: human-readable by default, JSON with ORDERFLOW_LOG_FORMAT=json; filtered by
//! RUST_LOG (default: info for orderflow's crates, warn for the rest).
use tracing_subscriber::{fmt, EnvFilter};

const DEFAULT_FILTER: &str =
    "warn,orderflow=info,services=info,projector=info,eventstore=info,bus=info,domain=info";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var("ORDERFLOW_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
