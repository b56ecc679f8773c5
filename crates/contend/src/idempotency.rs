//! Idempotency keys: a request that carries a key executes at most once per key and caller, and
//! its stored outcome is replayed byte for byte afterwards. This module is the key store; it
//! knows nothing of HTTP (an [`Outcome`] is a status number and body bytes). The axum layer of
//! `contend-axum` is built on it.
//!
//! # The anomaly it prevents
//! A client retries a request whose answer it never got (a timeout, a dropped connection), or
//! sends it twice at once. Without keys the request runs twice: two transfers, two orders. A
//! store that *checks* for the key and then *inserts* it lets two concurrent duplicates both
//! see "absent" and both run. Here the key row is inserted first ([`Store::claim`]), so the
//! database's primary key decides which duplicate runs; the others see the row and get
//! [`Claim::InFlight`], a replay ([`Claim::Completed`]) or [`Claim::Mismatch`].
//!
//! # How
//! - A claim inserts `(scope, key)` with the request's [`Fingerprint`], a random owner nonce and
//!   a lease (an in-flight marker). Only the owner may complete or release the key.
//! - The business transaction stores the outcome itself, just before `COMMIT`
//!   ([`Claimed::complete_in`]): the write and its stored outcome commit together or not at
//!   all. A crash after the commit leaves a completed key (replayed afterwards), never an
//!   in-flight one whose lease would expire and let the request run twice. A request whose lease
//!   expired and whose key was taken over cannot commit any more ([`KeyLost`]).
//! - Outcomes decided without a committed write are stored after it ([`Store::complete`]); a
//!   failure that should not be remembered releases the key ([`Store::release`]) so the same
//!   key can be used again.
//! - If the process dies while a request is in flight, nothing of it committed; its lease
//!   expires and the next claim takes the key over.
//!
//! Lease deadlines are compared with the clocks of the processes that share the table, in
//! milliseconds since the Unix epoch: keep those clocks in sync to well under the lease.
//!
//! # Databases
//! A [`Store`] runs on any [`Db`]: `Store<sqlx::Any>` (the default, for a backend chosen by URL)
//! or the application's own typed pool, `Store::new(Db::from_pool(pg_pool)?)`, a
//! `Store<sqlx::Postgres>`. [`Claimed::complete_in`] takes the business transaction of any
//! database, `&mut Tx<DB>`, so a handler on a `Db<sqlx::Postgres>` stores its outcome in its own
//! `Tx<sqlx::Postgres>`. The store's statements are written once with `?` placeholders and run
//! through [`crate::Database`]; nothing here names a backend.
//!
//! # Schema
//! [`schema`] gives the `CREATE TABLE` of a backend, with the column types of its
//! [`Dialect`](crate::backend::Dialect); [`Store::ensure_schema`] runs it. Bodies are stored as
//! text, so an outcome's body must be UTF-8 (JSON, text): [`Outcome::new`] checks it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
//! use contend::idempotency::{Claim, Fingerprint, Key, Outcome, Store};
//! let db = contend::Db::connect("sqlite::memory:").await?;
//! let store = Store::new(db.clone());
//! store.ensure_schema().await?;
//! let key = Key::new("caller-1", "order-42").expect("valid key");
//! let fp = Fingerprint::request("POST", "/orders", br#"{"sku":"a"}"#);
//!
//! let Claim::Claimed(claimed) = store.claim(&key, &fp).await? else { unreachable!() };
//! // The business transaction stores its outcome before it commits.
//! let outcome = Outcome::new(201, br#"{"id":1}"#.to_vec()).expect("UTF-8");
//! db.transaction(|tx| {
//!     let (claimed, outcome) = (claimed.clone(), outcome.clone());
//!     Box::pin(async move {
//!         // ... the business writes ...
//!         claimed.complete_in(tx, &outcome).await
//!     })
//! })
//! .await?;
//!
//! // A retry gets the stored outcome; another request under the same key is refused.
//! assert!(matches!(store.claim(&key, &fp).await?, Claim::Completed(o) if o == outcome));
//! let other = Fingerprint::request("POST", "/orders", br#"{"sku":"b"}"#);
//! assert!(matches!(store.claim(&key, &other).await?, Claim::Mismatch));
//! # Ok(()) }
//! ```
//!
//! On a typed pool the same code runs unchanged, and the transaction's connection is the
//! database's own (`&mut SqliteConnection` here, `&mut PgConnection` on a `PgPool`):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
//! use contend::idempotency::{Claim, Fingerprint, Key, Outcome, Store};
//! let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
//! let db = contend::Db::from_pool(pool)?; // a Db<sqlx::Sqlite>
//! db.execute_script("CREATE TABLE orders (id INTEGER)").await?;
//! let store = Store::new(db.clone());
//! store.ensure_schema().await?;
//! let key = Key::new("caller-1", "order-42").expect("valid key");
//! let fp = Fingerprint::request("POST", "/orders", b"{}");
//! let Claim::Claimed(claimed) = store.claim(&key, &fp).await? else { unreachable!() };
//! let outcome = Outcome::new(201, b"{}".to_vec()).expect("UTF-8");
//! db.transaction(|tx| Box::pin(async move {
//!     sqlx::query("INSERT INTO orders VALUES (?)").bind(42_i64).execute(tx.conn()).await?;
//!     claimed.complete_in(tx, &outcome).await
//! }))
//! .await?;
//! assert!(matches!(store.claim(&key, &fp).await?, Claim::Completed(_)));
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Any;

