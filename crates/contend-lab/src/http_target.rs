//! The lab's HTTP target: drives running instances of the reference service (`contend serve`),
//! round robin, with the lab's scenarios (`transfer`, `order`, `withdraw`) under one strategy per
//! run (picked with the `X-Concurrency-Strategy` header), and checks the same invariants, read
//! back through the API and `GET /audit`.
//!
//! With two or more instances the `mutex` strategy is an unsafe baseline (its lock lives in one
//! process), so its violations are expected there; every database- or Redis-based strategy must
//! show none.
//!
//! How answers count: 2xx succeeded; 409 with a business code (`insufficient_funds`,
//! `out_of_stock`, `seat_taken`) refused; 503 an error (the worker pauses briefly, honouring
//! `Retry-After` up to [`RETRY_AFTER_CAP`]); a 500 is a bug of the service: counted as an error
//! and it fails the run whatever the strategy. A `422 strategy_unsupported` or
//! `400 unknown_strategy` at setup skips the combination with the server's reason.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use contend::strategy::Strategy;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::cli::LabArgs;
use crate::config::{ConfigError, LabConfig, split_list};
use crate::report::{LabReport, RunReport, SkippedRun, verdict};
use crate::runner::{WorkerStats, failed};
use crate::scenario::{Invariant, OpReport, Outcome};

/// The scenarios the HTTP target knows, in the order it runs them.
pub const SCENARIOS: [&str; 3] = ["transfer", "order", "withdraw"];

/// The longest pause after a 503 before the worker's next request (the server's `Retry-After`
/// is honoured up to this, so one busy moment does not stall a run for seconds).
pub const RETRY_AFTER_CAP: Duration = Duration::from_millis(200);

/// Accounts the `transfer` and `order` scenarios spread their load over (few, so they are hot).
const HOT_ACCOUNTS: usize = 4;

/// Opening balance of each `transfer` account.
const TRANSFER_OPENING: i64 = 1_000;

/// Largest amount of one transfer.
const TRANSFER_MAX: i64 = 50;

/// Amount of one withdrawal.
const WITHDRAW_AMOUNT: i64 = 10;

/// Price of the `order` scenario's product.
const ORDER_PRICE: i64 = 3;

