//! Wake-ups for followers of the log, without `NOTIFY` in the appending transaction.
//!
//! `NOTIFY` inside a transaction takes PostgreSQL's notify-queue lock at commit, which
//! serialises all committing appenders. Instead an append, after its commit, bumps an
//! in-process counter; one coalescing task per store sends at most one
//! `NOTIFY orderflow_events` per `COALESCE_WINDOW` on a connection of its own, so other
//! processes learn of the burst. A follower (`Wakeups`) wakes on an in-process append, on
//! a notification received with `LISTEN`, or when its fallback interval runs out; the
//! fallback covers lost notifications and transactions outside orderflow that hold the
//! log's visible horizon back. A follower ignores the notifications its own store sent:
//! it was woken in process by the appends they announce, and their echo would wake
//! every follower of the process once more, to read nothing new.
//!
//! The followers of one store share one `LISTEN` connection: each notification from
//! elsewhere wakes one server backend and one task of the process, which passes it on
//! to every follower, instead of one backend and one connection per follower.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::StoreError;

/// The notification channel followers `LISTEN` on.
pub const CHANNEL: &str = "orderflow_events";

/// At most one NOTIFY per this long: a burst of appends costs one notification.
const COALESCE_WINDOW: Duration = Duration::from_millis(3);
/// Pause before the listener tries again after a failed reconnect.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// The store's side: the counter appends bump, and the coalescing task.
#[derive(Debug)]
pub(crate) struct Signals {
    appended: watch::Sender<u64>,
    /// Bumped when a projection that others wait on committed a page (the timers
    /// table): its followers need not look on every append.
    projected: watch::Sender<u64>,
    coalescer: Mutex<Option<JoinHandle<()>>>,
    /// The backend pid of the coalescer's connection (0 before it connects): the
    /// sender of this store's own notifications.
    notifier: Arc<AtomicU32>,
    /// Bumped for every notification from elsewhere (and after the listener lost its
    /// connection): what the followers of this store wait on besides `appended`.
    heard: watch::Sender<u64>,
    /// The task that listens for all of them, started by the first follower.
    listener: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Signals {
    pub(crate) fn new() -> Self {
        Self {
            appended: watch::Sender::new(0),
            projected: watch::Sender::new(0),
            coalescer: Mutex::new(None),
            notifier: Arc::new(AtomicU32::new(0)),
            heard: watch::Sender::new(0),
            listener: tokio::sync::Mutex::new(None),
        }
    }

    /// The notifications from elsewhere, from now on. Starts the store's listener
    /// first if it is not running (the first follower, or a new runtime: each
    /// `#[tokio::test]` has its own), and returns once it listens, so every append
    /// committed after this call is heard.
    pub(crate) async fn hear(&self, pool: &PgPool) -> Result<watch::Receiver<u64>, StoreError> {
        let mut slot = self.listener.lock().await;
        if slot.as_ref().is_none_or(JoinHandle::is_finished) {
            let own_pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with((*pool.connect_options()).clone());
            let mut listener = PgListener::connect_with(&own_pool).await?;
            listener.listen(CHANNEL).await?;
            *slot = Some(tokio::spawn(forward_notifications(
                listener,
                self.heard.clone(),
                self.notifier(),
            )));
        }
        Ok(self.heard.subscribe())
    }

    /// Called after every committed append: wakes local followers at once and lets the
    /// coalescer tell other processes.
    pub(crate) fn appended(&self, pool: &PgPool) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
        self.ensure_coalescer(pool);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Called after a projection page others wait on committed: wakes the followers of
    /// projections in this process, and everyone as an append does (other processes
    /// learn of it only by the notification, which cannot say what it announces).
    pub(crate) fn projected(&self, pool: &PgPool) {
        self.projected.send_modify(|n| *n = n.wrapping_add(1));
        self.appended(pool);
    }

    pub(crate) fn subscribe_projected(&self) -> watch::Receiver<u64> {
        self.projected.subscribe()
    }

    /// Who sends this store's notifications (see [`Wakeups::start`]).
    pub(crate) fn notifier(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.notifier)
    }

