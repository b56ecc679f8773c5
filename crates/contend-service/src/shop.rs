//! The shop: products with limited stock, and orders that debit the account and decrement the
//! stock in one transaction (both or neither).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use contend::strategy::Operation;
use contend::{Backend, BoxFuture, Tx};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use utoipa::ToSchema;

use crate::AppState;
use crate::bank::{
    Account, BindValue, MAX_MONEY, insert_returning_id, ledger, load_account, q, write_balance,
};
use crate::engine::{self, Write};
use crate::error::{ApiError, abort};
use crate::extract::{JsonRequest, RawPath, check_range, check_text, path_text};
use crate::idempotency::{self, Outcome};

/// Largest quantity of one order.
pub const MAX_QUANTITY: i64 = 1_000_000;

/// Body of `POST /products`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// Stock keeping unit, 1..=64 characters, unique.
    pub sku: String,
    /// Units in stock, 0..=10^15.
    pub stock: i64,
    /// Unit price in minor units, 1..=10^15.
    pub price: i64,
}

/// A product.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Product {
    /// Stock keeping unit.
    pub sku: String,
    /// Units in stock.
    pub stock: i64,
    /// Unit price in minor units.
    pub price: i64,
    /// Starts at 0, +1 with every stock change.
    pub version: i64,
}

/// Body of `POST /orders`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// Paying account (the caller).
    pub account: i64,
    /// Product.
    pub sku: String,
    /// Units, 1..=10^6.
    pub quantity: i64,
}

/// A placed order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Order {
    /// Order id.
    pub id: i64,
    /// Paying account.
    pub account: i64,
    /// Product.
    pub sku: String,
    /// Units.
    pub quantity: i64,
    /// `price * quantity`, debited from the account.
    pub total: i64,
}

fn product_missing(sku: &str) -> ApiError {
    ApiError::not_found(
        "product_not_found",
        format!("product `{}` does not exist", sku.escape_default()),
    )
}

/// Whether `sku` could name a product at all (no query for one that cannot).
fn plausible_sku(sku: &str) -> bool {
    let n = sku.chars().count();
    (1..=64).contains(&n) && !sku.contains('\0')
}

async fn load_product(
    conn: &mut AnyConnection,
    backend: Backend,
    sku: &str,
    lock: &str,
) -> contend::Result<Option<Product>> {
    if !plausible_sku(sku) {
        return Ok(None);
    }
    let sql = format!("SELECT sku, stock, price, version FROM products WHERE sku = ?{lock}");
    let row = q(backend, &sql)
        .bind(sku.to_string())
        .fetch_optional(conn)
        .await?;
    match row {
        None => Ok(None),
        Some(row) => Ok(Some(Product {
            sku: row.try_get(0)?,
            stock: row.try_get(1)?,
            price: row.try_get(2)?,
            version: row.try_get(3)?,
        })),
    }
}

async fn fetch_product(state: &AppState, sku: &str) -> Result<Option<Product>, ApiError> {
    let db = &state.inner.db;
    let (backend, sku) = (db.backend(), sku.to_string());
    Ok(db
        .session()
        .autocommit(move |conn| {
            Box::pin(async move { load_product(conn, backend, &sku, "").await })
        })
        .await?)
}

struct OrderOp {
    backend: Backend,
    account: i64,
    sku: String,
    quantity: i64,
}

fn total_of(price: i64, quantity: i64) -> Result<i64, ApiError> {
    match price.checked_mul(quantity) {
        Some(total) if total <= MAX_MONEY => Ok(total),
        _ => Err(ApiError::invalid_value(
            "quantity",
            "times the price exceeds 10^15",
        )),
    }
}