/// Parses `--target http://127.0.0.1:8081,http://127.0.0.1:8082` into base URLs without a
/// trailing slash (duplicates dropped).
///
/// ```
/// use contend_lab::http_target::parse_targets;
/// let t = parse_targets("http://127.0.0.1:8081/, http://127.0.0.1:8082").unwrap();
/// assert_eq!(t, vec!["http://127.0.0.1:8081", "http://127.0.0.1:8082"]);
/// assert!(parse_targets("127.0.0.1:8081").is_err());
/// assert!(parse_targets("https://example.com").is_err());
/// assert!(parse_targets(" , ").is_err());
/// ```
///
/// # Errors
/// An empty list, or an item that is not an `http://host:port` URL without path or query.
pub fn parse_targets(s: &str) -> Result<Vec<String>, ConfigError> {
    let items = split_list(s);
    if items.is_empty() {
        return Err(ConfigError(
            "--target: empty list (give base URLs such as http://127.0.0.1:8081,http://127.0.0.1:8082)".into(),
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let bad = |why: &str| ConfigError(format!("--target: `{item}` {why}"));
        let url = reqwest::Url::parse(item).map_err(|e| {
            bad(&format!(
                "is not a URL ({e}); expected e.g. http://127.0.0.1:8081"
            ))
        })?;
        if url.scheme() != "http" {
            return Err(bad(
                "is not an http:// URL (this build of the lab speaks plain HTTP/1.1 only)",
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "must be a base URL without path or query, e.g. http://127.0.0.1:8081",
            ));
        }
        let base = url.as_str().trim_end_matches('/').to_string();
        if !out.contains(&base) {
            out.push(base);
        }
    }
    Ok(out)
}

/// `contend lab --target ...`: validates the flags, runs the HTTP scenarios against the
/// targets, prints the table or JSON (as the in-process lab does) and returns the exit status.
///
/// # Errors
/// Bad flags (no admin token, a bad target URL, an unknown scenario), a target that does not
/// answer `GET /healthz` with 200, or a server started without `--allow-strategy-header`.
///
/// # Cancel safety
/// Dropping the future aborts the current run's workers; requests in flight are dropped (the
/// service rolls their transactions back); what the runs created on the servers stays.
pub async fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    let targets = parse_targets(args.target.as_deref().unwrap_or_default())?;
    let admin_token = args
        .admin_token
        .clone()
        .filter(|t| !t.trim().is_empty())
        .context("--target needs the servers' admin token: --admin-token or CONTEND_ADMIN_TOKEN")?;
    let config = args.into_config(&SCENARIOS)?;
    let report = run_targets(&config, &targets, &admin_token).await?;
    crate::cli::emit(&config, &report)?;
    Ok(if report.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs every scenario x strategy x worker count of `config` against `targets` (base URLs, as
/// from [`parse_targets`]), authenticating admin calls with `admin_token`.
///
/// `config.database_url`, `redis_url` and `redlock_urls` are not used: the servers have their
/// own. The backend column reads `http(<backend>)` with the backend the servers report.
///
/// # Errors
/// A target that does not answer `GET /healthz` with 200, targets on different backends, or a
/// server that refuses the strategy header. Failures inside a run are reported in that run.
///
/// # Cancel safety
/// As [`run`].
pub async fn run_targets(
    config: &LabConfig,
    targets: &[String],
    admin_token: &str,
) -> anyhow::Result<LabReport> {
    if targets.is_empty() {
        bail!("--target: no targets given");
    }
    let max_workers = config.workers.iter().copied().max().unwrap_or(1);
    let client = Client::new(targets, admin_token, max_workers)?;
    let backend = client.backend().await?;
    let scenarios: Vec<HttpScenario> = if config.scenarios.is_empty() {
        SCENARIOS
            .iter()
            .filter_map(|s| HttpScenario::from_name(s))
            .collect()
    } else {
        config
            .scenarios
            .iter()
            .map(|s| {
                HttpScenario::from_name(s).with_context(|| {
                    format!(
                        "--scenario: `{s}` is not available over HTTP (expected one of: {})",
                        SCENARIOS.join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let client = Arc::new(client);
    let mut report = LabReport::default();
    for &scenario in &scenarios {
        for &strategy in &config.strategies {
            'workers: for &workers in &config.workers {
                for repeat in 0..config.repeat {
                    match run_one(&client, config, scenario, strategy, workers, &backend).await? {
                        Ok(mut run) => {
                            if config.repeat > 1 {
                                run.repeat = Some(repeat);
                            }
                            report.runs.push(run);
                        }
                        Err(reason) => {
                            report.skipped.push(SkippedRun {
                                scenario: scenario.name().to_string(),
                                strategy: strategy.to_string(),
                                backend: backend.clone(),
                                reason,
                            });
                            break 'workers;
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}

/// Whether `strategy` is expected to keep the invariants over `targets` instances: `none`
/// never, `mutex` only within one process.
///
/// ```
/// use contend::strategy::Strategy;
/// use contend_lab::http_target::expected_safe;
/// assert!(expected_safe(Strategy::Mutex, 1));
/// assert!(!expected_safe(Strategy::Mutex, 2));
/// assert!(expected_safe(Strategy::Atomic, 2));
/// assert!(!expected_safe(Strategy::None, 1));
/// ```
pub fn expected_safe(strategy: Strategy, targets: usize) -> bool {
    strategy.expected_safe() && !(strategy == Strategy::Mutex && targets > 1)
}

// ---- the HTTP client ----

/// The error object of the contract.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// One answer, read whole (so that the connection goes back to the pool).
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    retry_after: Option<Duration>,
}

impl Reply {
    /// `(code, message)` of an error answer, or a description of what came instead.
    fn error(&self) -> (String, String) {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => (e.error.code, e.error.message),
            Err(_) => (
                String::new(),
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned(),
            ),
        }
    }

    /// A one-line description for error samples.
    fn describe(&self) -> String {
        let (code, message) = self.error();
        if code.is_empty() {
            format!("HTTP {}: {message}", self.status.as_u16())
        } else {
            format!("HTTP {} {code}: {message}", self.status.as_u16())
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, what: &str) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "{what}: unexpected answer body: {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            )
        })
    }
}

/// A pooled keep-alive HTTP/1.1 client for the targets.
struct Client {
    http: reqwest::Client,
    targets: Vec<String>,
    admin: String,
}

impl Client {
    fn new(targets: &[String], admin_token: &str, max_workers: usize) -> anyhow::Result<Client> {
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

    /// Sends one request to target `target % n` and reads the whole answer.
    async fn send(
        &self,
        target: usize,
        method: Method,
        path: &str,
        token: Option<&str>,
        strategy: Option<Strategy>,
        body: Option<&Value>,
    ) -> Result<Reply, String> {
        let base = &self.targets[target % self.targets.len()];
        let mut request = self.http.request(method, format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(strategy) = strategy {
            request = request.header("x-concurrency-strategy", strategy.to_string());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{base}{path}: {}", error_chain(&e)))?;
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
            .map_err(|e| format!("{base}{path}: reading the answer: {}", error_chain(&e)))?
            .to_vec();
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }

    /// An admin call that must succeed with `expect`; anything else is an error.
    async fn admin_call(
        &self,
        target: usize,
        method: Method,
        path: &str,
        body: Option<&Value>,
        expect: StatusCode,
    ) -> anyhow::Result<Reply> {
        let reply = self
            .send(target, method.clone(), path, Some(&self.admin), None, body)
            .await
            .map_err(anyhow::Error::msg)?;
        if reply.status != expect {
            bail!("{method} {path}: {}", reply.describe());
        }
        Ok(reply)
    }

    /// Checks every target's `/healthz` and returns the backend label, e.g. `http(postgres)`.
    async fn backend(&self) -> anyhow::Result<String> {
        #[derive(Deserialize)]
        struct Health {
            backend: Option<String>,
        }
        let mut backends = BTreeSet::new();
        for (i, base) in self.targets.iter().enumerate() {
            let reply = self
                .send(i, Method::GET, "/healthz", None, None, None)
                .await
                .map_err(|e| anyhow::anyhow!("target {base} is not reachable: {e}"))?;
            if reply.status != StatusCode::OK {
                bail!("target {base}: GET /healthz answered {}", reply.describe());
            }
            let health: Health = reply.json(&format!("{base}/healthz"))?;
            backends.insert(health.backend.unwrap_or_else(|| "unknown".into()));
            // The admin token must work too, or every run would fail at setup.
            let audit = self
                .send(i, Method::GET, "/audit", Some(&self.admin), None, None)
                .await
                .map_err(anyhow::Error::msg)?;
            if audit.status == StatusCode::UNAUTHORIZED || audit.status == StatusCode::FORBIDDEN {
                bail!(
                    "target {base} refuses the admin token ({}); give the servers' --admin-token",
                    audit.describe()
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
    async fn tx_counters(&self, strategy: Strategy) -> anyhow::Result<TxCounters> {
        let mut total = TxCounters::default();
        for (i, base) in self.targets.iter().enumerate() {
            let reply = self
                .send(i, Method::GET, "/metrics", None, None, None)
                .await
                .map_err(anyhow::Error::msg)?;
            if reply.status != StatusCode::OK {
                bail!("{base}/metrics: {}", reply.describe());
            }
            total.add(&TxCounters::parse(
                &String::from_utf8_lossy(&reply.body),
                &strategy.to_string(),
            ));
        }
        Ok(total)
    }

    /// `GET /audit`.
    async fn audit(&self) -> anyhow::Result<Audit> {
        self.admin_call(0, Method::GET, "/audit", None, StatusCode::OK)
            .await?
            .json("GET /audit")
    }
}

/// A strategy's transaction counters from the service's `/metrics`: how the lab reports retries
/// and conflicts of a run through HTTP (the difference of the counters before and after it).
#[derive(Debug, Default, Clone, PartialEq)]
struct TxCounters {
    /// `contend_tx_runs_total`: writes run (each possibly retried).
    runs: u64,
    /// `contend_tx_attempts_total`: first tries and retries.
    attempts: u64,
    /// `contend_tx_conflicts_total` by kind.
    conflicts: BTreeMap<String, u64>,
}

impl TxCounters {
    /// Reads the counters of `strategy` from a Prometheus text exposition.
    fn parse(text: &str, strategy: &str) -> TxCounters {
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

    fn add(&mut self, other: &TxCounters) {
        self.runs += other.runs;
        self.attempts += other.attempts;
        for (kind, n) in &other.conflicts {
            *self.conflicts.entry(kind.clone()).or_default() += n;
        }
    }

    /// Retries and conflicts by kind between `before` and `self`.
    fn since(&self, before: &TxCounters) -> (u64, BTreeMap<String, u64>) {
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

/// The audit object of the contract (the fields the lab compares).
#[derive(Debug, Clone, Default, Deserialize)]
struct Audit {
    total_balance: i64,
    expected_total_balance: i64,
    negative_balances: i64,
    ledger_mismatches: i64,
    oversold_products: i64,
    double_booked_seats: i64,
}

impl Audit {
    /// What got worse from `before` to `self`: `(violations, detail)`. Only this run wrote in
    /// between (assuming the servers are not shared with other load), so any increase is its.
    fn worsened_since(&self, before: &Audit) -> (u64, String) {
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

// ---- scenarios ----

/// A scenario the HTTP target can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpScenario {
    /// Transfers among a few hot accounts.
    Transfer,
    /// Orders of one product with limited stock.
    Order,
    /// Withdrawals from one hot account.
    Withdraw,
}

impl HttpScenario {
    fn from_name(name: &str) -> Option<HttpScenario> {
        match name {
            "transfer" => Some(HttpScenario::Transfer),
            "order" => Some(HttpScenario::Order),
            "withdraw" => Some(HttpScenario::Withdraw),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            HttpScenario::Transfer => "transfer",
            HttpScenario::Order => "order",
            HttpScenario::Withdraw => "withdraw",
        }
    }
}

/// An account made by a run's setup.
#[derive(Debug, Clone)]
struct LabAccount {
    id: i64,
    token: String,
    opening: i64,
}

/// What a run's setup made, shared by its workers.
#[derive(Debug)]
struct Plan {
    scenario: HttpScenario,
    strategy: Strategy,
    accounts: Vec<LabAccount>,
    /// `order`: the product's SKU and opening stock.
    sku: String,
    stock: i64,
    /// `withdraw`: the path of the hot account's withdraw endpoint.
    withdraw_path: String,
}

/// Why setup did not produce a plan: the combination is skipped, or the run fails.
enum SetupError {
    Skip(String),
    Fail(anyhow::Error),
}

impl From<anyhow::Error> for SetupError {
    fn from(e: anyhow::Error) -> Self {
        SetupError::Fail(e)
    }
}

/// Maps a setup answer that was not the expected success: strategy refusals skip, a server
/// without the header option stops the lab, anything else fails the run.
fn setup_refusal(what: &str, reply: &Reply) -> SetupError {
    let (code, message) = reply.error();
    match code.as_str() {
        "strategy_unsupported" | "unknown_strategy" => SetupError::Skip(message),
        _ => SetupError::Fail(anyhow::anyhow!("{what}: {}", reply.describe())),
    }
}

/// Setup: accounts (and a product) for `ops` operations, created through the API with the
/// run's strategy header, so that a strategy the servers cannot run is found here.
async fn setup(
    client: &Client,
    scenario: HttpScenario,
    strategy: Strategy,
    ops: u64,
    run_id: &str,
) -> Result<Plan, SetupError> {
    let half = i64::try_from(ops / 2).unwrap_or(i64::MAX / 4).max(1);
    let (count, opening) = match scenario {
        HttpScenario::Transfer => (HOT_ACCOUNTS, TRANSFER_OPENING),
        // Enough money that orders are limited by stock alone.
        HttpScenario::Order => (
            HOT_ACCOUNTS,
            ORDER_PRICE.saturating_mul(i64::try_from(ops).unwrap_or(i64::MAX)),
        ),
        // About half of the withdrawals succeed; the rest are refused.
        HttpScenario::Withdraw => (1, WITHDRAW_AMOUNT.saturating_mul(half)),
    };
    let opening = opening.min(1_000_000_000_000_000);
    let mut accounts = Vec::with_capacity(count);
    // Creating accounts round robin asks every target whether it runs the strategy.
    for i in 0..count.max(client.targets.len()) {
        let body = json!({"owner": format!("{run_id}-{i}"), "balance": opening});
        let reply = client
            .send(
                i,
                Method::POST,
                "/accounts",
                Some(&client.admin),
                Some(strategy),
                Some(&body),
            )
            .await
            .map_err(|e| SetupError::Fail(anyhow::anyhow!(e)))?;
        if reply.status == StatusCode::BAD_REQUEST
            && reply.error().0 == "strategy_header_not_allowed"
        {
            return Err(SetupError::Fail(anyhow::anyhow!(
                "target {} was not started with --allow-strategy-header, so the lab cannot pick \
                 the strategy per run",
                client.targets[i % client.targets.len()]
            )));
        }
        if reply.status != StatusCode::CREATED {
            return Err(setup_refusal("POST /accounts", &reply));
        }
        #[derive(Deserialize)]
        struct Created {
            id: i64,
            token: String,
        }
        let created: Created = reply.json("POST /accounts")?;
        if accounts.len() < count {
            accounts.push(LabAccount {
                id: created.id,
                token: created.token,
                opening,
            });
        }
    }
    let mut sku = String::new();
    let mut stock = 0;
    if scenario == HttpScenario::Order {
        sku = format!("{run_id}-sku");
        stock = half;
        let body = json!({"sku": sku, "stock": stock, "price": ORDER_PRICE});
        let reply = client
            .send(
                0,
                Method::POST,
                "/products",
                Some(&client.admin),
                Some(strategy),
                Some(&body),
            )
            .await
            .map_err(|e| SetupError::Fail(anyhow::anyhow!(e)))?;
        if reply.status != StatusCode::CREATED {
            return Err(setup_refusal("POST /products", &reply));
        }
    }
    let withdraw_path = format!("/accounts/{}/withdraw", accounts[0].id);
    Ok(Plan {
        scenario,
        strategy,
        accounts,
        sku,
        stock,
        withdraw_path,
    })
}

/// What one operation came to.
enum OpOutcome {
    Succeeded,
    Refused,
    /// An error; `Some` pause after a 503; `true` when the server answered 500.
    Error(String, Option<Duration>, bool),
}

/// Sends operation `seq` to target `seq % n`.
async fn op(client: &Client, plan: &Plan, seq: u64) -> OpOutcome {
    let target = seq as usize;
    let (path, token, body) = match plan.scenario {
        HttpScenario::Transfer => {
            let n = plan.accounts.len();
            let from = rand::random_range(0..n);
            let to = (from + rand::random_range(1..n)) % n;
            let amount = rand::random_range(1..=TRANSFER_MAX);
            let a = &plan.accounts[from];
            let body = json!({"from": a.id, "to": plan.accounts[to].id, "amount": amount});
            ("/transfers", a.token.as_str(), body)
        }
        HttpScenario::Order => {
            let a = &plan.accounts[rand::random_range(0..plan.accounts.len())];
            let body = json!({"account": a.id, "sku": plan.sku, "quantity": 1});
            ("/orders", a.token.as_str(), body)
        }
        HttpScenario::Withdraw => {
            let a = &plan.accounts[0];
            let body = json!({"amount": WITHDRAW_AMOUNT});
            (plan.withdraw_path.as_str(), a.token.as_str(), body)
        }
    };
    let reply = match client
        .send(
            target,
            Method::POST,
            path,
            Some(token),
            Some(plan.strategy),
            Some(&body),
        )
        .await
    {
        Ok(reply) => reply,
        Err(e) => return OpOutcome::Error(e, None, false),
    };
    match reply.status.as_u16() {
        200 | 201 => OpOutcome::Succeeded,
        409 => match reply.error().0.as_str() {
            "insufficient_funds" | "out_of_stock" | "seat_taken" => OpOutcome::Refused,
            _ => OpOutcome::Error(reply.describe(), None, false),
        },
        503 => {
            let pause = reply
                .retry_after
                .unwrap_or(RETRY_AFTER_CAP)
                .min(RETRY_AFTER_CAP);
            OpOutcome::Error(reply.describe(), Some(pause), false)
        }
        500..=599 => OpOutcome::Error(reply.describe(), None, reply.status.as_u16() == 500),
        _ => OpOutcome::Error(reply.describe(), None, false),
    }
}

/// An invariant that holds when `violations` is 0.
fn invariant(name: &str, violations: u64, detail: String) -> Invariant {
    Invariant {
        name: name.to_string(),
        ok: violations == 0,
        detail,
        violations,
    }
}

/// An account as `GET /accounts/{id}` returns it.
#[derive(Debug, Deserialize)]
struct AccountView {
    balance: i64,
}

/// A transfer as `GET /accounts/{id}/transfers` lists it.
#[derive(Debug, Deserialize)]
struct TransferView {
    id: i64,
    from: i64,
    to: i64,
    amount: i64,
}

/// The balances of the plan's accounts, read back through the API.
async fn balances(client: &Client, plan: &Plan) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::with_capacity(plan.accounts.len());
    for a in &plan.accounts {
        let path = format!("/accounts/{}", a.id);
        let view: AccountView = client
            .admin_call(0, Method::GET, &path, None, StatusCode::OK)
            .await?
            .json(&path)?;
        out.push(view.balance);
    }
    Ok(out)
}

/// Checks the scenario's invariants after the load, through the API; `before` is the audit
/// taken after setup.
async fn check(
    client: &Client,
    plan: &Plan,
    succeeded: u64,
    errors: u64,
    before: &Audit,
) -> anyhow::Result<Vec<Invariant>> {
    let mut out = Vec::new();
    let balances = balances(client, plan).await?;
    let negative = balances.iter().filter(|b| **b < 0).count() as u64;
    let succeeded_i = i128::from(succeeded);
    match plan.scenario {
        HttpScenario::Transfer => {
            let expected: i128 = plan.accounts.iter().map(|a| i128::from(a.opening)).sum();
            let total: i128 = balances.iter().map(|b| i128::from(*b)).sum();
            out.push(invariant(
                "total_conserved",
                u64::try_from((total - expected).unsigned_abs()).unwrap_or(u64::MAX),
                format!("total {total}, expected {expected}"),
            ));
            out.push(invariant(
                "no_negative_balance",
                negative,
                format!("{negative} accounts below zero"),
            ));
            let mut mismatched = Vec::new();
            let mut recorded = BTreeSet::new();
            for (a, balance) in plan.accounts.iter().zip(&balances) {
                let path = format!("/accounts/{}/transfers", a.id);
                let list: Vec<TransferView> = client
                    .admin_call(0, Method::GET, &path, None, StatusCode::OK)
                    .await?
                    .json(&path)?;
                let mut sum = i128::from(a.opening);
                for t in &list {
                    if t.from == a.id {
                        sum -= i128::from(t.amount);
                    }
                    if t.to == a.id {
                        sum += i128::from(t.amount);
                    }
                    recorded.insert(t.id);
                }
                if sum != i128::from(*balance) {
                    mismatched.push(format!(
                        "account {}: balance {balance}, opening + transfers {sum}",
                        a.id
                    ));
                }
            }
            out.push(invariant(
                "ledger_matches_balances",
                mismatched.len() as u64,
                if mismatched.is_empty() {
                    format!("{} accounts match their transfers", plan.accounts.len())
                } else {
                    mismatched.join("; ")
                },
            ));
            let recorded = recorded.len() as u64;
            let lost = succeeded.saturating_sub(recorded);
            let extra = recorded.saturating_sub(succeeded + errors);
            out.push(invariant(
                "acknowledged_recorded",
                lost + extra,
                format!("{succeeded} acknowledged (201), {recorded} recorded, {errors} errors"),
            ));
        }
        HttpScenario::Order => {
            let path = format!("/products/{}", plan.sku);
            #[derive(Deserialize)]
            struct ProductView {
                stock: i64,
            }
            let product: ProductView = client
                .admin_call(0, Method::GET, &path, None, StatusCode::OK)
                .await?
                .json(&path)?;
            let taken = i128::from(plan.stock) - i128::from(product.stock);
            // Sold more than the stock went down: units sold twice.
            let oversold = (succeeded_i - taken).max(0);
            out.push(invariant(
                "never_oversold",
                u64::try_from(oversold).unwrap_or(u64::MAX)
                    + u64::from(product.stock < 0 || succeeded_i > i128::from(plan.stock)),
                format!(
                    "stock {} -> {} ({taken} taken), {succeeded} orders acknowledged",
                    plan.stock, product.stock
                ),
            ));
            let expected: i128 = plan
                .accounts
                .iter()
                .map(|a| i128::from(a.opening))
                .sum::<i128>()
                - succeeded_i * i128::from(ORDER_PRICE);
            let total: i128 = balances.iter().map(|b| i128::from(*b)).sum();
            out.push(invariant(
                "payments_match_orders",
                u64::try_from((total - expected).unsigned_abs()).unwrap_or(u64::MAX),
                format!(
                    "accounts hold {total}, expected {expected} after {succeeded} orders at {ORDER_PRICE}"
                ),
            ));
            out.push(invariant(
                "no_negative_balance",
                negative,
                format!("{negative} accounts below zero"),
            ));
        }
        HttpScenario::Withdraw => {
            let expected =
                i128::from(plan.accounts[0].opening) - succeeded_i * i128::from(WITHDRAW_AMOUNT);
            let balance = i128::from(balances[0]);
            out.push(invariant(
                "balance_matches_withdrawals",
                u64::try_from((balance - expected).unsigned_abs()).unwrap_or(u64::MAX),
                format!("final {balance}, expected {expected} after {succeeded} withdrawals"),
            ));
            out.push(invariant(
                "no_negative_balance",
                negative,
                format!("final balance {balance}"),
            ));
        }
    }
    let after = client.audit().await?;
    let (violations, detail) = after.worsened_since(before);
    out.push(invariant("audit_consistent", violations, detail));
    Ok(out)
}

// ---- the load ----

/// The load loop of one worker: operation numbers come from one shared counter. Returns the
/// worker's tally and how many answers were 500.
async fn worker(
    client: Arc<Client>,
    plan: Arc<Plan>,
    next: Arc<AtomicU64>,
    limit: u64,
    deadline: Option<Instant>,
) -> (WorkerStats, u64) {
    let mut stats = WorkerStats::new();
    let mut server_errors = 0;
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= limit {
            break;
        }
        let started = Instant::now();
        if deadline.is_some_and(|d| started >= d) {
            break;
        }
        let outcome = op(&client, &plan, seq).await;
        let elapsed = started.elapsed();
        let (outcome, pause) = match outcome {
            OpOutcome::Succeeded => (Outcome::Succeeded, None),
            OpOutcome::Refused => (Outcome::Refused, None),
            OpOutcome::Error(message, pause, server_error) => {
                server_errors += u64::from(server_error);
                (Outcome::Error(message), pause)
            }
        };
        stats.record(elapsed, OpReport::new(outcome));
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    (stats, server_errors)
}

/// One run: setup through the API, load, check. `Ok(Err(reason))` when the servers cannot run
/// the strategy; `Err` when the lab must stop (a server without the strategy header option).
async fn run_one(
    client: &Arc<Client>,
    config: &LabConfig,
    scenario: HttpScenario,
    strategy: Strategy,
    workers: usize,
    backend: &str,
) -> anyhow::Result<Result<RunReport, String>> {
    let safe = expected_safe(strategy, client.targets.len());
    let mut report = RunReport::empty(
        scenario.name(),
        &strategy.to_string(),
        backend,
        workers,
        safe,
        None,
    );
    let run_id = format!("lab{:08x}", rand::random::<u32>());
    let plan = match setup(client, scenario, strategy, config.load.sizing(), &run_id).await {
        Ok(plan) => Arc::new(plan),
        Err(SetupError::Skip(reason)) => return Ok(Err(reason)),
        Err(SetupError::Fail(e)) => {
            let message = format!("{e:#}");
            if message.contains("--allow-strategy-header") {
                return Err(e);
            }
            return Ok(Ok(failed(report, format!("setup failed: {message}"))));
        }
    };
    let before = match client.audit().await {
        Ok(a) => a,
        Err(e) => return Ok(Ok(failed(report, format!("setup failed: {e:#}")))),
    };
    // Retries and conflicts come from the servers' counters (None: a server without them).
    let counters_before = client.tx_counters(strategy).await.ok();

    let next = Arc::new(AtomicU64::new(0));
    let limit = config.load.operations.unwrap_or(u64::MAX);
    let started = Instant::now();
    let deadline = config.load.duration.map(|d| started + d);
    let mut set = JoinSet::new();
    for _ in 0..workers {
        set.spawn(worker(
            client.clone(),
            plan.clone(),
            next.clone(),
            limit,
            deadline,
        ));
    }
    let mut stats = WorkerStats::new();
    let mut server_errors = 0;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((s, five_hundreds)) => {
                stats.merge(s);
                server_errors += five_hundreds;
            }
            Err(e) => stats.add_error(format!("worker failed: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let (succeeded, errors) = (stats.succeeded, stats.errors);
    stats.fill(&mut report, elapsed);
    if let Some(before) = counters_before
        && let Ok(after) = client.tx_counters(strategy).await
    {
        (report.retries, report.conflicts) = after.since(&before);
    }

    match check(client, &plan, succeeded, errors, &before).await {
        Ok(invariants) => {
            report.violations = invariants
                .iter()
                .map(|i| if i.ok { 0 } else { i.violations.max(1) })
                .sum();
            report.invariants = invariants;
            let (text, fails) = verdict(safe, report.violations, report.errors, workers);
            report.verdict = text;
            report.failed = fails;
            if server_errors > 0 {
                report.verdict =
                    format!("FAILED: {server_errors} answers were 500 (a service bug)");
                report.failed = true;
            }
            Ok(Ok(report))
        }
        Err(e) => Ok(Ok(failed(report, format!("check failed: {e:#}")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_validated() {
        assert!(parse_targets("http://127.0.0.1:8081/x").is_err());
        assert!(parse_targets("http://127.0.0.1:8081?a=b").is_err());
        assert!(parse_targets("ftp://127.0.0.1").is_err());
        assert_eq!(
            parse_targets("http://127.0.0.1:8081,http://127.0.0.1:8081/").unwrap(),
            vec!["http://127.0.0.1:8081"]
        );
    }

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
    fn replies_describe_their_error() {
        let reply = Reply {
            status: StatusCode::CONFLICT,
            body: br#"{"error":{"code":"out_of_stock","message":"sold out"}}"#.to_vec(),
            retry_after: None,
        };
        assert_eq!(reply.error().0, "out_of_stock");
        assert_eq!(reply.describe(), "HTTP 409 out_of_stock: sold out");
        let raw = Reply {
            status: StatusCode::BAD_GATEWAY,
            body: b"upstream down".to_vec(),
            retry_after: None,
        };
        assert_eq!(raw.describe(), "HTTP 502: upstream down");
    }
}
