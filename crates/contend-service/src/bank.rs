//! The bank: accounts, deposits, withdrawals and transfers, each balance change recorded in the
//! double-entry `ledger` so that `/audit` can prove that no update was lost.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use contend::strategy::Operation;
use contend::{Backend, BoxFuture, Tx};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use utoipa::ToSchema;

use crate::AppState;
use crate::engine::{self, Write};
use crate::error::{ApiError, abort};
use crate::extract::{Auth, JsonRequest, RawPath, check_range, check_text, path_id};
use crate::idempotency::{self, Outcome};

/// Largest amount, price, balance or stock: 10^15 minor units.
pub const MAX_MONEY: i64 = 1_000_000_000_000_000;

/// Body of `POST /accounts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    /// Owner name, 1..=64 characters.
    pub owner: String,
    /// Opening balance, 0..=10^15 (default 0).
    #[serde(default)]
    pub balance: i64,
}

/// An account.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Account {
    /// Account id.
    pub id: i64,
    /// Owner name.
    pub owner: String,
    /// Balance in minor units.
    pub balance: i64,
    /// Starts at 0, +1 with every balance change.
    pub version: i64,
}

/// The 201 of `POST /accounts`: the account and its token (shown only here).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedAccount {
    /// Account id.
    pub id: i64,
    /// Owner name.
    pub owner: String,
    /// Balance in minor units.
    pub balance: i64,
    /// Version (0).
    pub version: i64,
    /// The account's bearer token; only its hash is stored.
    pub token: String,
}

/// Body of deposit and withdraw.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AmountBody {
    /// Amount in minor units, 1..=10^15.
    pub amount: i64,
}

/// Body of `POST /transfers`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTransfer {
    /// Paying account (the caller).
    pub from: i64,
    /// Receiving account.
    pub to: i64,
    /// Amount in minor units, 1..=10^15.
    pub amount: i64,
}

/// A recorded transfer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Transfer {
    /// Transfer id.
    pub id: i64,
    /// Paying account.
    pub from: i64,
    /// Receiving account.
    pub to: i64,
    /// Amount in minor units.
    pub amount: i64,
}

/// A query with `?` placeholders for `backend`.
pub(crate) fn q(
    backend: Backend,
    sql: &str,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(AssertSqlSafe(backend.sql(sql).into_owned()))
}

fn account_of(row: &AnyRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        id: row.try_get(0)?,
        owner: row.try_get(1)?,
        balance: row.try_get(2)?,
        version: row.try_get(3)?,
    })
}

fn account_missing(id: i64) -> ApiError {
    ApiError::not_found("account_not_found", format!("account {id} does not exist"))
}

/// Reads an account (with an optional lock clause).
pub(crate) async fn load_account(
    conn: &mut AnyConnection,
    backend: Backend,
    id: i64,
    lock: &str,
) -> contend::Result<Option<Account>> {
    let sql = format!("SELECT id, owner, balance, version FROM accounts WHERE id = ?{lock}");
    let row = q(backend, &sql).bind(id).fetch_optional(conn).await?;
    Ok(row.as_ref().map(account_of).transpose()?)
}

async fn must_load(
    conn: &mut AnyConnection,
    backend: Backend,
    id: i64,
    lock: &str,
) -> contend::Result<Account> {
    load_account(conn, backend, id, lock)
        .await?
        .ok_or_else(|| abort(account_missing(id)))
}

/// Writes an account's new balance and version (+1); with `checked`, only if its version is
/// still `old.version`.
pub(crate) async fn write_balance(
    tx: &mut Tx,
    old: &Account,
    balance: i64,
    checked: bool,
) -> contend::Result<()> {
    let sql = if checked {
        "UPDATE accounts SET balance = ?, version = ? WHERE id = ? AND version = ?"
    } else {
        "UPDATE accounts SET balance = ?, version = ? WHERE id = ?"
    };
    let mut query = tx
        .query(sql)
        .bind(balance)
        .bind(old.version + 1)
        .bind(old.id);
    if checked {
        query = query.bind(old.version);
    }
    let done = query.execute(tx.conn()).await?;
    if checked {
        contend::strategy::optimistic::check(done.rows_affected())?;
    }
    Ok(())
}

