//! Test-only helpers: every test gets its own PostgreSQL database and its own RabbitMQ
//! vhost, both removed when the guard drops, so tests run in parallel, beside a running
//! orderflow, and leave nothing behind. A test that cannot reach a server fails.

mod broker;
mod db;
pub mod fixtures;
pub mod http;
mod url;
mod wait;

pub use broker::*;
pub use db::*;
pub use url::with_path;
pub use wait::{wait_readable, wait_until, Starts};
