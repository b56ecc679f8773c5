//! What one client connection may hold: the accept loop of [`serve`](crate::serve) with a cap on
//! open connections, and per connection the header, idle and body clocks of [`Limits`].
//!
//! hyper serves each connection (HTTP/1.1, as `axum::serve` did). hyper's own
//! `header_read_timeout` starts its clock whenever a connection waits for a request, so it
//! cannot tell a keep-alive connection resting between requests from a client trickling a
//! header in: used alone it would make the idle timeout and the header timeout one number. So
//! each connection here has an activity record that sees the bytes read and the requests handled,
//! and a watcher that drops the connection when the clock of its current phase runs out:
//! - *head*: from accept, or from the first byte after an idle wait, until the request head is
//!   complete: [`Limits::header_timeout`];
//! - *busy*: a request is being handled (its body read by the handler, bounded by
//!   [`Limits::body_timeout`] and the request timeout): no connection clock;
//! - *idle*: from the end of a request's handling until the next byte:
//!   [`Limits::idle_timeout`] (this also bounds a client that does not read its response).
//!
//! Refused connections (over [`Limits::max_clients`]) are answered by hyper too, with
//! `keep_alive(false)` and hyper's `header_read_timeout`, which is exactly right for one request.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::error::ApiError;

/// Limits on what client connections may hold. The defaults suit a service on the open
/// network; tests set them small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest time a connection may take to send a complete request head (request line and
    /// headers), counted from accept for the first request and from the first byte for the
    /// next ones. A connection over it is closed without an answer (slowloris).
    pub header_timeout: Duration,
    /// Longest time a request's body may take to arrive, counted from the end of its head.
    /// Over it the request is answered 408 `body_timeout` with `Connection: close`.
    pub body_timeout: Duration,
    /// Longest time a keep-alive connection may stay open between requests (from the end of a
    /// request's handling to the first byte of the next); then it is closed. This also bounds
    /// how long a client may take to read a response.
    pub idle_timeout: Duration,
    /// Most client connections open at once. Beyond it, a new connection is answered 503
    /// `too_many_connections` (with `Retry-After` and `Connection: close`) and closed, up to
    /// [`REFUSING_AT_ONCE`] such answers at a time; connections beyond those are closed at
    /// once. Zero counts as one.
    pub max_clients: usize,
}

impl Default for Limits {
    /// 10 s header timeout, 10 s body timeout, 60 s idle timeout, 512 client connections.
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_clients: 512,
        }
    }
}

/// Most refusals (503 `too_many_connections`) in progress at once; each holds its connection
/// for at most the header timeout plus one second (for the client to read the answer).
pub const REFUSING_AT_ONCE: usize = 64;

/// How long a refused client gets to read its 503 after sending its request head.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` until `shutdown` resolves and serves each on a task of its
/// own under `limits`; then closes idle connections, waits at most `grace` for the others and
/// returns.
pub(crate) async fn run<S>(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    grace: Duration,
    shutdown: S,
) -> std::io::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_clients.max(1)));
    let refusals = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let graceful = GracefulShutdown::new();
    let warned = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // EMFILE and the like: wait for connections to close rather than spin.
                        tracing::error!(error = %e, "accept error");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(serve_connection(
                    stream,
                    router.clone(),
                    limits,
                    graceful.watcher(),
                    slot,
                ));
            }
            Err(_) => {
                // At most one warning a second.
                let now = started.elapsed().as_secs() + 1;
                if warned.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(
                        max_clients = limits.max_clients,
                        "connection limit reached: refusing new connections"
                    );
                }
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(refuse(stream, limits, permit));
                }
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests did not finish within the grace period");
        }
    }
    Ok(())
}