/// Records one balance movement.
pub(crate) async fn ledger(
    tx: &mut Tx,
    account: i64,
    amount: i64,
    kind: &str,
    reference: Option<i64>,
) -> contend::Result<()> {
    tx.query("INSERT INTO ledger (account_id, amount, kind, ref_id) VALUES (?, ?, ?, ?)")
        .bind(account)
        .bind(amount)
        .bind(kind.to_string())
        .bind(reference)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// Reads an account inside a transaction, after the write.
async fn reread(tx: &mut Tx, id: i64) -> contend::Result<Account> {
    let backend = tx.backend();
    must_load(tx.conn(), backend, id, "").await
}

/// `INSERT ... RETURNING id`.
pub(crate) async fn insert_returning_id(
    tx: &mut Tx,
    sql: &str,
    binds: &[BindValue],
) -> contend::Result<i64> {
    let sql = format!("{sql} RETURNING id");
    let mut query = tx.query(&sql);
    for b in binds {
        query = match b {
            BindValue::Int(v) => query.bind(*v),
            BindValue::Text(v) => query.bind(v.clone()),
        };
    }
    let row = query.fetch_one(tx.conn()).await?;
    Ok(row.try_get::<i64, _>(0)?)
}

/// A value to bind in [`insert_returning_id`].
pub(crate) enum BindValue {
    Int(i64),
    Text(String),
}

/// Deposit (positive) or withdrawal (negative) on one account.
struct BalanceOp {
    backend: Backend,
    account: i64,
    delta: i64,
    kind: &'static str,
}

fn over_max(field: &str) -> ApiError {
    ApiError::invalid_value(field, "would take the balance above 10^15")
}

fn insufficient(id: i64) -> ApiError {
    ApiError::conflict(
        "insufficient_funds",
        format!("account {id} has insufficient funds"),
    )
}

impl Write for BalanceOp {
    fn status(&self) -> StatusCode {
        StatusCode::OK
    }
}

/// What a deposit or withdrawal decides on: the account, and under `batched` the ledger rows of
/// the operations decided on it in memory ([`Operation::apply`]) that
/// [`Operation::write_state`] writes with its new balance.
pub(crate) struct Balance {
    account: Account,
    /// `(amount, kind)` of each balance change decided in memory, in order.
    ledger: Vec<(i64, &'static str)>,
}

/// At most this many ledger rows in one `INSERT` of [`BalanceOp::write_state`] (3 parameters
/// each: far below every backend's limit on parameters per statement).
const LEDGER_ROWS_PER_INSERT: usize = 500;

impl BalanceOp {
    /// The decision of [`Operation::write`] on `old`: the new balance, or the refusal.
    fn decide(&self, old: &Account) -> Result<i64, ApiError> {
        let balance = old.balance.checked_add(self.delta).unwrap_or(i64::MAX);
        if balance > MAX_MONEY {
            return Err(over_max("amount"));
        }
        if balance < 0 {
            return Err(insufficient(old.id));
        }
        Ok(balance)
    }
}

impl Operation for BalanceOp {
    type State = Balance;
    type Output = Account;
    type Error = contend::Error;

    fn keys(&self) -> Vec<String> {
        vec![format!("account:{}", self.account)]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, contend::Result<Balance>> {
        Box::pin(async move {
            Ok(Balance {
                account: must_load(conn, self.backend, self.account, lock).await?,
                ledger: Vec::new(),
            })
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c Balance,
        checked: bool,
    ) -> BoxFuture<'c, contend::Result<Account>> {
        Box::pin(async move {
            let old = &state.account;
            let balance = self.decide(old).map_err(abort)?;
            write_balance(tx, old, balance, checked).await?;
            ledger(tx, old.id, self.delta, self.kind, None).await?;
            Ok(Account {
                balance,
                version: old.version + 1,
                ..old.clone()
            })
        })
    }

    /// [`Operation::write`]'s decision on the running account: a success moves its balance
    /// and version on and queues its ledger row; a refusal changes nothing.
    fn apply(&self, state: &mut Balance) -> Option<contend::Result<Account>> {
        Some(match self.decide(&state.account) {
            Ok(balance) => {
                state.account.balance = balance;
                state.account.version += 1;
                state.ledger.push((self.delta, self.kind));
                Ok(state.account.clone())
            }
            Err(refusal) => Err(abort(refusal)),
        })
    }

    /// The account's final balance and version (the row is locked by the batch's read), and
    /// the queued ledger rows in multi-row `INSERT`s; nothing when every operation was refused.
    fn write_state<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c Balance,
    ) -> Option<BoxFuture<'c, contend::Result<()>>> {
        Some(Box::pin(async move {
            if state.ledger.is_empty() {
                return Ok(());
            }
            let account = &state.account;
            tx.query("UPDATE accounts SET balance = ?, version = ? WHERE id = ?")
                .bind(account.balance)
                .bind(account.version)
                .bind(account.id)
                .execute(tx.conn())
                .await?;
            for rows in state.ledger.chunks(LEDGER_ROWS_PER_INSERT) {
                let mut sql =
                    String::from("INSERT INTO ledger (account_id, amount, kind, ref_id) VALUES ");
                for i in 0..rows.len() {
                    sql.push_str(if i == 0 {
                        "(?, ?, ?, NULL)"
                    } else {
                        ", (?, ?, ?, NULL)"
                    });
                }
                let mut query = tx.query(&sql);
                for &(amount, kind) in rows {
                    query = query.bind(account.id).bind(amount).bind(kind);
                }
                query.execute(tx.conn()).await?;
            }
            Ok(())
        }))
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, contend::Result<Account>>> {
        Some(Box::pin(async move {
            let done = if self.delta >= 0 {
                tx.query("UPDATE accounts SET balance = balance + ?, version = version + 1 WHERE id = ? AND balance <= ?")
                    .bind(self.delta)
                    .bind(self.account)
                    .bind(MAX_MONEY - self.delta)
                    .execute(tx.conn())
                    .await?
            } else {
                tx.query("UPDATE accounts SET balance = balance - ?, version = version + 1 WHERE id = ? AND balance >= ?")
                    .bind(-self.delta)
                    .bind(self.account)
                    .bind(-self.delta)
                    .execute(tx.conn())
                    .await?
            };
            if done.rows_affected() == 0 {
                let backend = tx.backend();
                must_load(tx.conn(), backend, self.account, "").await?;
                return Err(abort(if self.delta >= 0 {
                    over_max("amount")
                } else {
                    insufficient(self.account)
                }));
            }
            ledger(tx, self.account, self.delta, self.kind, None).await?;
            reread(tx, self.account).await
        }))
    }
}

/// A transfer between two accounts.
struct TransferOp {
    backend: Backend,
    from: i64,
    to: i64,
    amount: i64,
}

impl TransferOp {
    /// Records the transfer and both of its ledger movements. On PostgreSQL that is one
    /// statement (a data-modifying `WITH`: the transfer row, then both ledger rows referring to
    /// it), elsewhere an `INSERT ... RETURNING id` and one two-row `INSERT`.
    async fn record(&self, tx: &mut Tx) -> contend::Result<Transfer> {
        let id = if tx.backend() == Backend::Postgres {
            let row = tx
                .query(
                    "WITH t AS (INSERT INTO transfers (from_id, to_id, amount) VALUES (?, ?, ?) RETURNING id) \
                     INSERT INTO ledger (account_id, amount, kind, ref_id) \
                     SELECT ?, ?, 'transfer', id FROM t UNION ALL SELECT ?, ?, 'transfer', id FROM t \
                     RETURNING ref_id",
                )
                .bind(self.from)
                .bind(self.to)
                .bind(self.amount)
                .bind(self.from)
                .bind(-self.amount)
                .bind(self.to)
                .bind(self.amount)
                .fetch_one(tx.conn())
                .await?;
            row.try_get::<i64, _>(0)?
        } else {
            let id = insert_returning_id(
                tx,
                "INSERT INTO transfers (from_id, to_id, amount) VALUES (?, ?, ?)",
                &[
                    BindValue::Int(self.from),
                    BindValue::Int(self.to),
                    BindValue::Int(self.amount),
                ],
            )
            .await?;
            tx.query(
                "INSERT INTO ledger (account_id, amount, kind, ref_id) \
                 VALUES (?, ?, 'transfer', ?), (?, ?, 'transfer', ?)",
            )
            .bind(self.from)
            .bind(-self.amount)
            .bind(id)
            .bind(self.to)
            .bind(self.amount)
            .bind(id)
            .execute(tx.conn())
            .await?;
            id
        };
        Ok(Transfer {
            id,
            from: self.from,
            to: self.to,
            amount: self.amount,
        })
    }

    /// Why the conditional `UPDATE` of [`Operation::atomic`] did not change both rows, read inside the
    /// same transaction (the rows it found are locked by it): in the contract's order, a missing
    /// account (404), `to` going above 10^15 (422), then insufficient funds (409).
    async fn refusal(&self, tx: &mut Tx) -> contend::Result<ApiError> {
        let backend = tx.backend();
        let from = must_load(tx.conn(), backend, self.from, "").await?;
        let to = must_load(tx.conn(), backend, self.to, "").await?;
        Ok(if to.balance > MAX_MONEY - self.amount {
            ApiError::invalid_value("amount", "would take the balance of `to` above 10^15")
        } else if from.balance < self.amount {
            insufficient(from.id)
        } else {
            // Both conditions hold on the rows this transaction has locked: cannot happen.
            ApiError::unavailable(
                "transfer_conflict",
                "the transfer's accounts changed while it ran; try again",
            )
        })
    }
}

impl Write for TransferOp {}

impl Operation for TransferOp {
    type State = (Account, Account);
    type Output = Transfer;
    type Error = contend::Error;

    fn keys(&self) -> Vec<String> {
        let (a, b) = (self.from.min(self.to), self.from.max(self.to));
        vec![format!("account:{a}"), format!("account:{b}")]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, contend::Result<(Account, Account)>> {
        Box::pin(async move {
            let backend = self.backend;
            // Canonical order: the lower id first, so two opposite transfers cannot deadlock.
            let (first, second) = (self.from.min(self.to), self.from.max(self.to));
            let a = must_load(conn, backend, first, lock).await?;
            let b = must_load(conn, backend, second, lock).await?;
            Ok(if a.id == self.from { (a, b) } else { (b, a) })
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c (Account, Account),
        checked: bool,
    ) -> BoxFuture<'c, contend::Result<Transfer>> {
        Box::pin(async move {
            let (from, to) = state;
            let credited = to.balance.checked_add(self.amount).unwrap_or(i64::MAX);
            if credited > MAX_MONEY {
                return Err(abort(ApiError::invalid_value(
                    "amount",
                    "would take the balance of `to` above 10^15",
                )));
            }
            if from.balance < self.amount {
                return Err(abort(insufficient(from.id)));
            }
            let (first, second) = if from.id < to.id {
                ((from, from.balance - self.amount), (to, credited))
            } else {
                ((to, credited), (from, from.balance - self.amount))
            };
            write_balance(tx, first.0, first.1, checked).await?;
            write_balance(tx, second.0, second.1, checked).await?;
            self.record(tx).await
        })
    }

    /// Both balances in one conditional `UPDATE` (each row checks its own condition), which
    /// locks the two rows in id order, so that opposite transfers cannot deadlock: PostgreSQL
    /// locks them first in a sorted `FOR NO KEY UPDATE` subquery, MariaDB updates
    /// `ORDER BY id`, SQLite has one writer at a time. Fewer than two rows changed means a
    /// refusal: the transaction rolls back and [`TransferOp::refusal`] says why.
    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, contend::Result<Transfer>>> {
        Some(Box::pin(async move {
            const BOTH_ROWS: &str = "UPDATE accounts \
                 SET balance = CASE WHEN id = ? THEN balance - ? ELSE balance + ? END, \
                     version = version + 1 \
                 WHERE id IN (?, ?) AND CASE WHEN id = ? THEN balance >= ? ELSE balance <= ? END";
            let sql = match tx.backend() {
                Backend::Postgres => std::borrow::Cow::Borrowed(
                    "UPDATE accounts AS a \
                     SET balance = CASE WHEN a.id = ? THEN a.balance - ? ELSE a.balance + ? END, \
                         version = a.version + 1 \
                     FROM (SELECT id FROM accounts WHERE id IN (?, ?) ORDER BY id FOR NO KEY UPDATE) AS l \
                     WHERE a.id = l.id AND CASE WHEN a.id = ? THEN a.balance >= ? ELSE a.balance <= ? END",
                ),
                Backend::MySql => format!("{BOTH_ROWS} ORDER BY id").into(),
                _ => BOTH_ROWS.into(),
            };
            let done = tx
                .query(&sql)
                .bind(self.from)
                .bind(self.amount)
                .bind(self.amount)
                .bind(self.from)
                .bind(self.to)
                .bind(self.from)
                .bind(self.amount)
                .bind(MAX_MONEY - self.amount)
                .execute(tx.conn())
                .await?;
            if done.rows_affected() != 2 {
                return Err(abort(self.refusal(tx).await?));
            }
            self.record(tx).await
        }))
    }
}

/// Fetches an account on a request's session, outside a transaction (existence checks).
async fn fetch_account_on(
    session: &mut crate::ReqSession,
    id: i64,
) -> Result<Option<Account>, ApiError> {
    let backend = session.db().backend();
    Ok(session
        .autocommit(move |conn| Box::pin(load_account(conn, backend, id, "")))
        .await?)
}

/// Fetches an account outside a transaction (existence checks, GET).
async fn fetch_account(state: &AppState, id: i64) -> Result<Option<Account>, ApiError> {
    let db = &state.inner.db;
    let backend = db.backend();
    Ok(db
        .session()
        .autocommit(move |conn| Box::pin(load_account(conn, backend, id, "")))
        .await?)
}

/// `POST /accounts`
#[utoipa::path(post, path = "/accounts", request_body = NewAccount, security(("bearer" = [])),
    responses((status = 201, body = CreatedAccount), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody)))]
pub async fn create_account(
    State(state): State<AppState>,
    req: JsonRequest<NewAccount>,
) -> Response {
    req.run_keyed(&state, move |st, auth, body, strategy, mut session, key| async move {
        auth.require_admin()?;
        check_text("owner", &body.owner, 1, 64)?;
        check_range("balance", body.balance, 0, MAX_MONEY)?;
        engine::check_supported(&st, strategy)?;
        let token = crate::auth::new_token();
        let hash = hex::encode(crate::auth::hash_token(&token));
        let owner = body.owner.clone();
        let balance = body.balance;
        let run = session
            .run(&contend::TxOptions::new(), move |tx| {
                let owner = owner.clone();
                let hash = hash.clone();
                let token = token.clone();
                let key = key.clone();
                Box::pin(async move {
                    let id = insert_returning_id(
                        tx,
                        "INSERT INTO accounts (owner, balance, version, token_hash) VALUES (?, ?, 0, ?)",
                        &[BindValue::Text(owner.clone()), BindValue::Int(balance), BindValue::Text(hash)],
                    )
                    .await?;
                    ledger(tx, id, balance, "open", None).await?;
                    let created = CreatedAccount {
                        id,
                        owner,
                        balance,
                        version: 0,
                        token,
                    };
                    let outcome = Outcome::json(StatusCode::CREATED, &created);
                    idempotency::store_in_tx(tx, &key, &outcome).await?;
                    Ok(outcome)
                })
            })
            .await;
        Ok(run.result?)
    })
    .await
}

/// `GET /accounts/{id}`
#[utoipa::path(get, path = "/accounts/{id}", params(("id" = i64, Path, description = "account id")),
    security(("bearer" = [])),
    responses((status = 200, body = Account), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_account(
    State(state): State<AppState>,
    Auth(auth): Auth,
    id: RawPath,
) -> Result<Outcome, ApiError> {
    let id = path_id(id, "account id")?;
    auth.require_admin_or(id)?;
    let account = fetch_account(&state, id)
        .await?
        .ok_or_else(|| account_missing(id))?;
    Ok(Outcome::json(StatusCode::OK, &account))
}

/// `POST /accounts/{id}/deposit`
#[utoipa::path(post, path = "/accounts/{id}/deposit", params(("id" = i64, Path, description = "account id")),
    request_body = AmountBody, security(("bearer" = [])),
    responses((status = 200, body = Account), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody),
              (status = 503, body = crate::error::ErrorBody)))]
