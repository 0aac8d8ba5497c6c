//! Reading `orderflow run`'s HTTP side (`/metrics`, `/healthz`, `/readyz`) from tests
//! and the bench: one GET over HTTP/1.0, and a sample out of the Prometheus text.
use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` over HTTP/1.0: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The body of `GET /metrics`, which must answer 200.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "GET /metrics answered {status}: {body}");
    Ok(body)
}

/// The value of the sample `series` (a name with its labels, exactly as rendered,
/// e.g. `orderflow_messages_handled_total{worker="commands"}`), if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The sum of every sample of the metric `name`, whatever its labels.
pub fn sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE orderflow_messages_handled_total counter\n\
        orderflow_messages_handled_total{worker=\"commands\"} 3\n\
        orderflow_messages_handled_total{worker=\"order\"} 4.5\n\
        orderflow_messages_handled_total_extra 100\n\
        orderflow_events_relayed_total 7\n";

    #[test]
    fn a_sample_is_found_by_its_name_and_labels() {
        assert_eq!(
            sample(TEXT, "orderflow_messages_handled_total{worker=\"order\"}"),
            Some(4.5)
        );
        assert_eq!(sample(TEXT, "orderflow_events_relayed_total"), Some(7.0));
        assert_eq!(sample(TEXT, "orderflow_events_appended_total"), None);
    }

    #[test]
    fn a_sum_adds_every_labelled_sample_of_the_metric_and_nothing_else() {
        assert_eq!(sum(TEXT, "orderflow_messages_handled_total"), 7.5);
        assert_eq!(sum(TEXT, "orderflow_events_relayed_total"), 7.0);
        assert_eq!(sum(TEXT, "orderflow_nothing"), 0.0);
    }
}