/// Errors of one connection that says nothing about the listener (axum's list).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Serves one connection until the client closes it, a limit closes it, or shutdown.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    graceful: Watcher,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let busy = Busy::begin(&activity);
            let call = router.clone().oneshot(req.map(Body::new));
            async move {
                let response = call.await;
                drop(busy);
                response
            }
        })
    };
    let mut builder = http1::Builder::new();
    // The watcher below keeps the header clock (see the module docs).
    builder.header_read_timeout(None);
    let conn = graceful.watch(builder.serve_connection(io, service));
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        reason = activity.expired(&limits) => {
            tracing::debug!(reason, "closing connection");
        }
    }
}

/// Answers one connection over the cap with 503 `too_many_connections` and closes it.
async fn refuse(stream: TcpStream, limits: Limits, _permit: OwnedSemaphorePermit) {
    let max = limits.max_clients;
    let service = service_fn(move |_req: Request<Incoming>| async move {
        Ok::<_, Infallible>(too_many_connections(max))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(limits.header_timeout + REFUSAL_WRITE, conn).await;
}

/// 503 `too_many_connections` with `Retry-After` and `Connection: close`.
fn too_many_connections(max: usize) -> Response {
    let mut response = ApiError::unavailable(
        "too_many_connections",
        format!("the service has {max} client connections open, its limit; try again"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// 408 `body_timeout` with `Connection: close`: the body did not arrive within `limit`.
pub(crate) fn body_timeout(limit: Duration) -> Response {
    let mut response = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!(
            "the request body did not arrive within {} ms",
            limit.as_millis()
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Where a connection is: see the module docs.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head, since then.
    Head(Instant),
    /// Handling this many requests.
    Busy(usize),
    /// Between requests, since then.
    Idle(Instant),
}

/// The phase of one connection, told to its watcher on every change.
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            phase: Mutex::new(Phase::Head(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(Phase) -> Phase) {
        let Ok(mut phase) = self.phase.lock() else {
            return;
        };
        *phase = f(*phase);
        drop(phase);
        // One watcher: a notification sent while it is not waiting is kept for its next wait.
        self.changed.notify_one();
    }

    /// Bytes arrived: an idle connection starts a request head.
    fn read(&self) {
        let idle = matches!(self.phase.lock().as_deref(), Ok(Phase::Idle(_)));
        if idle {
            self.update(|phase| match phase {
                Phase::Idle(_) => Phase::Head(Instant::now()),
                other => other,
            });
        }
    }

    /// Resolves when the clock of the current phase has run out, with the limit's name.
    ///
    /// # Cancel safety
    /// Safe to drop; it changes nothing.
    async fn expired(&self, limits: &Limits) -> &'static str {
        loop {
            let phase = match self.phase.lock() {
                Ok(phase) => *phase,
                Err(_) => return "poisoned",
            };
            let (deadline, reason) = match phase {
                Phase::Head(since) => (since + limits.header_timeout, "header_timeout"),
                Phase::Idle(since) => (since + limits.idle_timeout, "idle_timeout"),
                Phase::Busy(_) => {
                    self.changed.notified().await;
                    continue;
                }
            };
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep_until(deadline.into()) => {
                    let unchanged = self.phase.lock().is_ok_and(|now| match (*now, phase) {
                        (Phase::Head(a), Phase::Head(b)) | (Phase::Idle(a), Phase::Idle(b)) => a == b,
                        _ => false,
                    });
                    if unchanged {
                        return reason;
                    }
                }
            }
        }
    }
}

/// One request being handled on a connection; the connection is idle again when the last ends.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: &Arc<Activity>) -> Busy {
        activity.update(|phase| match phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        });
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.update(|phase| match phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }
}

/// A TCP stream that tells its connection's [`Activity`] when bytes arrive.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that must end before a deadline; past it, it fails and sets `expired` (the
/// extractor turns any body error into 413, so the edge layer reads the flag and answers 408).
pub(crate) struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

impl DeadlineBody {
    /// `inner`, which must end within `limit` from now.
    pub(crate) fn new(inner: Body, limit: Duration, expired: Arc<AtomicBool>) -> DeadlineBody {
        DeadlineBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(limit)),
            expired,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new("request body timeout"))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