pub async fn deposit(
    State(state): State<AppState>,
    id: RawPath,
    req: JsonRequest<AmountBody>,
) -> Response {
    balance_change(state, id, req, true).await
}

/// `POST /accounts/{id}/withdraw`
#[utoipa::path(post, path = "/accounts/{id}/withdraw", params(("id" = i64, Path, description = "account id")),
    request_body = AmountBody, security(("bearer" = [])),
    responses((status = 200, body = Account), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody, description = "insufficient_funds"),
              (status = 422, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn withdraw(
    State(state): State<AppState>,
    id: RawPath,
    req: JsonRequest<AmountBody>,
) -> Response {
    balance_change(state, id, req, false).await
}

async fn balance_change(
    state: AppState,
    raw_id: RawPath,
    req: JsonRequest<AmountBody>,
    deposit: bool,
) -> Response {
    let id = match path_id(raw_id, "account id") {
        Ok(id) => id,
        Err(e) => return axum::response::IntoResponse::into_response(e),
    };
    req.run_keyed(
        &state,
        move |st, auth, body, strategy, mut session, key| async move {
            if deposit {
                auth.require_admin()?;
            } else {
                auth.require_account(id)?;
            }
            let invalid = engine::check_supported(&st, strategy)
                .and_then(|()| check_range("amount", body.amount, 1, MAX_MONEY));
            if let Err(invalid) = invalid {
                // 404 comes before 422: look the account up only when a 422 is due. On the way
                // that succeeds, every strategy's read or conditional statement finds out
                // itself that the account is missing (404), which saves a round trip per
                // request.
                if fetch_account_on(&mut session, id).await?.is_none() {
                    return Err(account_missing(id));
                }
                return Err(invalid);
            }
            let op = BalanceOp {
                backend: st.inner.db.backend(),
                account: id,
                delta: if deposit { body.amount } else { -body.amount },
                kind: if deposit { "deposit" } else { "withdraw" },
            };
            engine::execute(&st, strategy, op, &mut session, &key).await
        },
    )
    .await
}

/// `POST /transfers`
#[utoipa::path(post, path = "/transfers", request_body = NewTransfer, security(("bearer" = [])),
    responses((status = 201, body = Transfer), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody, description = "account_not_found"),
              (status = 409, body = crate::error::ErrorBody, description = "insufficient_funds"),
              (status = 422, body = crate::error::ErrorBody, description = "invalid_value, same_account"),
              (status = 503, body = crate::error::ErrorBody)))]
