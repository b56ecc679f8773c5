//! The HTTP target's side of the wire: a pooled client for the targets, its typed errors, and
//! the contract's objects the lab reads back (error bodies, `/audit`, `/metrics` counters).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use anyhow::{Context as _, bail};
use contend::strategy::Strategy;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a request to a target did not give the lab the answer it needed. `url` is the request's,
/// `detail` the client's error chain on one line, `what` the call (e.g. `POST /accounts`).
#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    /// The target could not be connected to (refused, unreachable).
    #[error("{url}: cannot connect: {detail}")]
    Connect { url: String, detail: String },
    /// No answer within the client's timeout.
    #[error("{url}: timed out: {detail}")]
    Timeout { url: String, detail: String },
    /// The request or the reading of its answer failed otherwise (e.g. a connection reset).
    #[error("{url}: {detail}")]
    Transport { url: String, detail: String },
    /// An answer with another status than the call expected.
    #[error("{what}: {answer}")]
    Status { what: String, answer: Unexpected },
    /// An answer whose body is not what the contract says.
    #[error("{what}: unexpected answer body ({reason}): {snippet}")]
    Body {
        what: String,
        reason: String,
        snippet: String,
    },
}

impl HttpError {
    /// Classifies a client error on the request to `url`.
    fn from_client(url: String, e: &reqwest::Error) -> HttpError {
        let detail = error_chain(e);
        if e.is_connect() {
            HttpError::Connect { url, detail }
        } else if e.is_timeout() {
            HttpError::Timeout { url, detail }
        } else {
            HttpError::Transport { url, detail }
        }
    }
}

/// The contract's error object: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(super) struct ApiError {
    /// The machine-readable code (`out_of_stock`, `strategy_unsupported`, ...).
    pub(super) code: String,
    /// The explanation for people.
    pub(super) message: String,
}

impl ApiError {
    /// A business "no" of the scenarios' operations: no money, no stock, no seat.
    pub(super) fn is_refusal(&self) -> bool {
        matches!(
            self.code.as_str(),
            "insufficient_funds" | "out_of_stock" | "seat_taken"
        )
    }

    /// The service gave up under contention: conflicts its retries did not outlast, or a lock
    /// not acquired in time (503 `contention` / `lock_timeout`).
    pub(super) fn is_contention(&self) -> bool {
        matches!(self.code.as_str(), "contention" | "lock_timeout")
    }

    /// The server does not run the strategy asked for in the header (or does not know it).
    pub(super) fn is_strategy_refusal(&self) -> bool {
        matches!(
            self.code.as_str(),
            "strategy_unsupported" | "unknown_strategy"
        )
    }

    /// The server was not started with `--allow-strategy-header`.
    pub(super) fn is_strategy_header_refusal(&self) -> bool {
        self.code == "strategy_header_not_allowed"
    }
}

/// An answer that was not the expected one: its status and error object (or body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Unexpected {
    /// The status.
    pub(super) status: StatusCode,
    /// The contract's error object, when the body is one.
    pub(super) error: Option<ApiError>,
    /// The start of the body, when it is not an error object.
    pub(super) snippet: String,
}

impl fmt::Display for Unexpected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            Some(e) => write!(f, "HTTP {} {}: {}", self.status.as_u16(), e.code, e.message),
            None => write!(f, "HTTP {}: {}", self.status.as_u16(), self.snippet),
        }
    }
}

/// One answer, read whole (so that the connection goes back to the pool).
pub(super) struct Reply {
    /// The call it answers, e.g. `POST /accounts`.
    pub(super) what: String,
    pub(super) status: StatusCode,
    pub(super) body: Vec<u8>,
    /// `Retry-After` in seconds, when given.
    pub(super) retry_after: Option<Duration>,
}

impl Reply {
    /// The contract's error object, when the body is one.
    pub(super) fn api_error(&self) -> Option<ApiError> {
        #[derive(Deserialize)]
        struct ErrorBody {
            error: ApiError,
        }
        serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .map(|b| b.error)
    }

    /// This answer as an error of its call.
    pub(super) fn unexpected(&self) -> HttpError {
        let error = self.api_error();
        let snippet = if error.is_some() {
            String::new()
        } else {
            self.snippet()
        };
        HttpError::Status {
            what: self.what.clone(),
            answer: Unexpected {
                status: self.status,
                error,
                snippet,
            },
        }
    }

