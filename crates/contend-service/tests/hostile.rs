//! Hostile clients at the socket: headers that trickle in (slowloris), bodies sent slowly, idle
//! keep-alive connections and connection floods are cut or refused by the service's
//! [`Limits`], while a legitimate client keeps getting correct answers.
//!
//! Each test runs a service on SQLite with small limits (about a second) and asserts that the
//! server closes the hostile connection within the limit plus a margin: without the limit the
//! connection stays open and the test fails (the hostile clients give up after
//! `limit + MARGIN`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{ADMIN, Api, Kind, Resp, TestDb};
use contend_service::{AppState, Config, Limits};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Time allowed beyond a limit for the server to act on it (timer granularity, a busy test
/// machine).
const MARGIN: Duration = Duration::from_secs(2);

/// A limit that the test does not exercise: far beyond the test's duration.
const LONG: Duration = Duration::from_secs(120);

struct Service {
    addr: SocketAddr,
    _db: TestDb,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(limits: Limits) -> Service {
    let db = TestDb::new(Kind::Sqlite).await;
    let pool = contend::Db::builder(&db.url)
        .max_connections(4)
        .connect()
        .await
        .expect("connect");
    contend_service::migrate::run(&pool).await.expect("migrate");
    let mut config = Config::new(pool, ADMIN);
    config.limits = limits;
    config.shutdown_grace = Duration::from_secs(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(contend_service::serve(
        listener,
        AppState::new(config),
        async move {
            let _ = stopped.await;
        },
    ));
    Service {
        addr,
        _db: db,
        stop: Some(stop),
    }
}

fn limits(header: Duration, body: Duration, idle: Duration, max_clients: usize) -> Limits {
    Limits {
        header_timeout: header,
        body_timeout: body,
        idle_timeout: idle,
        max_clients,
    }
}

/// What a hostile connection saw before it gave up.
#[derive(Debug)]
struct Ending {
    /// When the server closed the connection (since the connection was opened), if it did.
    closed_after: Option<Duration>,
    /// What the server sent before closing.
    received: Vec<u8>,
}

/// Opens a connection, sends `first`, then one of `then` every `every` (cycling), until the
/// server closes the connection or `give_up` has passed.
async fn trickle(
    addr: SocketAddr,
    first: &[u8],
    then: &[&[u8]],
    every: Duration,
    give_up: Duration,
) -> Ending {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut received = Vec::new();
    let _ = stream.write_all(first).await;
    let mut next = 0;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    return Ending { closed_after: Some(started.elapsed()), received };
                }
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick() => {
                if started.elapsed() >= give_up {
                    return Ending { closed_after: None, received };
                }
                if !then.is_empty() {
                    // A write may fail once the server has closed; the read reports it.
                    let _ = stream.write_all(then[next % then.len()]).await;
                    next += 1;
                }
            }
        }
    }
}

fn assert_closed_within(ending: &Ending, limit: Duration, what: &str) {
    let closed = ending.closed_after.unwrap_or_else(|| {
        panic!(
            "{what}: still open after {:?} (limit {limit:?}); received {:?}",
            limit + MARGIN,
            String::from_utf8_lossy(&ending.received)
        )
    });
    assert!(
        closed <= limit + MARGIN,
        "{what}: closed only after {closed:?} (limit {limit:?})"
    );
}