use crate::backend::{Backend, ColumnKind, Database};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::session::classified;
use crate::strategy::Value;
use crate::tx::Tx;

/// The default table name.
pub const DEFAULT_TABLE: &str = "idempotency_keys";

/// How long an in-flight marker protects its key by default: far longer than a request may run.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);

/// Longest key, in bytes (the column is a `VARCHAR(255)`).
pub const MAX_KEY_LEN: usize = 255;

/// Longest scope, in bytes (for example the 64 hex digits of a SHA-256).
pub const MAX_SCOPE_LEN: usize = 64;

/// How often [`Store::claim`] retries when the key's row changes under it.
const CLAIM_ATTEMPTS: usize = 5;

/// The `CREATE TABLE IF NOT EXISTS` of the key table `table` on `backend`, with the column
/// types of its [`Dialect`](crate::backend::Dialect).
///
/// Columns: `scope` and `idem_key` (the primary key), `fingerprint` (hex SHA-256), `owner` (the
/// current claimant's nonce), `status_code` and `body` (`NULL` while in flight), `lease_until`
/// (milliseconds since the Unix epoch). The text columns of the key compare byte for byte
/// ([`Dialect::exact_ascii_type`](crate::backend::Dialect::exact_ascii_type)), so that keys
/// differing only in case or trailing spaces stay distinct on every backend.
///
/// ```
/// use contend::Backend;
/// let sql = contend::idempotency::schema(Backend::Postgres, "keys");
/// assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS keys (scope TEXT NOT NULL"));
/// assert!(contend::idempotency::schema(Backend::MySql, "keys").ends_with("ENGINE = InnoDB"));
/// ```
pub fn schema(backend: Backend, table: &str) -> String {
    let d = backend.dialect();
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (\
         scope {scope} NOT NULL, \
         idem_key {key} NOT NULL, \
         fingerprint {hash} NOT NULL, \
         owner {owner} NOT NULL, \
         status_code BIGINT, \
         body {body}, \
         lease_until BIGINT NOT NULL, \
         PRIMARY KEY (scope, idem_key)){options}",
        scope = d.exact_ascii_type(MAX_SCOPE_LEN),
        key = d.exact_ascii_type(MAX_KEY_LEN),
        hash = d.exact_ascii_type(64),
        owner = d.exact_ascii_type(32),
        body = d.long_text_type(),
        options = d.table_options(),
    )
}