pub async fn create_transfer(
    State(state): State<AppState>,
    req: JsonRequest<NewTransfer>,
) -> Response {
    req.run_keyed(
        &state,
        move |st, auth, body, strategy, mut session, key| async move {
            // The caller must hold `from`'s token; an unknown `from` can have no token: also 403.
            auth.require_account(body.from)?;
            let invalid = engine::check_supported(&st, strategy)
                .and_then(|()| check_range("amount", body.amount, 1, MAX_MONEY))
                .and_then(|()| {
                    if body.from == body.to {
                        Err(ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "same_account",
                            "`from` and `to` must be different accounts",
                        ))
                    } else {
                        Ok(())
                    }
                });
            if let Err(invalid) = invalid {
                // 404 comes before 422: look `to` up only when a 422 is due. On the way that
                // succeeds, every strategy's write finds out itself that `to` is missing (and
                // says 404 before 409), which saves a round trip per transfer.
                if body.to != body.from && fetch_account_on(&mut session, body.to).await?.is_none()
                {
                    return Err(account_missing(body.to));
                }
                return Err(invalid);
            }
            let op = TransferOp {
                backend: st.inner.db.backend(),
                from: body.from,
                to: body.to,
                amount: body.amount,
            };
            engine::execute(&st, strategy, op, &mut session, &key).await
        },
    )
    .await
}