/// A legitimate client running beside the hostile ones: a fresh connection per request, an
/// account it deposits 1 into and reads back, checking every answer. Returns how many
/// deposit-and-read rounds were right; panics on a wrong or failed one.
async fn legit_rounds(api: Api, stop: Arc<AtomicBool>) -> u64 {
    let r = api
        .send(
            "POST",
            "/accounts",
            Some(ADMIN),
            &[],
            Some(br#"{"owner": "legit", "balance": 0}"#),
        )
        .await
        .expect("create account");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.id();
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) {
        let r = api
            .send(
                "POST",
                &format!("/accounts/{id}/deposit"),
                Some(ADMIN),
                &[],
                Some(br#"{"amount": 1}"#),
            )
            .await
            .expect("deposit");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let r = api
            .send("GET", &format!("/accounts/{id}"), Some(ADMIN), &[], None)
            .await
            .expect("read back");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        rounds += 1;
        assert_eq!(r.json()["balance"], json!(rounds), "balance after {rounds}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rounds
}

/// Runs [`legit_rounds`] while `hostile` runs; asserts that it got right answers throughout.
async fn with_legit_client<T>(addr: SocketAddr, hostile: impl Future<Output = T>) -> T {
    let stop = Arc::new(AtomicBool::new(false));
    let legit = tokio::spawn(legit_rounds(Api { addr }, stop.clone()));
    let out = hostile.await;
    stop.store(true, Ordering::Relaxed);
    let rounds = legit.await.expect("the legitimate client failed");
    assert!(
        rounds >= 5,
        "the legitimate client finished only {rounds} rounds"
    );
    out
}

/// A keep-alive HTTP/1.1 connection that sends requests one after the other.
struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    async fn open(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn get(&mut self, path: &str) -> std::io::Result<Resp> {
        let head =
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\r\n");
        self.stream.write_all(head.as_bytes()).await?;
        self.read_response().await
    }

    /// Reads one response with a Content-Length body.
    async fn read_response(&mut self) -> std::io::Result<Resp> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let raw: Vec<u8> = self.buf.drain(..end + 4 + len).collect();
                    let mut lines = head.split("\r\n");
                    let status = lines
                        .next()
                        .and_then(|l| l.split(' ').nth(1))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let headers = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    return Ok(Resp {
                        status,
                        headers,
                        body: raw[end + 4..].to_vec(),
                    });
                }
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Waits until the server closes the connection or `give_up` passes; returns how long it
    /// took, if it was closed.
    async fn closed_within(&mut self, give_up: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut chunk = [0u8; 256];
        match tokio::time::timeout(give_up, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Some(started.elapsed()),
            Ok(Ok(n)) => panic!(
                "unexpected bytes on an idle connection: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(_) => None,
        }
    }
}

/// Slowloris: connections that send a request line and then one header line every 200 ms,
/// never the blank line, are closed (without an answer) within the header timeout, counted
/// from accept; so is a connection that sends nothing. A legitimate client meanwhile gets
/// right answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_are_cut_at_the_header_timeout() {
    let header = Duration::from_secs(1);
    let service = start(limits(header, LONG, LONG, 200)).await;
    let addr = service.addr;
    let endings = with_legit_client(addr, async {
        let mut clients = Vec::new();
        for _ in 0..50 {
            clients.push(tokio::spawn(async move {
                trickle(
                    addr,
                    b"GET /healthz HTTP/1.1\r\nHost: t\r\n",
                    &[b"X-Slow: 1\r\n"],
                    Duration::from_millis(200),
                    header + MARGIN,
                )
                .await
            }));
        }
        let silent = trickle(addr, b"", &[], Duration::from_millis(200), header + MARGIN).await;
        let mut endings = vec![silent];
        for c in clients {
            endings.push(c.await.unwrap());
        }
        endings
    })
    .await;
    for (i, ending) in endings.iter().enumerate() {
        assert_closed_within(ending, header, &format!("slow client {i}"));
        assert!(
            ending.received.is_empty(),
            "slow client {i} got an answer: {:?}",
            String::from_utf8_lossy(&ending.received)
        );
    }
}

/// A request whose body arrives one byte every 200 ms (each byte well within a second: a
/// timeout between reads would never fire) is answered 408 `body_timeout` with
/// `Connection: close`, and the connection is closed, within the body timeout; a body that
/// trickles in but completes in time is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_are_cut_at_the_body_timeout() {
    let body = Duration::from_secs(1);
    let service = start(limits(LONG, body, LONG, 200)).await;
    let addr = service.addr;
    let head = |len: usize| {
        format!(
            "POST /accounts HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let (slow, in_time) = with_legit_client(addr, async {
        let slow_body = br#"{"owner": "slow", "balance": 5}"#;
        let slow = tokio::spawn({
            let head = head(slow_body.len() + 4096);
            async move {
                let bytes: Vec<&[u8]> = slow_body.chunks(1).collect();
                trickle(
                    addr,
                    head.as_bytes(),
                    &bytes,
                    Duration::from_millis(200),
                    body + MARGIN,
                )
                .await
            }
        });
        // A body in three pieces, 150 ms apart: complete well within the second.
        let in_time_body = br#"{"owner": "in time", "balance": 7}"#;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(head(in_time_body.len()).as_bytes())
            .await
            .unwrap();
        for piece in in_time_body.chunks(in_time_body.len() / 3 + 1) {
            tokio::time::sleep(Duration::from_millis(150)).await;
            stream.write_all(piece).await.unwrap();
        }
        let mut client = KeepAlive {
            stream,
            buf: Vec::new(),
        };
        let in_time = client.read_response().await.expect("in-time body answered");
        (slow.await.unwrap(), in_time)
    })
    .await;
    assert_eq!(
        in_time.status,
        201,
        "{}",
        String::from_utf8_lossy(&in_time.body)
    );
    assert_eq!(in_time.json()["balance"], json!(7));
    assert_closed_within(&slow, body, "slow body");
    let text = String::from_utf8_lossy(&slow.received).to_string();
    let end = text.find("\r\n\r\n").expect("an answer before the close");
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(
        text[..end]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{text}"
    );
    let answer: serde_json::Value = serde_json::from_str(&text[end + 4..]).expect("JSON body");
    assert_eq!(answer["error"]["code"], json!("body_timeout"), "{text}");
}

/// A keep-alive connection that has had its answer and sends nothing more is closed within the
/// idle timeout; one that keeps sending requests is not; and the idle wait is not the header
/// clock (a connection may rest longer than the header timeout between requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_at_the_idle_timeout() {
    let header = Duration::from_secs(1);
    let idle = Duration::from_millis(2500);
    let service = start(limits(header, LONG, idle, 200)).await;
    let addr = service.addr;
    with_legit_client(addr, async {
        // Busy: a request every 300 ms for 4 s (beyond the idle timeout), all answered.
        let busy = tokio::spawn(async move {
            let mut client = KeepAlive::open(addr).await;
            let started = Instant::now();
            let mut answered = 0;
            while started.elapsed() < Duration::from_secs(4) {
                let r = client.get("/healthz").await.expect("busy keep-alive");
                assert_eq!(r.status, 200);
                answered += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            answered
        });
        let mut client = KeepAlive::open(addr).await;
        let r = client.get("/healthz").await.unwrap();
        assert_eq!(r.status, 200);
        // Rest longer than the header timeout, less than the idle timeout: still served.
        tokio::time::sleep(header + Duration::from_millis(500)).await;
        let r = client.get("/healthz").await.expect("after a rest");
        assert_eq!(r.status, 200);
        let closed = client.closed_within(idle + MARGIN).await;
        let closed = closed.unwrap_or_else(|| {
            panic!(
                "an idle keep-alive connection still open after {:?}",
                idle + MARGIN
            )
        });
        assert!(
            closed >= idle - Duration::from_millis(500),
            "closed early: {closed:?}"
        );
        assert!(busy.await.unwrap() >= 10);
    })
    .await;
}

/// With `max_clients` connections open (one legitimate keep-alive connection and hostile ones
/// that send nothing), a new connection is answered 503 `too_many_connections` with
/// `Retry-After` and `Connection: close`, and closed; the legitimate connection keeps getting
/// answers; once the hostile ones are cut (header timeout), new connections are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_cap_new_connections_are_refused_clearly() {
    let header = Duration::from_secs(2);
    let max = 20;
    let service = start(limits(header, LONG, LONG, max)).await;
    let addr = service.addr;
    let mut legit = KeepAlive::open(addr).await;
    let r = legit.get("/healthz").await.unwrap();
    assert_eq!(r.status, 200);
    let started = Instant::now();
    let mut hostile = Vec::new();
    for _ in 0..max - 1 {
        hostile.push(TcpStream::connect(addr).await.unwrap());
    }
    // The server takes the hostile connections in accept order; the next is over the cap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = Api { addr }
        .send("GET", "/healthz", None, &[], None)
        .await
        .expect("an answer");
    assert!(
        started.elapsed() < header,
        "too slow to test before the header timeout"
    );
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.code(), "too_many_connections");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("connection"), Some("close"));
    // The legitimate keep-alive connection is still served while the cap is reached.
    for _ in 0..5 {
        let r = legit.get("/healthz").await.expect("legit while at the cap");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], json!("ok"));
    }
    // The hostile connections are cut at the header timeout; then new ones are served.
    for (i, stream) in hostile.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        let left = (header + MARGIN).saturating_sub(started.elapsed());
        let read = tokio::time::timeout(left, stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "hostile connection {i} still open after the header timeout: {read:?}"
        );
    }
    let r = Api { addr }
        .send("GET", "/healthz", None, &[], None)
        .await
        .expect("served again");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = legit.get("/healthz").await.expect("legit after the flood");
    assert_eq!(r.status, 200);
}

