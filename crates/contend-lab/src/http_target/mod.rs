//! The lab's HTTP target: drives running instances of the reference service (`contend serve`),
//! round robin, with the lab's scenarios (`transfer`, `order`, `withdraw`) under one strategy per
//! run (picked with the `X-Concurrency-Strategy` header), and checks the same invariants, read
//! back through the API and `GET /audit`. It is a [`Target`] of the lab's one
//! [runner]: the worker loop, tally, report and verdicts are the in-process lab's.
//!
//! With two or more instances the `mutex` strategy is an unsafe baseline (its lock lives in one
//! process), so its violations are expected there; every database- or Redis-based strategy must
//! show none.
//!
//! How answers count: 2xx succeeded; 409 with a business code (`insufficient_funds`,
//! `out_of_stock`, `seat_taken`) refused; 503 `contention` or `lock_timeout` gave up under
//! contention, any other 503 an error (after either the worker pauses briefly, honouring
//! `Retry-After` up to [`RETRY_AFTER_CAP`]); a 500 is a bug of the service: counted as an error
//! and it fails the run whatever the strategy. A `422 strategy_unsupported` or
//! `400 unknown_strategy` at setup skips the combination with the server's reason. Retries and
//! conflicts are the servers' own counts, from their `/metrics`.

mod client;

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use contend::strategy::Strategy;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use self::client::{Audit, Client, HttpError, Reply, Request, TxCounters};
use crate::cli::LabArgs;
use crate::config::{ConfigError, LabConfig, split_list};
use crate::report::{LabReport, RunReport};
use crate::runner::{self, RunSpec, SetupError, Target, TargetRun};
use crate::scenario::{Invariant, OpReport, Outcome, Totals, invariant};

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
    Ok(ExitCode::from(report.exit_code()))
}