    /// The body as JSON of type `T`.
    pub(super) fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Body {
            what: self.what.clone(),
            reason: e.to_string(),
            snippet: self.snippet(),
        })
    }

    fn snippet(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned()
    }
}

/// One request: where it goes, and what it carries.
pub(super) struct Request<'a> {
    /// The target, as an index taken modulo the number of targets (round robin).
    pub(super) target: usize,
    pub(super) method: Method,
    pub(super) path: &'a str,
    /// A bearer token.
    pub(super) token: Option<&'a str>,
    /// The `X-Concurrency-Strategy` header.
    pub(super) strategy: Option<Strategy>,
    /// A JSON body.
    pub(super) body: Option<&'a Value>,
}

impl<'a> Request<'a> {
    /// A request without token, strategy or body.
    pub(super) fn new(target: usize, method: Method, path: &'a str) -> Self {
        Request {
            target,
            method,
            path,
            token: None,
            strategy: None,
            body: None,
        }
    }
}

/// A pooled keep-alive HTTP/1.1 client for the targets.
pub(super) struct Client {
    http: reqwest::Client,
    targets: Vec<String>,
    admin: String,
}

impl Client {
    pub(super) fn new(
        targets: &[String],
        admin_token: &str,
        max_workers: usize,
    ) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(max_workers + 2)
            .pool_idle_timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            targets: targets.to_vec(),
            admin: admin_token.to_string(),
        })
    }

    /// The targets' base URLs.
    pub(super) fn targets(&self) -> &[String] {
        &self.targets
    }

    /// The base URL that `target` (an index, round robin) goes to.
    pub(super) fn base(&self, target: usize) -> &str {
        &self.targets[target % self.targets.len()]
    }

    /// The admin token.
    pub(super) fn admin(&self) -> &str {
        &self.admin
    }

    /// Sends `request` and reads the whole answer, whatever its status.
    pub(super) async fn send(&self, request: Request<'_>) -> Result<Reply, HttpError> {
        let what = format!("{} {}", request.method, request.path);
        let url = format!("{}{}", self.base(request.target), request.path);
        let mut builder = self.http.request(request.method, &url);
        if let Some(token) = request.token {
            builder = builder.bearer_auth(token);
        }
        if let Some(strategy) = request.strategy {
            builder = builder.header("x-concurrency-strategy", strategy.to_string());
        }
        if let Some(body) = request.body {
            builder = builder.json(body);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| HttpError::from_client(url.clone(), &e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response
            .bytes()
            .await
            .map_err(|e| HttpError::from_client(url, &e))?
            .to_vec();
        Ok(Reply {
            what,
            status,
            body,
            retry_after,
        })
    }

    /// An admin `GET path` on the first target that must answer 200 with a `T`.
    pub(super) async fn admin_get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        let request = Request {
            token: Some(&self.admin),
            ..Request::new(0, Method::GET, path)
        };
        let reply = self.send(request).await?;
        if reply.status != StatusCode::OK {
            return Err(reply.unexpected());
        }
        reply.json()
    }

    /// Checks every target's `/healthz` and admin token, and returns the backend label, e.g.
    /// `http(postgres)`.
    pub(super) async fn backend(&self) -> anyhow::Result<String> {
        #[derive(Deserialize)]
        struct Health {
            backend: Option<String>,
        }
        let mut backends = BTreeSet::new();
        for (i, base) in self.targets.iter().enumerate() {
            let reply = self
                .send(Request::new(i, Method::GET, "/healthz"))
                .await
                .with_context(|| format!("target {base} is not reachable"))?;
            if reply.status != StatusCode::OK {
                bail!("target {base}: {}", reply.unexpected());
            }
            let health: Health = reply.json().with_context(|| format!("target {base}"))?;
            backends.insert(health.backend.unwrap_or_else(|| "unknown".into()));
            // The admin token must work too, or every run would fail at setup.
            let audit = self
                .send(Request {
                    token: Some(&self.admin),
                    ..Request::new(i, Method::GET, "/audit")
                })
                .await?;
            if audit.status == StatusCode::UNAUTHORIZED || audit.status == StatusCode::FORBIDDEN {
                bail!(
                    "target {base} refuses the admin token ({}); give the servers' --admin-token",
                    audit.unexpected()
                );
            }
        }
        if backends.len() > 1 {
            bail!(
                "the targets run on different backends ({}); give instances that share one database",
                backends.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(format!(
            "http({})",
            backends.into_iter().next().unwrap_or_default()
        ))
    }

    /// The transaction counters of `strategy`, summed over every target's `/metrics`.
    pub(super) async fn tx_counters(&self, strategy: Strategy) -> Result<TxCounters, HttpError> {
        let mut total = TxCounters::default();
        for i in 0..self.targets.len() {
            let reply = self.send(Request::new(i, Method::GET, "/metrics")).await?;
            if reply.status != StatusCode::OK {
                return Err(reply.unexpected());
            }
            total.add(&TxCounters::parse(
                &String::from_utf8_lossy(&reply.body),
                &strategy.to_string(),
            ));
        }
        Ok(total)
    }

    /// `GET /audit`.
    pub(super) async fn audit(&self) -> Result<Audit, HttpError> {
        self.admin_get("/audit").await
    }
}

/// The source and causes of a client error, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A strategy's transaction counters from the service's `/metrics`: how the lab reports retries
/// and conflicts of a run through HTTP (the difference of the counters before and after it).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct TxCounters {
    /// `contend_tx_runs_total`: writes run (each possibly retried).
    pub(super) runs: u64,
    /// `contend_tx_attempts_total`: first tries and retries.
    pub(super) attempts: u64,
    /// `contend_tx_conflicts_total` by kind.
    pub(super) conflicts: BTreeMap<String, u64>,
}

impl TxCounters {
    /// Reads the counters of `strategy` from a Prometheus text exposition.
    pub(super) fn parse(text: &str, strategy: &str) -> TxCounters {
        let mut counters = TxCounters::default();
        let wanted = format!("strategy=\"{strategy}\"");
        for line in text.lines() {
            let Some((name, rest)) = line.split_once('{') else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            if !labels.split(',').any(|l| l == wanted) {
                continue;
            }
            let Ok(value) = value.trim().parse::<u64>() else {
                continue;
            };
            match name {
                "contend_tx_runs_total" => counters.runs += value,
                "contend_tx_attempts_total" => counters.attempts += value,
                "contend_tx_conflicts_total" => {
                    if let Some(kind) = labels
                        .split(',')
                        .find_map(|l| l.strip_prefix("kind=\""))
                        .and_then(|k| k.strip_suffix('"'))
                    {
                        *counters.conflicts.entry(kind.to_string()).or_default() += value;
                    }
                }
                _ => {}
            }
        }
        counters
    }

    pub(super) fn add(&mut self, other: &TxCounters) {
        self.runs += other.runs;
        self.attempts += other.attempts;
        for (kind, n) in &other.conflicts {
            *self.conflicts.entry(kind.clone()).or_default() += n;
        }
    }

    /// Retries and conflicts by kind between `before` and `self`.
    pub(super) fn since(&self, before: &TxCounters) -> (u64, BTreeMap<String, u64>) {
        let retries = self
            .attempts
            .saturating_sub(self.runs)
            .saturating_sub(before.attempts.saturating_sub(before.runs));
        let conflicts = self
            .conflicts
            .iter()
            .filter_map(|(kind, n)| {
                let d = n.saturating_sub(before.conflicts.get(kind).copied().unwrap_or(0));
                (d > 0).then(|| (kind.clone(), d))
            })
            .collect();
        (retries, conflicts)
    }
}

/// The audit object of the contract (the fields the lab compares).
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Audit {
    pub(super) total_balance: i64,
    pub(super) expected_total_balance: i64,
    pub(super) negative_balances: i64,
    pub(super) ledger_mismatches: i64,
    pub(super) oversold_products: i64,
    pub(super) double_booked_seats: i64,
}

impl Audit {
    /// What got worse from `before` to `self`: `(violations, detail)`. Only this run wrote in
    /// between (assuming the servers are not shared with other load), so any increase is its.
    pub(super) fn worsened_since(&self, before: &Audit) -> (u64, String) {
        let mut parts = Vec::new();
        let mut violations = 0u64;
        for (name, now, then) in [
            (
                "negative_balances",
                self.negative_balances,
                before.negative_balances,
            ),
            (
                "ledger_mismatches",
                self.ledger_mismatches,
                before.ledger_mismatches,
            ),
            (
                "oversold_products",
                self.oversold_products,
                before.oversold_products,
            ),
            (
                "double_booked_seats",
                self.double_booked_seats,
                before.double_booked_seats,
            ),
        ] {
            if now > then {
                violations += (now - then) as u64;
                parts.push(format!("{name} +{}", now - then));
            }
        }
        let drift_now = i128::from(self.total_balance) - i128::from(self.expected_total_balance);
        let drift_then =
            i128::from(before.total_balance) - i128::from(before.expected_total_balance);
        if drift_now != drift_then {
            violations += 1;
            parts.push(format!(
                "total balance drifted by {} from the ledger's expected total",
                drift_now - drift_then
            ));
        }
        if parts.is_empty() {
            (0, "no audit counter grew during the run".into())
        } else {
            (
                violations,
                format!("GET /audit after the run: {}", parts.join(", ")),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_worsening_is_counted() {
        let before = Audit {
            total_balance: 100,
            expected_total_balance: 90,
            ledger_mismatches: 2,
            ..Audit::default()
        };
        let same = before.clone();
        assert_eq!(same.worsened_since(&before).0, 0);
        let worse = Audit {
            total_balance: 130,
            ledger_mismatches: 5,
            ..before.clone()
        };
        let (n, detail) = worse.worsened_since(&before);
        assert_eq!(n, 4, "{detail}");
        assert!(detail.contains("ledger_mismatches +3"), "{detail}");
        assert!(detail.contains("drifted by 30"), "{detail}");
    }

    #[test]
    fn retries_and_conflicts_come_from_the_metrics() {
        let text = |runs: u64, attempts: u64, versions: u64| {
            format!(
                "# TYPE contend_tx_runs_total counter\n\
                 contend_tx_runs_total{{strategy=\"optimistic\"}} {runs}\n\
                 contend_tx_runs_total{{strategy=\"atomic\"}} 50\n\
                 contend_tx_attempts_total{{strategy=\"optimistic\"}} {attempts}\n\
                 contend_tx_attempts_total{{strategy=\"atomic\"}} 90\n\
                 contend_tx_conflicts_total{{strategy=\"optimistic\",kind=\"version\"}} {versions}\n\
                 contend_tx_conflicts_total{{strategy=\"atomic\",kind=\"deadlock\"}} 40\n"
            )
        };
        let before = TxCounters::parse(&text(10, 14, 4), "optimistic");
        assert_eq!(before.runs, 10);
        assert_eq!(before.attempts, 14);
        // Two instances: counters add up.
        let mut after = TxCounters::parse(&text(30, 41, 11), "optimistic");
        after.add(&TxCounters::parse(&text(5, 5, 0), "optimistic"));
        let (retries, conflicts) = after.since(&before);
        assert_eq!(retries, (41 + 5 - 35) - 4);
        assert_eq!(conflicts.get("version"), Some(&7));
        assert_eq!(conflicts.get("deadlock"), None, "another strategy's");
    }

    #[test]
    fn unexpected_answers_are_typed_and_described() {
        let reply = Reply {
            what: "POST /orders".into(),
            status: StatusCode::CONFLICT,
            body: br#"{"error":{"code":"out_of_stock","message":"sold out"}}"#.to_vec(),
            retry_after: None,
        };
        let error = reply.api_error().expect("an error object");
        assert!(error.is_refusal() && !error.is_strategy_refusal());
        let e = reply.unexpected();
        assert!(matches!(
            &e,
            HttpError::Status { answer, .. }
                if answer.status == StatusCode::CONFLICT
                    && answer.error.as_ref().is_some_and(|e| e.code == "out_of_stock")
        ));
        assert_eq!(
            e.to_string(),
            "POST /orders: HTTP 409 out_of_stock: sold out"
        );

        let raw = Reply {
            what: "POST /orders".into(),
            status: StatusCode::BAD_GATEWAY,
            body: b"upstream down".to_vec(),
            retry_after: None,
        };
        assert_eq!(raw.api_error(), None);
        assert_eq!(
            raw.unexpected().to_string(),
            "POST /orders: HTTP 502: upstream down"
        );
        let e = raw.json::<Audit>().unwrap_err();
        assert!(matches!(e, HttpError::Body { .. }), "{e}");
        assert!(e.to_string().contains("upstream down"), "{e}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        // Bind then drop a listener: the port is free, so nothing accepts there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let client = Client::new(&[format!("http://127.0.0.1:{port}")], "t", 1).unwrap();
        let e = client
            .send(Request::new(0, Method::GET, "/healthz"))
            .await
            .err()
            .expect("nothing listens there");
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("/healthz: cannot connect"), "{e}");
    }
}