/// A flood far beyond the cap: the connections beyond the refusals in progress are closed at
/// once, none is left open past the header timeout, and the legitimate client (fresh
/// connections once the flood has been cut) gets right answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_bounded() {
    // Long enough for the whole flood to connect before the first refusals end.
    let header = Duration::from_secs(3);
    let max = 50;
    let service = start(limits(header, LONG, LONG, max)).await;
    let addr = service.addr;
    let flood = max + contend_service::conn::REFUSING_AT_ONCE + 100;
    let mut clients = Vec::new();
    for _ in 0..flood {
        clients.push(tokio::spawn(async move {
            trickle(
                addr,
                b"GET /healthz HTTP/1.1\r\nHost: t\r\n",
                &[b"X-Slow: 1\r\n"],
                Duration::from_millis(200),
                header + MARGIN,
            )
            .await
        }));
    }
    let (mut open_past_limit, mut closed_early) = (0, 0);
    for c in clients {
        let ending = c.await.unwrap();
        match ending.closed_after {
            Some(t) if t < header => closed_early += 1,
            Some(t) if t <= header + MARGIN => {}
            _ => open_past_limit += 1,
        }
    }
    assert_eq!(
        open_past_limit,
        0,
        "{open_past_limit} of {flood} flooding connections were still open after {:?}",
        header + MARGIN
    );
    // Those beyond the cap and the refusals in progress were not kept until the timeout.
    assert!(
        closed_early >= 100,
        "only {closed_early} of {flood} flooding connections were closed before the header timeout"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let legit = tokio::spawn(legit_rounds(Api { addr }, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(legit.await.expect("legitimate client") >= 1);
}