impl OrderOp {
    async fn record(&self, tx: &mut Tx, total: i64) -> contend::Result<Order> {
        let id = insert_returning_id(
            tx,
            "INSERT INTO orders (account_id, sku, quantity, total) VALUES (?, ?, ?, ?)",
            &[
                BindValue::Int(self.account),
                BindValue::Text(self.sku.clone()),
                BindValue::Int(self.quantity),
                BindValue::Int(total),
            ],
        )
        .await?;
        ledger(tx, self.account, -total, "order", Some(id)).await?;
        Ok(Order {
            id,
            account: self.account,
            sku: self.sku.clone(),
            quantity: self.quantity,
            total,
        })
    }
}

impl Write for OrderOp {}

impl Operation for OrderOp {
    type State = (Product, Account);
    type Output = Order;
    type Error = contend::Error;

    fn keys(&self) -> Vec<String> {
        vec![
            format!("account:{}", self.account),
            format!("product:{}", self.sku),
        ]
    }

    fn read<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        lock: &'static str,
    ) -> BoxFuture<'c, contend::Result<(Product, Account)>> {
        Box::pin(async move {
            let backend = self.backend;
            // Canonical order: the product, then the account.
            let product = load_product(conn, backend, &self.sku, lock)
                .await?
                .ok_or_else(|| abort(product_missing(&self.sku)))?;
            let account = load_account(conn, backend, self.account, lock)
                .await?
                .ok_or_else(|| {
                    abort(ApiError::not_found(
                        "account_not_found",
                        format!("account {} does not exist", self.account),
                    ))
                })?;
            Ok((product, account))
        })
    }

    fn write<'c>(
        &'c self,
        tx: &'c mut Tx,
        state: &'c (Product, Account),
        checked: bool,
    ) -> BoxFuture<'c, contend::Result<Order>> {
        Box::pin(async move {
            let (product, account) = state;
            let total = total_of(product.price, self.quantity).map_err(abort)?;
            if product.stock < self.quantity {
                return Err(abort(out_of_stock(&self.sku)));
            }
            if account.balance < total {
                return Err(abort(insufficient(account.id)));
            }
            let sql = if checked {
                "UPDATE products SET stock = ?, version = ? WHERE sku = ? AND version = ?"
            } else {
                "UPDATE products SET stock = ?, version = ? WHERE sku = ?"
            };
            let mut query = tx
                .query(sql)
                .bind(product.stock - self.quantity)
                .bind(product.version + 1)
                .bind(self.sku.clone());
            if checked {
                query = query.bind(product.version);
            }
            let done = query.execute(tx.conn()).await?;
            if checked {
                contend::strategy::optimistic::check(done.rows_affected())?;
            }
            write_balance(tx, account, account.balance - total, checked).await?;
            self.record(tx, total).await
        })
    }

    fn atomic<'c>(&'c self, tx: &'c mut Tx) -> Option<BoxFuture<'c, contend::Result<Order>>> {
        Some(Box::pin(async move {
            let price: Option<i64> = tx
                .query_scalar("SELECT price FROM products WHERE sku = ?")
                .bind(self.sku.clone())
                .fetch_optional(tx.conn())
                .await?;
            let price = price.ok_or_else(|| abort(product_missing(&self.sku)))?;
            let total = total_of(price, self.quantity).map_err(abort)?;
            let done = tx
                .query("UPDATE products SET stock = stock - ?, version = version + 1 WHERE sku = ? AND stock >= ?")
                .bind(self.quantity)
                .bind(self.sku.clone())
                .bind(self.quantity)
                .execute(tx.conn())
                .await?;
            if done.rows_affected() == 0 {
                return Err(abort(out_of_stock(&self.sku)));
            }
            let done = tx
                .query("UPDATE accounts SET balance = balance - ?, version = version + 1 WHERE id = ? AND balance >= ?")
                .bind(total)
                .bind(self.account)
                .bind(total)
                .execute(tx.conn())
                .await?;
            if done.rows_affected() == 0 {
                return Err(abort(insufficient(self.account)));
            }
            self.record(tx, total).await
        }))
    }
}

