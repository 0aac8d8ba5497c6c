//! Reads one gauge from a process's `/metrics`: the circuit breaker's state exists only
//! in the payment processes' memory, and they already publish it there, so `top`
//! asks them rather than adding a table that every breaker transition would write.
//! A plain HTTP/1.0 GET is all `/metrics` needs; no HTTP client crate for one request.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The series `services::breaker` sets, exactly as the exporter renders it.
const CIRCUIT_SERIES: &str = "orderflow_circuit_breaker_state{breaker=\"payment_gateway\"}";

/// A `/metrics` body larger than this is not orderflow's; stop reading.
const MAX_BODY: u64 = 4 * 1024 * 1024;

/// The circuit gauge of the process at `addr`; `None` when it does not answer in
/// time, answers with something else than 200, or does not carry the gauge.
pub async fn circuit_gauge(addr: SocketAddr, timeout: Duration) -> Option<f64> {
    let body = tokio::time::timeout(timeout, get_metrics(addr))
        .await
        .ok()?
        .ok()?;
    sample(&body, CIRCUIT_SERIES)
}

async fn get_metrics(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.take(MAX_BODY).read_to_string(&mut response).await?;
    if !response.starts_with("HTTP/1.0 200") && !response.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other("not 200"));
    }
    Ok(response)
}

/// The value of `series` (name and labels exactly as rendered) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_is_read_from_prometheus_text() {
        let text = "# TYPE orderflow_circuit_breaker_state gauge\n\
                    orderflow_circuit_breaker_state{breaker=\"payment_gateway\"} 1\n\
                    orderflow_open_timers 3\n";
        assert_eq!(sample(text, CIRCUIT_SERIES), Some(1.0));
        assert_eq!(sample(text, "orderflow_open_timers"), Some(3.0));
        assert_eq!(sample(text, "orderflow_open"), None);
    }

    #[tokio::test]
    async fn a_closed_port_gives_no_value() -> anyhow::Result<()> {
        // Bound then dropped: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        assert_eq!(circuit_gauge(addr, Duration::from_secs(2)).await, None);
        Ok(())
    }
}