/// Query of `GET /accounts/{id}/transfers`: an optional page, by id (keyset pagination).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TransferPage {
    /// At most this many transfers, 1..=1000 (default: all of them).
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// Only transfers with an id below this one: the last id of the previous page.
    #[param(value_type = Option<i64>)]
    pub before: Option<String>,
}

/// Largest `limit` of a transfer list page.
pub const MAX_PAGE: i64 = 1000;

impl TransferPage {
    /// `(limit, before)`, checked: 400 `invalid_query` for a non-integer, 422 out of range.
    fn parse(&self) -> Result<(Option<i64>, Option<i64>), ApiError> {
        let int = |name: &str, raw: &Option<String>| -> Result<Option<i64>, ApiError> {
            raw.as_deref()
                .map(|v| {
                    v.parse::<i64>().map_err(|_| {
                        ApiError::invalid_query(format!(
                            "`{name}` must be an integer, got `{}`",
                            v.escape_default()
                        ))
                    })
                })
                .transpose()
        };
        let limit = int("limit", &self.limit)?;
        let before = int("before", &self.before)?;
        if let Some(limit) = limit {
            check_range("limit", limit, 1, MAX_PAGE)?;
        }
        if let Some(before) = before {
            check_range("before", before, 1, i64::MAX)?;
        }
        Ok((limit, before))
    }
}