fn out_of_stock(sku: &str) -> ApiError {
    ApiError::conflict(
        "out_of_stock",
        format!("not enough units of `{}` in stock", sku.escape_default()),
    )
}

fn insufficient(id: i64) -> ApiError {
    ApiError::conflict(
        "insufficient_funds",
        format!("account {id} has insufficient funds"),
    )
}

/// `POST /products`
#[utoipa::path(post, path = "/products", request_body = NewProduct, security(("bearer" = [])),
    responses((status = 201, body = Product), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 409, body = crate::error::ErrorBody, description = "sku_exists"),
              (status = 422, body = crate::error::ErrorBody)))]
pub async fn create_product(
    State(state): State<AppState>,
    req: JsonRequest<NewProduct>,
) -> Response {
    req.run_keyed(&state, move |st, auth, body, strategy, mut session, key| async move {
        auth.require_admin()?;
        engine::check_supported(&st, strategy)?;
        check_text("sku", &body.sku, 1, 64)?;
        check_range("stock", body.stock, 0, MAX_MONEY)?;
        check_range("price", body.price, 1, MAX_MONEY)?;
        let (sku, stock, price) = (body.sku.clone(), body.stock, body.price);
        let run = session
            .run(&contend::TxOptions::new(), move |tx| {
                let sku = sku.clone();
                let key = key.clone();
                Box::pin(async move {
                    tx.query("INSERT INTO products (sku, stock, price, version, initial_stock) VALUES (?, ?, ?, 0, ?)")
                        .bind(sku.clone())
                        .bind(stock)
                        .bind(price)
                        .bind(stock)
                        .execute(tx.conn())
                        .await?;
                    let product = Product {
                        sku,
                        stock,
                        price,
                        version: 0,
                    };
                    let outcome = Outcome::json(StatusCode::CREATED, &product);
                    idempotency::store_in_tx(tx, &key, &outcome).await?;
                    Ok(outcome)
                })
            })
            .await;
        match run.result {
            Ok(outcome) => Ok(outcome),
            Err(e) if e.is_unique_violation() => Err(ApiError::conflict(
                "sku_exists",
                format!("a product with sku `{}` already exists", body.sku.escape_default()),
            )),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// `GET /products/{sku}`
#[utoipa::path(get, path = "/products/{sku}", params(("sku" = String, Path, description = "product sku")),
    responses((status = 200, body = Product), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_product(State(state): State<AppState>, sku: RawPath) -> Result<Outcome, ApiError> {
    let sku = path_text(sku, "sku")?;
    let product = fetch_product(&state, &sku)
        .await?
        .ok_or_else(|| product_missing(&sku))?;
    Ok(Outcome::json(StatusCode::OK, &product))
}

/// `POST /orders`
#[utoipa::path(post, path = "/orders", request_body = NewOrder, security(("bearer" = [])),
    responses((status = 201, body = Order), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody, description = "product_not_found"),
              (status = 409, body = crate::error::ErrorBody, description = "out_of_stock, insufficient_funds"),
              (status = 422, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn create_order(State(state): State<AppState>, req: JsonRequest<NewOrder>) -> Response {
    req.run_keyed(
        &state,
        move |st, auth, body, strategy, session, key| async move {
            // This path reads through the pool first: let the request's connection go.
            drop(session);
            auth.require_account(body.account)?;
            let product = fetch_product(&st, &body.sku)
                .await?
                .ok_or_else(|| product_missing(&body.sku))?;
            engine::check_supported(&st, strategy)?;
            check_range("quantity", body.quantity, 1, MAX_QUANTITY)?;
            total_of(product.price, body.quantity)?;
            let op = OrderOp {
                backend: st.inner.db.backend(),
                account: body.account,
                sku: body.sku,
                quantity: body.quantity,
            };
            engine::execute(&st, strategy, op, &mut st.session().await?, &key).await
        },
    )
    .await
}