/// Runs every scenario x strategy x worker count of `config` against `targets` (base URLs, as
/// from [`parse_targets`]), authenticating admin calls with `admin_token`.
///
/// `config.database_url`, `redis_url` and `redlock_urls` are not used: the servers have their
/// own. The backend column reads `http(<backend>)` with the backend the servers report.
///
/// # Errors
/// As [`HttpTarget::connect`], a scenario not offered over HTTP, or a server that refuses the
/// strategy header. Failures inside a run are reported in that run.
///
/// # Cancel safety
/// As [`run`].
pub async fn run_targets(
    config: &LabConfig,
    targets: &[String],
    admin_token: &str,
) -> anyhow::Result<LabReport> {
    let max_workers = config.workers.iter().copied().max().unwrap_or(1);
    let target = HttpTarget::connect(targets, admin_token, max_workers).await?;
    let names: Vec<&str> = if config.scenarios.is_empty() {
        SCENARIOS.to_vec()
    } else {
        config.scenarios.iter().map(String::as_str).collect()
    };
    let scenarios = names
        .into_iter()
        .map(|s| {
            HttpScenario::from_name(s).with_context(|| {
                format!(
                    "--scenario: `{s}` is not available over HTTP (expected one of: {})",
                    SCENARIOS.join(", ")
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    runner::run(config, &target, &scenarios).await
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

/// A scenario the HTTP target can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpScenario {
    /// Transfers among a few hot accounts.
    Transfer,
    /// Orders of one product with limited stock.
    Order,
    /// Withdrawals from one hot account.
    Withdraw,
}

impl HttpScenario {
    /// The scenario called `name` (one of [`SCENARIOS`]).
    pub fn from_name(name: &str) -> Option<HttpScenario> {
        match name {
            "transfer" => Some(HttpScenario::Transfer),
            "order" => Some(HttpScenario::Order),
            "withdraw" => Some(HttpScenario::Withdraw),
            _ => None,
        }
    }

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            HttpScenario::Transfer => "transfer",
            HttpScenario::Order => "order",
            HttpScenario::Withdraw => "withdraw",
        }
    }
}

/// Running service instances sharing one database: the [`Target`] of `contend lab --target`.
pub struct HttpTarget {
    client: Arc<Client>,
    backend: String,
}

impl HttpTarget {
    /// A client for `targets` (base URLs, as from [`parse_targets`]) keeping up to
    /// `max_workers + 2` idle connections per target; checks that every target answers
    /// `GET /healthz`, accepts `admin_token` and runs on the same backend as the others.
    ///
    /// # Errors
    /// No targets, a target that is not reachable or does not answer `/healthz` with 200, a
    /// refused admin token, targets on different backends.
    ///
    /// # Cancel safety
    /// Reads only; dropping the future changes nothing.
    pub async fn connect(
        targets: &[String],
        admin_token: &str,
        max_workers: usize,
    ) -> anyhow::Result<HttpTarget> {
        if targets.is_empty() {
            bail!("--target: no targets given");
        }
        let client = Client::new(targets, admin_token, max_workers)?;
        let backend = client.backend().await?;
        Ok(HttpTarget {
            client: Arc::new(client),
            backend,
        })
    }
}

impl Target for HttpTarget {
    type Scenario = HttpScenario;
    type Run = HttpRun;

    fn backend(&self) -> &str {
        &self.backend
    }

    fn scenario_name(scenario: &HttpScenario) -> &'static str {
        scenario.name()
    }

    /// Always `Ok`: the servers say what they run, at setup.
    fn supports(&self, _scenario: &HttpScenario, _strategy: Strategy) -> Result<(), String> {
        Ok(())
    }

    fn expected_safe(&self, strategy: Strategy) -> bool {
        expected_safe(strategy, self.client.targets().len())
    }

    async fn setup(&self, scenario: &HttpScenario, spec: RunSpec) -> Result<HttpRun, SetupError> {
        let run_id = format!("lab{:08x}", rand::random::<u32>());
        let plan = setup(
            &self.client,
            *scenario,
            spec.strategy,
            spec.operations,
            &run_id,
        )
        .await?;
        let before = self.client.audit().await.map_err(SetupError::failed)?;
        // Retries and conflicts come from the servers' counters (None: a server without them).
        let counters_before = self.client.tx_counters(spec.strategy).await.ok();
        Ok(HttpRun {
            client: self.client.clone(),
            plan,
            before,
            counters_before,
            server_errors: AtomicU64::new(0),
        })
    }
}

/// An account made by a run's setup.
#[derive(Debug, Clone)]
struct LabAccount {
    id: i64,
    token: String,
    opening: i64,
}

/// What a run's setup made.
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

/// Maps a setup answer that was not the expected success: strategy refusals skip, a server
/// without the header option stops the lab, anything else fails the run.
fn setup_refusal(client: &Client, target: usize, reply: &Reply) -> SetupError {
    match reply.api_error() {
        Some(e) if e.is_strategy_refusal() => SetupError::Unsupported(e.message),
        Some(e) if e.is_strategy_header_refusal() => SetupError::Fatal(anyhow!(
            "target {} was not started with --allow-strategy-header, so the lab cannot pick \
             the strategy per run",
            client.base(target)
        )),
        _ => SetupError::failed(reply.unexpected()),
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
    for i in 0..count.max(client.targets().len()) {
        let body = json!({"owner": format!("{run_id}-{i}"), "balance": opening});
        let request = Request {
            token: Some(client.admin()),
            strategy: Some(strategy),
            body: Some(&body),
            ..Request::new(i, Method::POST, "/accounts")
        };
        let reply = client.send(request).await.map_err(SetupError::failed)?;
        if reply.status != StatusCode::CREATED {
            return Err(setup_refusal(client, i, &reply));
        }
        #[derive(Deserialize)]
        struct Created {
            id: i64,
            token: String,
        }
        let created: Created = reply.json().map_err(SetupError::failed)?;
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
        let request = Request {
            token: Some(client.admin()),
            strategy: Some(strategy),
            body: Some(&body),
            ..Request::new(0, Method::POST, "/products")
        };
        let reply = client.send(request).await.map_err(SetupError::failed)?;
        if reply.status != StatusCode::CREATED {
            return Err(setup_refusal(client, 0, &reply));
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

/// One run of an [`HttpScenario`] against an [`HttpTarget`].
pub struct HttpRun {
    client: Arc<Client>,
    plan: Plan,
    /// `GET /audit` after setup.
    before: Audit,
    /// The strategy's transaction counters after setup (`None`: a server without them).
    counters_before: Option<TxCounters>,
    /// Answers that were 500 (a service bug).
    server_errors: AtomicU64,
}

impl TargetRun for HttpRun {
    /// The pause the worker owes before its next request (after a 503).
    type Worker = Option<Duration>;

    fn worker(&self, _index: usize) -> Option<Duration> {
        None
    }

    /// Sends operation `seq` to target `seq % n`.
    async fn op(&self, pause: &mut Option<Duration>, _index: usize, seq: u64) -> OpReport {
        let plan = &self.plan;
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
        let request = Request {
            token: Some(token),
            strategy: Some(plan.strategy),
            body: Some(&body),
            ..Request::new(seq as usize, Method::POST, path)
        };
        let reply = match self.client.send(request).await {
            Ok(reply) => reply,
            Err(e) => return OpReport::new(Outcome::Error(e.to_string())),
        };
        let (outcome, after) = counts_as(&reply);
        match after {
            After::Nothing => {}
            After::Pause(p) => *pause = Some(p),
            After::ServerError => {
                self.server_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        OpReport::new(outcome)
    }

    async fn between_ops(&self, pause: &mut Option<Duration>) {
        if let Some(pause) = pause.take() {
            tokio::time::sleep(pause).await;
        }
    }

    /// Retries and conflicts by kind: the servers' counters, when they could be read before and
    /// after the load (the operations' own reports know nothing of the servers' retries).
    async fn after_load(&self, report: &mut RunReport) {
        if let Some(before) = &self.counters_before
            && let Ok(after) = self.client.tx_counters(self.plan.strategy).await
        {
            (report.retries, report.conflicts) = after.since(before);
        }
    }

    async fn check(&self, totals: &Totals) -> anyhow::Result<Vec<Invariant>> {
        Ok(check(&self.client, &self.plan, totals, &self.before).await?)
    }

    fn failure(&self) -> Option<String> {
        let n = self.server_errors.load(Ordering::Relaxed);
        (n > 0).then(|| format!("{n} answers were 500 (a service bug)"))
    }
}

/// What an operation's answer calls for besides its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Nothing.
    Nothing,
    /// A 503: the worker pauses this long before its next request.
    Pause(Duration),
    /// A 500: a bug of the service, which fails the run.
    ServerError,
}

/// How the answer to an operation counts: 2xx succeeded; 409 with a business code
/// refused; 503 `contention` / `lock_timeout` gave up (contention); anything else an error;
/// a pause after a 503 (its `Retry-After`, at most [`RETRY_AFTER_CAP`]) and a service bug for
/// a 500.
fn counts_as(reply: &Reply) -> (Outcome, After) {
    let error = || Outcome::Error(reply.unexpected().to_string());
    match reply.status {
        StatusCode::OK | StatusCode::CREATED => (Outcome::Succeeded, After::Nothing),
        StatusCode::CONFLICT if reply.api_error().is_some_and(|e| e.is_refusal()) => {
            (Outcome::Refused, After::Nothing)
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            let pause = reply
                .retry_after
                .unwrap_or(RETRY_AFTER_CAP)
                .min(RETRY_AFTER_CAP);
            let outcome = match reply.api_error() {
                Some(e) if e.is_contention() => Outcome::GaveUp(reply.unexpected().to_string()),
                _ => error(),
            };
            (outcome, After::Pause(pause))
        }
        StatusCode::INTERNAL_SERVER_ERROR => (error(), After::ServerError),
        _ => (error(), After::Nothing),
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

/// A product as `GET /products/{sku}` returns it.
#[derive(Debug, Deserialize)]
struct ProductView {
    stock: i64,
}

/// Checks the scenario's invariants after the load, through the API; `before` is the audit
/// taken after setup.
async fn check(
    client: &Client,
    plan: &Plan,
    totals: &Totals,
    before: &Audit,
) -> Result<Vec<Invariant>, HttpError> {
    let (succeeded, errors) = (totals.succeeded, totals.errors);
    let mut out = Vec::new();
    let mut balances = Vec::with_capacity(plan.accounts.len());
    for a in &plan.accounts {
        let view: AccountView = client.admin_get(&format!("/accounts/{}", a.id)).await?;
        balances.push(view.balance);
    }
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
                let list: Vec<TransferView> = client
                    .admin_get(&format!("/accounts/{}/transfers", a.id))
                    .await?;
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
            let product: ProductView = client.admin_get(&format!("/products/{}", plan.sku)).await?;
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
    fn answers_count_as_the_contract_says() {
        let reply = |status: u16, body: &str, retry_after: Option<u64>| Reply {
            what: "POST /orders".into(),
            status: StatusCode::from_u16(status).unwrap(),
            body: body.as_bytes().to_vec(),
            retry_after: retry_after.map(Duration::from_secs),
        };
        let error = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
        assert_eq!(
            counts_as(&reply(201, "{}", None)),
            (Outcome::Succeeded, After::Nothing)
        );
        assert_eq!(
            counts_as(&reply(200, "{}", None)),
            (Outcome::Succeeded, After::Nothing)
        );
        for code in ["insufficient_funds", "out_of_stock", "seat_taken"] {
            assert_eq!(
                counts_as(&reply(409, &error(code), None)),
                (Outcome::Refused, After::Nothing)
            );
        }
        // A 409 that is not a business "no" (an idempotency key in flight) is an error.
        assert_eq!(
            counts_as(&reply(409, &error("request_in_progress"), None)),
            (
                Outcome::Error("POST /orders: HTTP 409 request_in_progress: m".into()),
                After::Nothing
            )
        );
        let (outcome, after) = counts_as(&reply(503, &error("overloaded"), Some(5)));
        assert!(matches!(outcome, Outcome::Error(_)));
        assert_eq!(
            after,
            After::Pause(RETRY_AFTER_CAP),
            "Retry-After is capped"
        );
        let (outcome, _) = counts_as(&reply(503, &error("contention"), Some(0)));
        assert!(matches!(outcome, Outcome::GaveUp(_)), "{outcome:?}");
        let (_, after) = counts_as(&reply(503, "busy", Some(0)));
        assert_eq!(after, After::Pause(Duration::ZERO));
        let (outcome, after) = counts_as(&reply(500, "boom", None));
        assert_eq!(
            outcome,
            Outcome::Error("POST /orders: HTTP 500: boom".into())
        );
        assert_eq!(after, After::ServerError);
        assert_eq!(counts_as(&reply(502, "", None)).1, After::Nothing);
    }

    #[test]
    fn scenario_names_round_trip() {
        for name in SCENARIOS {
            assert_eq!(
                HttpScenario::from_name(name).map(HttpScenario::name),
                Some(name)
            );
        }
        assert_eq!(HttpScenario::from_name("queue"), None);
    }
}