    /// Starts the coalescer on first use (the store may be built outside a runtime) and
    /// again if its runtime went away (each `#[tokio::test]` has its own).
    fn ensure_coalescer(&self, pool: &PgPool) {
        let mut slot = self
            .coalescer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut appended = self.appended.subscribe();
        // The append that starts us must be announced too.
        appended.mark_changed();
        let options = (*pool.connect_options()).clone();
        let notifier = Arc::clone(&self.notifier);
        *slot = Some(runtime.spawn(coalesce_notifications(appended, options, notifier)));
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // The task also ends by itself once the sender is gone; aborting is just quicker.
        if let Ok(mut slot) = self.coalescer.lock() {
            if let Some(task) = slot.take() {
                task.abort();
            }
        }
        if let Some(task) = self.listener.get_mut().take() {
            task.abort();
        }
    }
}

/// Sends one NOTIFY per burst of appends until the store is dropped.
async fn coalesce_notifications(
    mut appended: watch::Receiver<u64>,
    options: PgConnectOptions,
    notifier: Arc<AtomicU32>,
) {
    let mut conn: Option<PgConnection> = None;
    while appended.changed().await.is_ok() {
        appended.borrow_and_update();
        if let Err(error) = notify_once(&mut conn, &options, &notifier).await {
            // Followers elsewhere fall back to polling; the next burst reconnects.
            tracing::warn!(%error, "could not send NOTIFY {CHANNEL}");
            conn = None;
            // The pid may go to another process's backend meanwhile.
            notifier.store(0, Ordering::Relaxed);
        }
        tokio::time::sleep(COALESCE_WINDOW).await;
    }
}

async fn notify_once(
    conn: &mut Option<PgConnection>,
    options: &PgConnectOptions,
    notifier: &AtomicU32,
) -> Result<(), sqlx::Error> {
    let conn = match conn {
        Some(conn) => conn,
        None => {
            let mut fresh = options.connect().await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut fresh)
                .await?;
            notifier.store(u32::try_from(pid).unwrap_or(0), Ordering::Relaxed);
            conn.insert(fresh)
        }
    };
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// Why `Wakeups::wait` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something was appended (in this process or, by notification, in another); there
    /// may be new events to read. Spurious wake-ups are possible.
    Signalled,
    /// The fallback interval ran out: read anyway.
    TimedOut,
}

/// A follower's wake-up source. Read the log, then `wait`, then read again: a signal
/// that arrives while reading is kept, so none is lost between two waits.
#[derive(Debug)]
pub struct Wakeups {
    /// This process's appends.
    local: Signal,
    /// The notifications the store's listener heard from elsewhere.
    remote: Signal,
}

/// One source of wake-ups, and whether its sender is still there: once the store (or
/// its listener) is gone it is not waited on again, and only the others and the
/// fallback remain.
#[derive(Debug)]
struct Signal {
    bumps: watch::Receiver<u64>,
    open: bool,
}

impl Signal {
    fn new(bumps: watch::Receiver<u64>) -> Self {
        Signal { bumps, open: true }
    }

    /// Returns at the next bump, or when the sender is gone.
    async fn changed(&mut self) {
        if self.bumps.changed().await.is_err() {
            self.open = false;
        }
    }
}

impl Wakeups {
    /// `local` announces this process's appends; `remote` the notifications the
    /// store's listener heard from elsewhere ([`Signals::hear`]).
    pub(crate) fn new(local: watch::Receiver<u64>, remote: watch::Receiver<u64>) -> Self {
        Self {
            local: Signal::new(local),
            remote: Signal::new(remote),
        }
    }

    /// Returns when an append happened since the last call, or after `max`.
    pub async fn wait(&mut self, max: Duration) -> Wake {
        tokio::select! {
            () = self.local.changed(), if self.local.open => Wake::Signalled,
            () = self.remote.changed(), if self.remote.open => Wake::Signalled,
            () = tokio::time::sleep(max) => Wake::TimedOut,
        }
    }
}

/// Turns notifications into wake-ups for every follower of the store. A follower
/// that is reading when one arrives sees the bump at its next wait, so none is lost.
/// The store's own notifications are skipped (see the module's note).
async fn forward_notifications(
    mut listener: PgListener,
    heard: watch::Sender<u64>,
    own: Arc<AtomicU32>,
) {
    let wake = || heard.send_modify(|n| *n = n.wrapping_add(1));
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                if notification.process_id() != own.load(Ordering::Relaxed) {
                    wake();
                }
            }
            // The connection dropped and was re-established: notifications may have been
            // missed meanwhile, so let the followers look.
            Ok(None) => wake(),
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::warn!(%error, "LISTEN {CHANNEL} failed; retrying");
                wake();
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}