/// What is wrong with a key, a scope, a table name or an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// The key is empty, longer than [`MAX_KEY_LEN`] bytes or not printable ASCII.
    #[error("an idempotency key must be 1 to {MAX_KEY_LEN} printable ASCII characters")]
    Key,
    /// The scope is empty, longer than [`MAX_SCOPE_LEN`] bytes or not printable ASCII.
    #[error("an idempotency scope must be 1 to {MAX_SCOPE_LEN} printable ASCII characters")]
    Scope,
    /// The table name is not a plain SQL identifier.
    #[error("`{0}` is not a plain table name (letters, digits and `_`, not starting with a digit)")]
    Table(String),
    /// The body of an outcome is not UTF-8 (bodies are stored as text).
    #[error("an outcome's body must be UTF-8 to be stored")]
    BodyNotUtf8,
    /// A key claimed in a store on one backend was to be completed in a transaction on another
    /// ([`Claimed::complete_in`]).
    #[error("a key claimed in a {store} key store cannot be completed in a {tx} transaction")]
    OtherBackend {
        /// The backend of the store that claimed the key.
        store: Backend,
        /// The backend of the transaction.
        tx: Backend,
    },
}

/// The request that owned a key lost it: its lease expired and another request took the key
/// over. Returned (inside [`Error::Aborted`]) by [`Claimed::complete_in`]; the transaction
/// must roll back, since the other request is the one that executes. See [`is_key_lost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this request's claim on its idempotency key expired and another request took it over; \
     nothing was done here"
)]
pub struct KeyLost;

/// Whether `err` is [`KeyLost`] (carried by [`Error::Aborted`]).
pub fn is_key_lost(err: &Error) -> bool {
    matches!(err, Error::Aborted(inner) if inner.is::<KeyLost>())
}

fn printable_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// An idempotency key within its scope: what separates callers (for example the hash of the
/// caller's credentials), and the key the caller chose. Two callers may use the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    scope: String,
    key: String,
}

impl Key {
    /// A key `key` in `scope`.
    ///
    /// # Errors
    /// [`InvalidInput::Scope`] or [`InvalidInput::Key`]: both must be non-empty printable ASCII,
    /// at most [`MAX_SCOPE_LEN`] and [`MAX_KEY_LEN`] bytes (hash longer caller identities).
    ///
    /// ```
    /// use contend::idempotency::{InvalidInput, Key};
    /// assert!(Key::new("user-7", "pay-2024-05").is_ok());
    /// assert_eq!(Key::new("user-7", "").unwrap_err(), InvalidInput::Key);
    /// assert_eq!(Key::new("", "k").unwrap_err(), InvalidInput::Scope);
    /// ```
    pub fn new(scope: impl Into<String>, key: impl Into<String>) -> Result<Key, InvalidInput> {
        let (scope, key) = (scope.into(), key.into());
        if scope.is_empty() || scope.len() > MAX_SCOPE_LEN || !printable_ascii(&scope) {
            return Err(InvalidInput::Scope);
        }
        if key.is_empty() || key.len() > MAX_KEY_LEN || !printable_ascii(&key) {
            return Err(InvalidInput::Key);
        }
        Ok(Key { scope, key })
    }

    /// The scope.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// What makes two requests "the same request": a SHA-256, stored with the key. A later request
/// under the same key with another fingerprint is refused ([`Claim::Mismatch`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a request: SHA-256 of `method`, `target` (path and query) and `body`,
    /// separated by newlines (unambiguous: a method and a request target contain none).
    ///
    /// ```
    /// use contend::idempotency::Fingerprint;
    /// let a = Fingerprint::request("POST", "/transfers", b"{\"amount\":1}");
    /// assert_eq!(a, Fingerprint::request("POST", "/transfers", b"{\"amount\":1}"));
    /// assert_ne!(a, Fingerprint::request("POST", "/transfers", b"{\"amount\":2}"));
    /// assert_eq!(a.as_str().len(), 64);
    /// ```
    pub fn request(method: &str, target: &str, body: &[u8]) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update(b"\n");
        h.update(target.as_bytes());
        h.update(b"\n");
        h.update(body);
        Fingerprint(hex::encode(h.finalize()))
    }

    /// A fingerprint from a SHA-256 digest computed by the caller (its own notion of sameness).
    pub fn from_digest(digest: [u8; 32]) -> Fingerprint {
        Fingerprint(hex::encode(digest))
    }

    /// The 64 hex digits, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A finished request's outcome, as stored and replayed: a status number and the body bytes
