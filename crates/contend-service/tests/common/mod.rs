//! Test support: throwaway databases per backend, in-process service instances on
//! 127.0.0.1:0, and a tiny raw HTTP/1.1 client (so tests can send exactly the bytes they mean).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use contend::strategy::Strategy;
use contend_service::{AppState, Config};
use rand::Rng;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const ADMIN: &str = "test-admin-token";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
    MySql,
}

/// Whether tests run on `kind` here: SQLite always, a server when its URL is set (else
/// "skipped: ...", or a panic when servers are required: `contend_test_support::env_url`).
pub fn enabled(kind: Kind) -> bool {
    match kind {
        Kind::Sqlite => true,
        Kind::Postgres => contend_test_support::env_url("CONTEND_PG_URL").is_some(),
        Kind::MySql => contend_test_support::env_url("CONTEND_MYSQL_URL").is_some(),
    }
}

/// A test made by `contend_test_support::on_backends!` takes the `Kind` it runs on: SQLite
/// always, a server when its URL is set (see [`contend_test_support::env_url`]).
impl contend_test_support::OnBackend for Kind {
    async fn open(backend: contend::Backend) -> Option<Kind> {
        let kind = match backend {
            contend::Backend::Postgres => Kind::Postgres,
            contend::Backend::MySql => Kind::MySql,
            _ => Kind::Sqlite,
        };
        enabled(kind).then_some(kind)
    }
}

/// The backends to test: SQLite always; PostgreSQL and MariaDB when their URL is set.
pub fn kinds() -> Vec<Kind> {
    let mut kinds = vec![Kind::Sqlite];
    for (var, kind) in [
        ("CONTEND_PG_URL", Kind::Postgres),
        ("CONTEND_MYSQL_URL", Kind::MySql),
    ] {
        if contend_test_support::env_url(var).is_some() {
            kinds.push(kind);
        }
    }
    kinds
}

/// A database of its own for one test, dropped by [`TestDb::drop_db`].
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    name: String,
    admin_url: String,
    _dir: Option<tempfile::TempDir>,
}

fn replace_db(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{name}{query}")
}

impl TestDb {
    pub async fn new(kind: Kind) -> TestDb {
        let name = format!("svc_test_{:016x}", rand::rng().random::<u64>());
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite:{}", dir.path().join("svc.db").display());
                TestDb {
                    kind,
                    url,
                    name,
                    admin_url: String::new(),
                    _dir: Some(dir),
                }
            }
            Kind::Postgres | Kind::MySql => {
                let var = if kind == Kind::Postgres {
                    "CONTEND_PG_URL"
                } else {
                    "CONTEND_MYSQL_URL"
                };
                let admin_url = std::env::var(var).expect("server URL");
                let admin = contend::Db::connect(&admin_url)
                    .await
                    .expect("connect admin");
                admin
                    .execute_script(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create database");
                admin.pool().close().await;
                TestDb {
                    kind,
                    url: replace_db(&admin_url, &name),
                    name,
                    admin_url,
                    _dir: None,
                }
            }
        }
    }

    /// The URL of this test's database on the server behind `base` (another address of the
    /// same server, such as a pgbouncer in front of it).
    pub fn url_through(&self, base: &str) -> String {
        replace_db(base, &self.name)
    }

    /// Drops the database (server backends).
    pub async fn drop_db(self) {
        if self.kind == Kind::Sqlite {
            return;
        }
        let admin = contend::Db::connect(&self.admin_url)
            .await
            .expect("connect admin");
        let sql = if self.kind == Kind::Postgres {
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)
        } else {
            format!("DROP DATABASE IF EXISTS {}", self.name)
        };
        if let Err(e) = admin.execute_script(&sql).await {
            eprintln!("could not drop {}: {e}", self.name);
        }
        admin.pool().close().await;
    }
}

/// One running service instance.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub struct Options {
    pub strategy: Strategy,
    pub allow_header: bool,
    pub max_connections: u32,
    /// Redis namespace; `Some` connects the Redis locks named by `CONTEND_REDIS_URL` and
    /// `CONTEND_REDLOCK_URLS` (when set).
    pub redis_namespace: Option<String>,
}

/// `CONTEND_REDIS_URL`, when set (panics when not and servers are required).
pub fn redis_url() -> Option<String> {
    contend_test_support::env_url("CONTEND_REDIS_URL")
}

/// `CONTEND_REDLOCK_URLS`, when set.
pub fn redlock_urls() -> Option<Vec<String>> {
    contend_test_support::env_urls("CONTEND_REDLOCK_URLS")
}

/// `CONTEND_ETCD_URLS`, when set.
pub fn etcd_urls() -> Option<Vec<String>> {
    contend_test_support::env_urls("CONTEND_ETCD_URLS")
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strategy: Strategy::Atomic,
            allow_header: true,
            max_connections: 16,
            redis_namespace: None,
        }
    }
}