/// `GET /accounts/{id}/transfers`
#[utoipa::path(get, path = "/accounts/{id}/transfers",
    params(("id" = i64, Path, description = "account id"), TransferPage),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<Transfer>, description = "both directions, newest first"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody, description = "limit or before out of range")))]
pub async fn list_transfers(
    State(state): State<AppState>,
    Auth(auth): Auth,
    id: RawPath,
    page: Result<Query<TransferPage>, axum::extract::rejection::QueryRejection>,
) -> Result<Outcome, ApiError> {
    let id = path_id(id, "account id")?;
    let Query(page) = page.map_err(|e| {
        ApiError::invalid_query(format!(
            "the query string cannot be read: {}",
            e.body_text()
        ))
    })?;
    let (limit, before) = page.parse()?;
    auth.require_admin_or(id)?;
    if fetch_account(&state, id).await?.is_none() {
        return Err(account_missing(id));
    }
    let db = &state.inner.db;
    let mut sql = String::from(
        "SELECT id, from_id, to_id, amount FROM transfers WHERE from_id = ? AND id < ? \
         UNION ALL SELECT id, from_id, to_id, amount FROM transfers WHERE to_id = ? AND id < ? \
         ORDER BY id DESC",
    );
    if limit.is_some() {
        sql.push_str(" LIMIT ?");
    }
    let before = before.unwrap_or(i64::MAX);
    let mut query = db.query(&sql).bind(id).bind(before).bind(id).bind(before);
    if let Some(limit) = limit {
        query = query.bind(limit);
    }
    let rows = db
        .session()
        .autocommit(|c| Box::pin(async move { Ok::<_, contend::Error>(query.fetch_all(c).await?) }))
        .await?;
    let mut transfers = Vec::with_capacity(rows.len());
    for row in &rows {
        transfers.push(Transfer {
            id: row.try_get(0)?,
            from: row.try_get(1)?,
            to: row.try_get(2)?,
            amount: row.try_get(3)?,
        });
    }
    Ok(Outcome::json(StatusCode::OK, &transfers))
}