/// (UTF-8, since they are stored as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    status: u16,
    body: Vec<u8>,
}

impl Outcome {
    /// An outcome with `status` and `body`.
    ///
    /// # Errors
    /// [`InvalidInput::BodyNotUtf8`] when `body` is not UTF-8.
    pub fn new(status: u16, body: Vec<u8>) -> Result<Outcome, InvalidInput> {
        if std::str::from_utf8(&body).is_err() {
            return Err(InvalidInput::BodyNotUtf8);
        }
        Ok(Outcome { status, body })
    }

    /// An outcome with a text body (always valid).
    pub fn text(status: u16, body: String) -> Outcome {
        Outcome {
            status,
            body: body.into_bytes(),
        }
    }

    /// The status number.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body bytes, owned.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    fn body_text(&self) -> &str {
        // Checked by the constructors.
        std::str::from_utf8(&self.body).unwrap_or_default()
    }
}

/// The answer to [`Store::claim`].
#[derive(Debug, Clone)]
#[must_use = "a claim that wins must be completed or released"]
pub enum Claim {
    /// This request owns the key: execute it, then complete ([`Claimed::complete_in`],
    /// [`Store::complete`]) or release ([`Store::release`]) the key.
    Claimed(Claimed),
    /// The key was completed by the same request before: answer with this outcome, execute
    /// nothing.
    Completed(Outcome),
    /// The same request still runs elsewhere (its lease has not expired): retry later.
    InFlight {
        /// How long until its lease expires (an upper bound on the wait).
        lease_left: Duration,
    },
    /// The key was used for a different request (another fingerprint).
    Mismatch,
}

/// A key this request owns. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Claimed {
    inner: Arc<ClaimedInner>,
}

#[derive(Debug)]
struct ClaimedInner {
    table: Arc<str>,
    backend: Backend,
    key: Key,
    owner: String,
}

impl Claimed {
    /// The claimed key.
    pub fn key(&self) -> &Key {
        &self.inner.key
    }

    /// Stores `outcome` as the key's outcome inside `tx`, the request's business transaction,
    /// just before it commits: the key is completed exactly when the business writes commit.
    /// The row is updated only while this request still owns the key and it is in flight.
    ///
    /// `tx` may be a transaction of any database type on the store's database: a key claimed
    /// by a `Store<sqlx::Any>` or a `Store<sqlx::Postgres>` is completed in a
    /// `Tx<sqlx::Postgres>` alike.
    ///
    /// # Errors
    /// [`KeyLost`] (in [`Error::Aborted`], see [`is_key_lost`]) when another request took the
    /// key over after this one's lease expired: return it from the transaction body so that the
    /// transaction rolls back. [`InvalidInput::OtherBackend`] (in [`Error::Aborted`]) when `tx`
    /// runs on another backend than the store that claimed the key. Database errors as usual.
    ///
    /// # Cancel safety
    /// One statement inside `tx`: dropping the future drops the transaction, which rolls back.
    pub async fn complete_in<DB: Database>(
        &self,
        tx: &mut Tx<DB>,
        outcome: &Outcome,
    ) -> Result<()> {
        let backend = tx.backend();
        if backend != self.inner.backend {
            return Err(Error::aborted(InvalidInput::OtherBackend {
                store: self.inner.backend,
                tx: backend,
            }));
        }
        let done = DB::execute_values(
            tx.conn(),
            backend,
            &self.complete_sql(),
            &self.complete_args(outcome),
        )
        .await?;
        if done != 1 {
            return Err(Error::aborted(KeyLost));
        }
        Ok(())
    }

    fn complete_sql(&self) -> String {
        format!(
            "UPDATE {} SET status_code = ?, body = ? \
             WHERE scope = ? AND idem_key = ? AND owner = ? AND status_code IS NULL",
            self.inner.table
        )
    }

    fn complete_args(&self, outcome: &Outcome) -> [Value; 5] {
        [
            Value::Int(i64::from(outcome.status)),
            Value::Text(outcome.body_text().to_string()),
            Value::Text(self.inner.key.scope.clone()),
            Value::Text(self.inner.key.key.clone()),
            Value::Text(self.inner.owner.clone()),
        ]
    }