impl Server {
    pub async fn start(url: &str, options: Options) -> Server {
        Server::start_migrated_on(url, None, options).await
    }

    /// [`Server::start`], with the migrations applied on `migrate_url` when given (a direct
    /// URL of the database that `url` reaches through a transaction pooler).
    pub async fn start_migrated_on(
        url: &str,
        migrate_url: Option<&str>,
        options: Options,
    ) -> Server {
        let db = contend::Db::builder(url)
            .max_connections(options.max_connections)
            .acquire_timeout(Duration::from_secs(3))
            .connect()
            .await
            .expect("connect");
        match migrate_url {
            Some(direct) => {
                let direct = contend::Db::connect(direct).await.expect("connect direct");
                contend_service::migrate::run(&direct)
                    .await
                    .expect("migrate");
                direct.pool().close().await;
            }
            None => contend_service::migrate::run(&db).await.expect("migrate"),
        }
        let mut config = Config::new(db, ADMIN);
        config.strategy = options.strategy;
        config.allow_strategy_header = options.allow_header;
        config.shutdown_grace = Duration::from_secs(10);
        if let Some(ns) = &options.redis_namespace {
            if let Some(url) = redis_url() {
                let locks = contend_service::redis_locks::RedisLocks::single(&url, ns).await;
                config.redis = Some(locks.expect("connect redis"));
            }
            if let Some(urls) = redlock_urls() {
                let locks = contend_service::redis_locks::RedisLocks::redlock(&urls, ns).await;
                config.redlock = Some(locks.expect("connect redlock"));
            }
        }
        #[cfg(feature = "etcd")]
        if options.strategy == Strategy::Etcd
            && let Some(ns) = &options.redis_namespace
            && let Some(urls) = etcd_urls()
        {
            let locks = contend_service::redis_locks::etcd(&urls, ns).await;
            config.etcd = Some(locks.expect("connect etcd"));
        }
        let state = AppState::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(contend_service::serve(
            listener,
            state.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            addr,
            state,
            shutdown: Some(tx),
            task,
        }
    }

    /// Begins graceful shutdown and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .expect("server task")
            .expect("server result");
    }

    /// Begins graceful shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(self) {
        self.task
            .await
            .expect("server task")
            .expect("server result");
    }

    pub fn api(&self) -> Api {
        Api { addr: self.addr }
    }
}

/// A response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The error code of an error body.
    pub fn code(&self) -> String {
        let v = self.json();
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {v}"));
        assert!(
            v["error"]["message"].is_string(),
            "error without message: {v}"
        );
        code.to_string()
    }

    /// The error code, or "" for an answer that is not an error.
    pub fn code_or_empty(&self) -> String {
        if self.status < 400 {
            String::new()
        } else {
            self.code()
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn id(&self) -> i64 {
        self.json()["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no id in {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one request on a new connection and reads the whole response.
pub async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(body);
    // The server may answer (413) and close before reading everything: keep going to the read.
    let _ = stream.write_all(&request).await;
    let mut buf = Vec::new();
    let read = stream.read_to_end(&mut buf).await;
    if buf.is_empty() {
        read?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "empty response",
        ));
    }
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> std::io::Result<Resp> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("head not utf8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunk"))?;
            let size_str =
                std::str::from_utf8(&rest[at..at + line_end]).map_err(|_| bad("chunk size"))?;
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            at += line_end + 2;
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
        out
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().map_err(|_| bad("content-length"))?;
        rest.get(..len).ok_or_else(|| bad("short body"))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// A client of one instance.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    pub addr: SocketAddr,
}

impl Api {
    /// A request with optional token, extra headers and a raw body (sent as JSON unless the
    /// headers say otherwise).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Resp> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let has_ct = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if body.is_some() && !has_ct {
            head.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        raw(self.addr, &head, body.unwrap_or_default()).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.send("POST", path, Some(token), &[], Some(&bytes))
            .await
            .expect("request")
    }

    pub async fn post_with(
        &self,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> Resp {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.send("POST", path, Some(token), headers, Some(&bytes))
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.send("GET", path, token, &[], None)
            .await
            .expect("request")
    }

    /// Creates an account; returns (id, token).
    pub async fn account(&self, owner: &str, balance: i64) -> (i64, String) {
        let r = self
            .post(
                "/accounts",
                ADMIN,
                json!({"owner": owner, "balance": balance}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        (
            v["id"].as_i64().unwrap(),
            v["token"].as_str().unwrap().to_string(),
        )
    }

    pub async fn balance(&self, id: i64) -> i64 {
        let r = self.get(&format!("/accounts/{id}"), Some(ADMIN)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["balance"].as_i64().unwrap()
    }

    pub async fn audit(&self) -> Value {
        let r = self.get("/audit", Some(ADMIN)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }
}
