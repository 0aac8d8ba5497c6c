//! The HTTP side of `orderflow run` (`ORDERFLOW_HTTP_ADDR`): `/metrics` (Prometheus
//! text), `/healthz` (200 while the process runs) and `/readyz` (200 only when
//! PostgreSQL answers with every migration applied and, for a process with bus workers,
//! RabbitMQ is connected; 503 naming what is not).
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bus::Bus;
use eventstore::{EventStore, MIGRATOR};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::settings::HttpAddr;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One dependency's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    /// `Err` says why it is not ready.
    pub result: Result<(), String>,
}

/// The verdict of `/readyz`: ready when every check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub checks: Vec<Check>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.checks.iter().all(|c| c.result.is_ok())
    }

    /// 200 or 503.
    pub fn status(&self) -> u16 {
        if self.is_ready() {
            200
        } else {
            503
        }
    }

    /// The first line says `ready` or `not ready: <reasons>`; one line per check follows.
    pub fn body(&self) -> String {
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| {
                c.result
                    .as_ref()
                    .err()
                    .map(|why| format!("{}: {why}", c.name))
            })
            .collect();
        let mut text = if failed.is_empty() {
            "ready\n".to_owned()
        } else {
            format!("not ready: {}\n", failed.join("; "))
        };
        for check in &self.checks {
            match &check.result {
                Ok(()) => text.push_str(&format!("ok   {}\n", check.name)),
                Err(why) => text.push_str(&format!("FAIL {}: {why}\n", check.name)),
            }
        }
        text
    }
}

/// What `/readyz` looks at.
#[derive(Clone)]
pub struct Probes {
    pub store: EventStore,
    /// `None` for a process without bus workers (it needs no RabbitMQ).
    pub bus: Option<Bus>,
}

impl Probes {
    /// Checks PostgreSQL, the migrations and RabbitMQ (each bounded by a timeout).
    pub async fn readiness(&self) -> Readiness {
        let (database, migrations) = match bounded(self.database()).await {
            Ok(missing) if missing.is_empty() => (Ok(()), Ok(())),
            Ok(missing) => (
                Ok(()),
                Err(format!("migrations not applied: {}", missing.join(", "))),
            ),
            Err(why) => (Err(why), Err("unknown (no database)".to_owned())),
        };
        let mut checks = vec![
            Check {
                name: "postgresql",
                result: database,
            },
            Check {
                name: "migrations",
                result: migrations,
            },
        ];
        if let Some(bus) = &self.bus {
            checks.push(Check {
                name: "rabbitmq",
                result: bounded(rabbitmq(bus)).await,
            });
        }
        Readiness { checks }
    }

    /// `SELECT 1`, then the versions of the migrations this build knows that the
    /// database has not applied.
    async fn database(&self) -> Result<Vec<String>, String> {
        let pool = self.store.pool();
        sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map_err(|e| e.to_string())?;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(pool)
                .await
                .map_err(|e| format!("cannot read the applied migrations: {e}"))?;
        Ok(MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
            .map(|m| m.version.to_string())
            .collect())
    }
}

/// A live connection to RabbitMQ: a channel opens on it (a dead connection is re-opened
/// first; the check fails if that does not happen within the timeout).
async fn rabbitmq(bus: &Bus) -> Result<(), String> {
    let channel = bus
        .open_channel()
        .await
        .map_err(|e| format!("not connected to {}: {e}", bus.endpoint()))?;
    let _ = channel.close(200, "readiness checked".into()).await;
    Ok(())
}

async fn bounded<T>(check: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    probes: Probes,
}

/// The router: `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: PrometheusHandle, probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState { metrics, probes })
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let readiness = state.probes.readiness().await;
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, readiness.body())
}

/// Opens the listener `addr` asks for: `None` when turned off, or when the default
/// address is taken (the process runs on without the endpoint). A configured address
/// that cannot be opened is an error.
pub async fn bind(addr: HttpAddr) -> std::io::Result<Option<TcpListener>> {
    match addr {
        HttpAddr::Off => Ok(None),
        HttpAddr::Set(addr) => TcpListener::bind(addr).await.map(Some),
        HttpAddr::Default(addr) => match TcpListener::bind(addr).await {
            Ok(listener) => Ok(Some(listener)),
            Err(error) => {
                warn!(%addr, %error, "cannot serve /metrics and /readyz on the default address; \
                      set ORDERFLOW_HTTP_ADDR (port 0 picks a free one) or off");
                Ok(None)
            }
        },
    }
}

/// Serves the router on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    probes: Probes,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(addr = ?addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics, probes))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &'static str, result: Result<(), &str>) -> Check {
        Check {
            name,
            result: result.map_err(str::to_owned),
        }
    }

    #[test]
    fn ready_only_when_every_check_passes() {
        let all_ok = Readiness {
            checks: vec![
                check("postgresql", Ok(())),
                check("migrations", Ok(())),
                check("rabbitmq", Ok(())),
            ],
        };
        assert!(all_ok.is_ready());
        assert_eq!(all_ok.status(), 200);
        assert!(all_ok.body().starts_with("ready\n"), "{}", all_ok.body());

        let no_broker = Readiness {
            checks: vec![
                check("postgresql", Ok(())),
                check("migrations", Ok(())),
                check("rabbitmq", Err("no answer within 2s")),
            ],
        };
        assert!(!no_broker.is_ready());
        assert_eq!(no_broker.status(), 503);
        assert!(
            no_broker
                .body()
                .starts_with("not ready: rabbitmq: no answer within 2s\n"),
            "{}",
            no_broker.body()
        );

        let old_schema = Readiness {
            checks: vec![
                check("postgresql", Ok(())),
                check("migrations", Err("migrations not applied: 40")),
            ],
        };
        assert_eq!(old_schema.status(), 503);
        assert!(old_schema.body().contains("FAIL migrations"));
    }

    #[test]
    fn a_process_without_bus_workers_needs_no_broker() {
        let db_only = Readiness {
            checks: vec![check("postgresql", Ok(())), check("migrations", Ok(()))],
        };
        assert_eq!(db_only.status(), 200);
    }
}