    /// The parameters that pick this claim's row while it is in flight.
    fn owner_args(&self) -> [Value; 3] {
        [
            Value::Text(self.inner.key.scope.clone()),
            Value::Text(self.inner.key.key.clone()),
            Value::Text(self.inner.owner.clone()),
        ]
    }
}

/// The key store: a table of keys on a [`Db`] of any database (`Db<sqlx::Any>` by default, or a
/// typed pool's `Db<sqlx::Postgres>`, ...). Cheap to clone.
#[derive(Debug)]
pub struct Store<DB: Database = Any> {
    db: Db<DB>,
    table: Arc<str>,
    lease: Duration,
}

impl<DB: Database> Clone for Store<DB> {
    fn clone(&self) -> Self {
        Store {
            db: self.db.clone(),
            table: self.table.clone(),
            lease: self.lease,
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn nonce() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl<DB: Database> Store<DB> {
    /// A store on `db`, table [`DEFAULT_TABLE`], lease [`DEFAULT_LEASE`].
    pub fn new(db: Db<DB>) -> Store<DB> {
        Store {
            db,
            table: Arc::from(DEFAULT_TABLE),
            lease: DEFAULT_LEASE,
        }
    }

    /// Uses the table `name` instead of [`DEFAULT_TABLE`].
    ///
    /// # Errors
    /// [`InvalidInput::Table`] unless `name` is a plain identifier (ASCII letters, digits, `_`,
    /// not starting with a digit, at most 64 characters).
    pub fn table(mut self, name: &str) -> Result<Store<DB>, InvalidInput> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !ok {
            return Err(InvalidInput::Table(name.to_string()));
        }
        self.table = Arc::from(name);
        Ok(self)
    }

    /// Sets how long a claim protects its key before another request may take it over. Make
    /// it far longer than a request may run (a request timeout well below it).
    pub fn lease(mut self, lease: Duration) -> Store<DB> {
        self.lease = lease;
        self
    }

    /// The database.
    pub fn db(&self) -> &Db<DB> {
        &self.db
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Creates the key table if it does not exist ([`schema`]).
    ///
    /// # Errors
    /// The database's error.
    ///
    /// # Cancel safety
    /// Safe: `CREATE TABLE IF NOT EXISTS` either ran or did not.
    pub async fn ensure_schema(&self) -> Result<()> {
        match self
            .db
            .execute_script(&schema(self.db.backend(), &self.table))
            .await
        {
            // PostgreSQL: two concurrent CREATE TABLE IF NOT EXISTS can race on the catalog.
            Err(e) if e.lost_create_race() => Ok(()),
            other => other,
        }
    }

    fn lease_until(&self) -> i64 {
        now_ms().saturating_add(i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX))
    }

    /// Claims `key` for the request with fingerprint `fp`: inserts the key row first (with a
    /// new owner nonce and a lease), so that of concurrent claims exactly one wins, decided by
    /// the primary key. When the row exists: another fingerprint is [`Claim::Mismatch`]; a
    /// completed key is [`Claim::Completed`]; a live lease is [`Claim::InFlight`]; an expired
    /// lease is taken over with a conditional `UPDATE` on the old owner (again exactly one
    /// winner).
    ///
    /// Runs on one [`crate::Session`] of the store's `Db`, outside any transaction (every
    /// statement autocommits; behind a transaction pooler each is a transaction of its own):
    /// the claim must be visible to concurrent duplicates at once. Its writes (the `INSERT`
    /// and the take-over `UPDATE`) go through [`crate::Session::write_autocommit`]: on a
    /// SQLite `Db` with a writer queue ([`crate::DbBuilder::writer_queue`]) each waits for
    /// this process's turn to write instead of meeting the queue's writer in SQLite's busy
    /// handler. The future is `Send` (it runs inside `tokio::spawn`).
    ///
    /// # Errors
    /// Database errors; [`Error::Conflict`] ([`crate::ConflictKind::Busy`]) when the key's row
    /// kept changing under five attempts in a row, or when the SQLite writer's turn does not
    /// come within the `Db`'s acquire timeout.
    ///
    /// # Cancel safety
    /// Not cancellation-safe once the `INSERT` ran: dropped after it, the key stays in flight
    /// until its lease expires (no request executes under it meanwhile; retries get
    /// [`Claim::InFlight`]). Dropped while waiting for the writer's turn, it leaves the queue
    /// without writing; a connection interrupted mid-statement is closed, not pooled.
    pub async fn claim(&self, key: &Key, fp: &Fingerprint) -> Result<Claim> {
        let table = &self.table;
        let insert = format!(
            "INSERT INTO {table} (scope, idem_key, fingerprint, owner, status_code, body, lease_until) \
             VALUES (?, ?, ?, ?, NULL, NULL, ?)"
        );
        let select = format!(
            "SELECT fingerprint, owner, status_code, body, lease_until FROM {table} \
             WHERE scope = ? AND idem_key = ?"
        );
        let take_over = format!(
            "UPDATE {table} SET owner = ?, lease_until = ? \
             WHERE scope = ? AND idem_key = ? AND owner = ? AND status_code IS NULL"
        );
        let backend = self.db.backend();
        let scope = Value::Text(key.scope.clone());
        let idem_key = Value::Text(key.key.clone());
        // One session for the whole claim; every statement autocommits, the writes in the
        // writer's turn.
        let mut session = self.db.session();
        for _ in 0..CLAIM_ATTEMPTS {
            let owner = nonce();
            let args = [
                scope.clone(),
                idem_key.clone(),
                Value::Text(fp.0.clone()),
                Value::Text(owner.clone()),
                Value::Int(self.lease_until()),
            ];
            let inserted: Result<u64> = session
                .write_autocommit(write_values::<DB>(backend, insert.clone(), args.into()))
                .await;
            match inserted {
                Ok(_) => return Ok(Claim::Claimed(self.claimed(key, owner))),
                Err(e) => {
                    if !e.is_unique_violation() {
                        return Err(e);
                    }
                }
            }
            let args = [scope.clone(), idem_key.clone()];
            let row = session
                .autocommit(|c| {
                    classified(DB::fetch_row(c, backend, &select, &args, &STORED_COLUMNS))
                })
                .await?;
            let Some(row) = row else {
                continue; // released meanwhile: insert again
            };
            let stored = Stored::decode(row)?;
            if stored.fingerprint != fp.0 {
                return Ok(Claim::Mismatch);
            }
            if let Some(status) = stored.status {
                let status = u16::try_from(status).map_err(|_| {
                    Error::aborted(format!("stored status {status} of an idempotency key"))
                })?;
                return Ok(Claim::Completed(Outcome::text(
                    status,
                    stored.body.unwrap_or_default(),
                )));
            }
            let left = stored.lease_until.saturating_sub(now_ms());
            if left > 0 {
                return Ok(Claim::InFlight {
                    lease_left: Duration::from_millis(left.unsigned_abs()),
                });
            }
            // The lease expired (its process died): take the key over, atomically.
            let owner = nonce();
            let args = [
                Value::Text(owner.clone()),
                Value::Int(self.lease_until()),
                scope.clone(),
                idem_key.clone(),
                Value::Text(stored.owner),
            ];
            let taken = session
                .write_autocommit(write_values::<DB>(backend, take_over.clone(), args.into()))
                .await?;
            if taken == 1 {
                return Ok(Claim::Claimed(self.claimed(key, owner)));
            }
        }
        Err(Error::Conflict {
            kind: crate::ConflictKind::Busy,
            source: None,
        })
    }

    fn claimed(&self, key: &Key, owner: String) -> Claimed {
        Claimed {
            inner: Arc::new(ClaimedInner {
                table: self.table.clone(),
                backend: self.db.backend(),
                key: key.clone(),
                owner,
            }),
        }
    }

    /// Stores `outcome` for a claimed key outside any business transaction (an outcome decided
    /// by a transaction that rolled back, or by no transaction). Only while `claimed` still
    /// owns the key and it is in flight: an outcome stored by a committed transaction is never
    /// overwritten. Returns whether it stored.
    ///
    /// One autocommit statement, through [`crate::Session::write_autocommit`]: on a SQLite
    /// `Db` with a writer queue, in this process's turn to write.
    ///
    /// # Errors
    /// Database errors; a [`crate::ConflictKind::Busy`] conflict when the SQLite writer's turn
    /// does not come within the `Db`'s acquire timeout.
    ///
    /// # Cancel safety
    /// One autocommit statement: dropped, it either ran or did not (dropped while waiting for
    /// the writer's turn, it did not).
    pub async fn complete(&self, claimed: &Claimed, outcome: &Outcome) -> Result<bool> {
        let (backend, sql, args) = (
            self.db.backend(),
            claimed.complete_sql(),
            claimed.complete_args(outcome),
        );
        let done = self
            .db
            .session()
            .write_autocommit(write_values::<DB>(backend, sql, args.into()))
            .await?;
        Ok(done == 1)
    }

    /// Releases a claimed key that was not completed (the request failed in a way that must
    /// not be remembered), so that the same key can be used again. Only while `claimed` still
    /// owns it and it is in flight. Returns whether it released.
    ///
    /// One autocommit statement, through [`crate::Session::write_autocommit`]: on a SQLite
    /// `Db` with a writer queue, in this process's turn to write.
    ///
    /// # Errors
    /// Database errors; a [`crate::ConflictKind::Busy`] conflict when the SQLite writer's turn
    /// does not come within the `Db`'s acquire timeout.
    ///
    /// # Cancel safety
    /// One autocommit statement: dropped, it either ran or did not (dropped while waiting for
    /// the writer's turn, it did not).
    pub async fn release(&self, claimed: &Claimed) -> Result<bool> {
        let sql = format!(
            "DELETE FROM {} WHERE scope = ? AND idem_key = ? AND owner = ? AND status_code IS NULL",
            self.table
        );
        let (backend, args) = (self.db.backend(), claimed.owner_args());
        let done = self
            .db
            .session()
            .write_autocommit(write_values::<DB>(backend, sql, args.into()))
            .await?;
        Ok(done == 1)
    }
}

/// The body of a [`crate::Session::write_autocommit`] that runs `sql` with `args` and returns
/// the rows it affected (owning both, as a body that may run on the writer connection must).
fn write_values<DB: Database>(
    backend: Backend,
    sql: String,
    args: Vec<Value>,
) -> impl for<'c> FnOnce(&'c mut DB::Connection) -> futures_util::future::BoxFuture<'c, Result<u64>>
+ Send
+ 'static {
    move |c| {
        Box::pin(async move {
            DB::execute_values(c, backend, &sql, &args)
                .await
                .map_err(Error::from)
        })
    }
}

