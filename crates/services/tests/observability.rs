//! `orderflow run`'s operational side, in process, on a real PostgreSQL and RabbitMQ:
//! `/readyz` follows the broker's reachability (cut and restored through a TCP proxy
//! the test controls, so the shared broker is never touched), `/healthz` and `/metrics`
//! answer, and the process keeps its row in `workers` while it runs and removes it when
//! it stops.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use services::settings::{HttpAddr, Settings};
use testkit::http::get;
use testkit::{TestDb, TestVhost};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(30);

/// A TCP forwarder to the broker that can be cut (every connection closed, new ones
/// closed at once) and restored: RabbitMQ unreachable, as the process sees it.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let up = Arc::clone(&up);
            let links = Arc::clone(&links);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let target = target.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    links.lock().unwrap_or_else(|p| p.into_inner()).push(link);
                }
            }
        });
        Ok(Proxy {
            addr,
            up,
            links,
            accept,
        })
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for link in self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            link.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// `scheme://user:pass@host:port/vhost` → (`host:port`, the URL with `host:port`
/// replaced by `via`).
fn reroute(url: &str, via: SocketAddr) -> anyhow::Result<(String, String)> {
    let (scheme, rest) = url.split_once("://").context("no scheme in the URL")?;
    let (userinfo, rest) = rest.rsplit_once('@').context("no credentials in the URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((
        authority.to_owned(),
        format!("{scheme}://{userinfo}@{via}/{path}"),
    ))
}

/// Waits until `GET path` answers `status`; returns the body.
async fn wait_for(addr: SocketAddr, path: &str, status: u16) -> anyhow::Result<String> {
    let last = Mutex::new(String::new());
    testkit::wait_until(&format!("{path} to answer {status}"), DEADLINE, || async {
        match get(addr, path).await {
            Ok((code, body)) if code == status => Ok(Some(body)),
            Ok((code, body)) => {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = format!("{code} {body}");
                Ok(None)
            }
            Err(error) => {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = error.to_string();
                Ok(None)
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "last answer: {}",
            last.lock().unwrap_or_else(|p| p.into_inner())
        )
    })
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

#[tokio::test]
async fn readiness_follows_the_broker_and_the_process_registers_while_it_runs() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let vhost = TestVhost::new().await?;
    let (broker, _) = reroute(&vhost.url, free_port()?)?;
    let proxy = Proxy::start(broker).await?;
    let (_, amqp_url) = reroute(&vhost.url, proxy.addr)?;
    let http = free_port()?;
    let settings = Settings {
        database_url: db.url.clone(),
        amqp_url,
        http_addr: HttpAddr::Set(http),
        heartbeat_interval: Duration::from_millis(200),
        ..Settings::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let process = tokio::spawn(services::runtime::run(
        settings,
        &["relay", "commands", "projector"],
        async move {
            let _ = stop_rx.await;
        },
    ));

    let body = wait_for(http, "/readyz", 200).await?;
    assert!(body.contains("ok   rabbitmq"), "{body}");
    assert_eq!(get(http, "/healthz").await?.0, 200);
    let (status, metrics) = get(http, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("orderflow_messages_handled_total{worker=\"commands\"} 0"),
        "{metrics}"
    );

    // registered, with what it runs and where it serves HTTP
    let rows = services::registry::list(db.pool()).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].workers, ["relay", "commands", "projector"]);
    assert_eq!(rows[0].pid, i32::try_from(std::process::id())?);
    assert_eq!(
        rows[0].http_addr.as_deref(),
        Some(http.to_string().as_str())
    );
    assert!(!rows[0].gone);
    let first_beat = rows[0].last_heartbeat;
    testkit::wait_until("a heartbeat", DEADLINE, || async {
        let rows = services::registry::list(db.pool()).await?;
        Ok(rows
            .first()
            .is_some_and(|r| r.last_heartbeat > first_beat)
            .then_some(()))
    })
    .await?;

    // RabbitMQ unreachable: not ready, saying why; alive all the same
    proxy.cut();
    let body = wait_for(http, "/readyz", 503).await?;
    assert!(body.starts_with("not ready: rabbitmq"), "{body}");
    assert!(body.contains("ok   postgresql"), "{body}");
    assert_eq!(get(http, "/healthz").await?.0, 200);

    // reachable again: the bus reconnects and the process is ready again
    proxy.restore();
    wait_for(http, "/readyz", 200).await?;

    // a clean stop removes the row
    let _ = stop_tx.send(());
    tokio::time::timeout(DEADLINE, process)
        .await
        .context("the process did not stop")???;
    assert!(services::registry::list(db.pool()).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_process_without_bus_workers_is_ready_without_a_broker() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let http = free_port()?;
    let settings = Settings {
        database_url: db.url.clone(),
        // nothing listens there: a bus worker could not start
        amqp_url: format!("amqp://guest:guest@{}/%2f", free_port()?),
        http_addr: HttpAddr::Set(http),
        ..Settings::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let process = tokio::spawn(services::runtime::run(
        settings,
        &["projector", "timers"],
        async move {
            let _ = stop_rx.await;
        },
    ));
    let body = wait_for(http, "/readyz", 200).await?;
    assert!(!body.contains("rabbitmq"), "{body}");
    let _ = stop_tx.send(());
    tokio::time::timeout(DEADLINE, process)
        .await
        .context("the process did not stop")???;
    Ok(())
}

#[tokio::test]
async fn silent_processes_are_shown_as_gone() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let me = services::registry::Registration::this_process(
        &["relay"],
        Duration::from_millis(100),
        None,
    );
    services::registry::register(db.pool(), &me).await?;
    let rows = services::registry::list(db.pool()).await?;
    assert!(!rows[0].gone, "{rows:?}");
    // three intervals without a heartbeat
    testkit::wait_until("the silent process to be gone", DEADLINE, || async {
        let rows = services::registry::list(db.pool()).await?;
        Ok(rows.first().is_some_and(|r| r.gone).then_some(()))
    })
    .await?;
    // a heartbeat brings it back
    services::registry::heartbeat(db.pool(), &me).await?;
    assert!(!services::registry::list(db.pool()).await?[0].gone);
    Ok(())
}
