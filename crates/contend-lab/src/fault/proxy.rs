//! A delaying TCP proxy: listens on 127.0.0.1 (a port the system picks), forwards every
//! connection to one upstream address, and holds each chunk of bytes for the current delay in
//! each direction before passing it on, in order. The delay can be changed while connections
//! are open ([`DelayProxy::set_delay`]), so latency can appear in the middle of a run. It
//! counts what it delayed, so a run can show that the latency was really there.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the proxy measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Chunks forwarded with a non-zero delay.
    pub delayed_chunks: u64,
    /// Their total time held in the proxy, in microseconds (measured, not configured).
    pub delayed_micros: u64,
}

impl ProxyStats {
    /// The mean time a delayed chunk was held, measured.
    pub fn mean_delay(&self) -> Duration {
        Duration::from_micros(
            self.delayed_micros
                .checked_div(self.delayed_chunks)
                .unwrap_or(0),
        )
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// Client to server.
    delay_up: AtomicU64,
    /// Server to client.
    delay_down: AtomicU64,
    connections: AtomicU64,
    delayed_chunks: AtomicU64,
    delayed_micros: AtomicU64,
}

/// A running proxy; stops accepting (and closes every connection) when dropped.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// Starts a proxy to `upstream` with no delay yet.
    ///
    /// # Errors
    /// The listening socket cannot be bound.
    ///
    /// # Cancel safety
    /// Safe to drop: nothing is running until it returns.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                conns.spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, s).await;
                    }
                });
                // Reap finished connections so the set does not grow without bound.
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(DelayProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the delay of every chunk from now on, in each direction.
    pub fn set_delay(&self, delay: Duration) {
        self.set_delays(delay, delay);
    }

    /// Sets the delay of every chunk from now on: `up` from client to server, `down` from
    /// server to client (a slow answer after a fast request widens the time between a commit
    /// and its acknowledgement).
    pub fn set_delays(&self, up: Duration, down: Duration) {
        let s = &self.shared;
        s.delay_up.store(up.as_micros() as u64, Ordering::Relaxed);
        s.delay_down
            .store(down.as_micros() as u64, Ordering::Relaxed);
    }

    /// What it has measured so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.shared.connections.load(Ordering::Relaxed),
            delayed_chunks: self.shared.delayed_chunks.load(Ordering::Relaxed),
            delayed_micros: self.shared.delayed_micros.load(Ordering::Relaxed),
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.accept.abort();
    }
}

/// Forwards both directions until either side closes.
async fn pipe(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = one_way(cr, sw, shared.clone(), Direction::Up);
    let down = one_way(sr, cw, shared, Direction::Down);
    // When one direction ends, the other is dropped with it: the connection is over.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// Reads chunks from `from` and writes each to `to` once its delay has passed, in order.
async fn one_way(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    direction: Direction,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Instant, Vec<u8>)>();
    let counters = shared.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let now = Instant::now();
                    let micros = match direction {
                        Direction::Up => &shared.delay_up,
                        Direction::Down => &shared.delay_down,
                    };
                    let delay = Duration::from_micros(micros.load(Ordering::Relaxed));
                    if !delay.is_zero() {
                        shared.delayed_chunks.fetch_add(1, Ordering::Relaxed);
                    }
                    if tx.send((now, now + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((read_at, due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if due > read_at {
                let held = read_at.elapsed().as_micros() as u64;
                counters.delayed_micros.fetch_add(held, Ordering::Relaxed);
            }
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a port the system picks.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        stream.write_all(payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        stream.read_exact(&mut back).await.unwrap();
        (back, started.elapsed())
    }

    #[tokio::test]
    async fn forwards_bytes_in_order_and_adds_the_delay_when_set() {
        let proxy = DelayProxy::start(echo().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();

        let (back, _) = round_trip(&mut stream, &payload).await;
        assert_eq!(back, payload, "bytes arrive intact and in order");
        assert_eq!(proxy.stats().delayed_chunks, 0, "no delay set yet");

        // The delay is switched on with the connection open: each round trip now crosses the
        // proxy twice (there and back), so it takes at least twice the delay.
        proxy.set_delay(Duration::from_millis(40));
        let (back, took) = round_trip(&mut stream, b"ping").await;
        assert_eq!(back, b"ping");
        assert!(
            took >= Duration::from_millis(80),
            "round trip took {took:?}"
        );

        // Only the way back delayed: the round trip still pays it once.
        proxy.set_delays(Duration::ZERO, Duration::from_millis(40));
        let (back, took) = round_trip(&mut stream, b"pong").await;
        assert_eq!(back, b"pong");
        assert!(
            took >= Duration::from_millis(40),
            "round trip took {took:?}"
        );

        proxy.set_delay(Duration::ZERO);
        let (back, _) = round_trip(&mut stream, &payload).await;
        assert_eq!(back, payload);
        drop(stream);

        // The counters settle once the connection's tasks end.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = proxy.stats();
        assert_eq!(stats.connections, 1);
        assert!(stats.delayed_chunks >= 3, "{stats:?}");
        assert!(stats.mean_delay() >= Duration::from_millis(40), "{stats:?}");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let proxy = DelayProxy::start(echo().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (back, _) = round_trip(&mut stream, b"x").await;
        assert_eq!(back, b"x");
        drop(proxy);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the client sees the connection closed: {read:?}"
        );
    }
}