/// The columns [`Store::claim`] reads: fingerprint, owner, status_code, body, lease_until.
const STORED_COLUMNS: [ColumnKind; 5] = [
    ColumnKind::Text,
    ColumnKind::Text,
    ColumnKind::Int,
    ColumnKind::Text,
    ColumnKind::Int,
];

/// A key's row as [`Store::claim`] reads it.
struct Stored {
    fingerprint: String,
    owner: String,
    status: Option<i64>,
    body: Option<String>,
    lease_until: i64,
}

impl Stored {
    /// Decodes the values read with [`STORED_COLUMNS`]; `NULL` where the schema forbids it is
    /// a corrupt row.
    fn decode(row: Vec<Value>) -> Result<Stored> {
        let corrupt = || Error::aborted("an idempotency key row holds NULL in a NOT NULL column");
        let mut it = row.into_iter();
        let mut next = || it.next().unwrap_or(Value::Null);
        let text = |v: Value| match v {
            Value::Text(t) => Some(t),
            _ => None,
        };
        let int = |v: Value| match v {
            Value::Int(i) => Some(i),
            _ => None,
        };
        Ok(Stored {
            fingerprint: text(next()).ok_or_else(corrupt)?,
            owner: text(next()).ok_or_else(corrupt)?,
            status: int(next()),
            body: text(next()),
            lease_until: int(next()).ok_or_else(corrupt)?,
        })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope, self.key)
    }
}
