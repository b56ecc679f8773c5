//! The client's lease: granted once, kept alive by a background task, and shared by every lock
//! key the client writes. When it expires (keepalive failing for a whole TTL, or the process
//! paused past it) etcd deletes those keys, and every guard on it reports the loss.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Failure, classify};

#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseState {
    /// Until when the lease surely lives: the send time of the last confirmed keepalive (or of
    /// the grant) plus the TTL etcd answered.
    pub valid_until: Instant,
    /// Set once the lease is known to be gone (etcd said so, or `valid_until` passed without
    /// a renewal).
    pub lost: bool,
}

/// A granted lease and its keepalive task.
pub(crate) struct Lease {
    id: i64,
    state: Arc<watch::Sender<LeaseState>>,
    keepalive: Option<JoinHandle<()>>,
    client: Client,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = *self.state.borrow();
        f.debug_struct("Lease")
            .field("id", &format_args!("{:x}", self.id))
            .field("lost", &s.lost)
            .finish()
    }
}

/// What the keepalive task needs.
pub(crate) struct KeepAlive {
    pub client: Client,
    pub ttl: Duration,
    pub request_timeout: Duration,
    pub requests: Arc<AtomicU64>,
}

impl Lease {
    /// Wraps the lease `id`, granted at `sent` with `ttl`, and starts its keepalive.
    pub fn start(id: i64, sent: Instant, keep: KeepAlive) -> Lease {
        let (tx, _) = watch::channel(LeaseState {
            valid_until: sent + keep.ttl,
            lost: false,
        });
        let state = Arc::new(tx);
        let client = keep.client.clone();
        let keepalive = Some(tokio::spawn(keep_alive(id, keep, state.clone())));
        Lease {
            id,
            state,
            keepalive,
            client,
        }
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// True once the lease is gone or its validity ran out without renewal.
    pub fn is_lost(&self) -> bool {
        let s = *self.state.borrow();
        s.lost || Instant::now() >= s.valid_until
    }

    pub fn valid_until(&self) -> Instant {
        self.state.borrow().valid_until
    }

    /// Marks the lease lost (etcd refused it).
    pub fn mark_lost(&self) {
        self.state.send_modify(|s| s.lost = true);
    }

    /// Completes when the lease is known to be gone: etcd said so, or the keepalive gave up (no
    /// renewal confirmed for a whole TTL, and the keepalive in flight then unanswered for a
    /// request timeout). Unlike [`Lease::lost`], a validity that ran out while a keepalive is
    /// still in flight does not complete it: a late positive answer proves that etcd renewed
    /// the lease before it expired (etcd does not renew an expired lease), so the keys
    /// written under it were never deleted.
    pub fn gone(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.state.subscribe();
        async move {
            // An error means the keepalive task and the lease are gone: so is the lease.
            let _ = rx.wait_for(|s| s.lost).await;
        }
    }

    /// The keepalive's verdict on the lease: `true` at once while it is valid, or as soon as a
    /// keepalive confirms it again after its validity ran out; `false` once it is gone
    /// ([`Lease::gone`]). The keepalive decides within a request timeout of the lapse.
    pub async fn confirmed(&self) -> bool {
        let mut rx = self.state.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            if s.lost {
                return false;
            }
            if Instant::now() < s.valid_until {
                return true;
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Completes when the lease is lost, or its validity runs out without renewal.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.state.subscribe();
        async move {
            loop {
                let s = *rx.borrow_and_update();
                if s.lost {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    _ = tokio::time::sleep_until(s.valid_until.into()) => {
                        if !rx.has_changed().unwrap_or(false) {
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(task) = self.keepalive.take() {
            task.abort();
        }
        if self.state.borrow().lost {
            return;
        }
        self.state.send_modify(|s| s.lost = true);
        // No guard and no client uses the lease any more: revoke it so that nothing written
        // under it lingers for a TTL.
        let (mut lease, id) = (self.client.lease_client(), self.id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let revoke = lease.revoke(id);
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), revoke).await {
                    tracing::debug!(error = %e, "revoking an unused etcd lease failed; it expires");
                }
            });
        }
    }
}

/// The keepalive task: a keepalive every third of the TTL on one stream, re-opened (on another
/// member) when it breaks; the lease is lost when etcd says so or when no renewal was confirmed
/// for a whole TTL.
async fn keep_alive(id: i64, keep: KeepAlive, state: Arc<watch::Sender<LeaseState>>) {
    let period = keep.ttl / 3;
    let mut lease = keep.client.lease_client();
    loop {
        if Instant::now() >= state.borrow().valid_until {
            tracing::warn!(lease = %format_args!("{id:x}"), "etcd lease lost: no keepalive confirmed for a whole TTL");
            state.send_modify(|s| s.lost = true);
            return;
        }
        keep.requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let opened = tokio::time::timeout(keep.request_timeout, lease.keep_alive(id)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => {
                // Opening the stream sent one keepalive and read its (positive) answer.
                state.send_modify(|s| s.valid_until = s.valid_until.max(sent + keep.ttl));
                pair
            }
            Ok(Err(e)) if classify(&e) == Failure::LeaseGone => {
                tracing::warn!(lease = %format_args!("{id:x}"), "etcd lease lost: etcd no longer knows it");
                state.send_modify(|s| s.lost = true);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "opening the etcd keepalive stream failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => continue,
        };
        let mut last_sent = sent;
        loop {
            // A fixed cadence from the last send, not from its answer: after a late answer
            // the next keepalive goes at once, before the validity that answer gave runs out.
            tokio::time::sleep_until((last_sent + period).into()).await;
            keep.requests.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            last_sent = sent;
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(keep.request_timeout, stream.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                    let ttl = Duration::from_secs(answer.ttl().unsigned_abs());
                    state.send_modify(|s| s.valid_until = sent + ttl);
                }
                Ok(Ok(Some(_))) => {
                    tracing::warn!(lease = %format_args!("{id:x}"), "etcd lease lost: it had expired");
                    state.send_modify(|s| s.lost = true);
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
            }
            if Instant::now() >= state.borrow().valid_until {
                break;
            }
        }
    }
}
