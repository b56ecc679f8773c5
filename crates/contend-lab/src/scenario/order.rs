//! `order`: two resources in one transaction. Every operation buys one unit of a product with
//! limited stock and pays for it from one of a few accounts; the stock and the money must move
//! together or not at all, and the product is never oversold. Refused: sold out, or not enough
//! money.
//!
//! Invariants: stock never below zero and units sold never above the initial stock; the stock
//! sold equals the units in the order table; the money spent equals the order table's total.

use contend::strategy::Strategy;
use contend::{Backend, BoxFuture, Session};

use super::transfer::{Move, Plan, apply, row_key};
use super::{
    Ctx, Invariant, OpReport, Scenario, Totals, base_support, drop_tables, engine, fenced,
    invariant, scalar, sum_bigint, table_name,
};

/// The product's id.
const PRODUCT: i64 = 1;
/// Its price.
const PRICE: i64 = 3;
/// The paying accounts.
const ACCOUNTS: i64 = 4;

/// The order scenario.
#[derive(Debug, Default)]
pub struct Order;

impl Order {
    /// The scenario.
    pub fn new() -> Self {
        Order
    }

    /// Initial stock: a third of the operations (at least 1), so it sells out.
    fn stock(operations: u64) -> i64 {
        i64::try_from(operations / 3).unwrap_or(i64::MAX / 4).max(1)
    }

    /// Each account's money: enough for an eighth of the operations (so two accounts' worth
    /// of buyers run short before the stock does).
    fn money(operations: u64) -> i64 {
        PRICE * i64::try_from(operations / 8).unwrap_or(i64::MAX / 8).max(1)
    }
}

struct Tables {
    product: String,
    account: String,
    orders: String,
}

fn tables(ctx: &Ctx) -> Tables {
    Tables {
        product: table_name(ctx, "order_product"),
        account: table_name(ctx, "order_account"),
        orders: table_name(ctx, "order_orders"),
    }
}

impl Scenario for Order {
    fn name(&self) -> &'static str {
        "order"
    }

    fn supports(&self, strategy: Strategy, backend: Backend) -> Result<(), String> {
        base_support(strategy, backend)
    }

    fn setup<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let t = tables(ctx);
            let db = &ctx.db;
            let engine = engine(db.backend());
            drop_tables(
                db,
                &[t.product.clone(), t.account.clone(), t.orders.clone()],
            )
            .await?;
            for (name, column) in [(&t.product, "stock"), (&t.account, "balance")] {
                db.execute_script(&format!(
                    "CREATE TABLE {name} (id BIGINT PRIMARY KEY, {column} BIGINT NOT NULL, \
                     version BIGINT NOT NULL){engine}"
                ))
                .await?;
            }
            db.execute_script(&format!(
                "CREATE TABLE {} (account BIGINT NOT NULL, product BIGINT NOT NULL, \
                 qty BIGINT NOT NULL, amount BIGINT NOT NULL){engine}",
                t.orders
            ))
            .await?;
            let product = db.query(&format!("INSERT INTO {} VALUES (?, ?, 0)", t.product));
            let stock = Order::stock(ctx.operations);
            super::exec(db, product.bind(PRODUCT).bind(stock)).await?;
            for id in 1..=ACCOUNTS {
                let account = db.query(&format!("INSERT INTO {} VALUES (?, ?, 0)", t.account));
                let money = Order::money(ctx.operations);
                super::exec(db, account.bind(id).bind(money)).await?;
            }
            fenced::setup(ctx).await
        })
    }

    fn op_in_session<'a>(
        &'a self,
        ctx: &'a Ctx,
        session: &'a mut Session,
        _worker: usize,
        seq: u64,
    ) -> BoxFuture<'a, OpReport> {
        Box::pin(async move {
            let t = tables(ctx);
            let account = (seq % ACCOUNTS as u64) as i64 + 1;
            let moves = vec![
                Move {
                    table: t.product,
                    column: "stock",
                    id: PRODUCT,
                    delta: -1,
                    why: "sold out",
                },
                Move {
                    table: t.account,
                    column: "balance",
                    id: account,
                    delta: -PRICE,
                    why: "insufficient funds",
                },
            ];
            let record = format!(
                "INSERT INTO {} (account, product, qty, amount) VALUES (?, ?, ?, ?)",
                t.orders
            );
            let plan = Plan::new(moves, record, vec![account, PRODUCT, 1, PRICE]);
            apply(ctx, session, plan).await
        })
    }

    fn check<'a>(
        &'a self,
        ctx: &'a Ctx,
        _totals: &'a Totals,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Invariant>>> {
        Box::pin(async move {
            let t = tables(ctx);
            let db = &ctx.db;
            let b = db.backend();
            let initial_stock = Order::stock(ctx.operations);
            let initial_money = Order::money(ctx.operations) * ACCOUNTS;
            let stock =
                scalar(db, &format!("SELECT stock FROM {} WHERE id = 1", t.product)).await?;
            let money = scalar(
                db,
                &format!("SELECT {} FROM {}", sum_bigint(b, "balance"), t.account),
            )
            .await?;
            let negative_money = scalar(
                db,
                &format!("SELECT COUNT(*) FROM {} WHERE balance < 0", t.account),
            )
            .await?;
            let units = scalar(
                db,
                &format!("SELECT {} FROM {}", sum_bigint(b, "qty"), t.orders),
            )
            .await?;
            let paid = scalar(
                db,
                &format!("SELECT {} FROM {}", sum_bigint(b, "amount"), t.orders),
            )
            .await?;
            let sold = initial_stock - stock;
            let spent = initial_money - money;
            Ok(vec![
                invariant(
                    "never_oversold",
                    u64::from(stock < 0) + units.saturating_sub(initial_stock).max(0) as u64,
                    format!("stock {stock} of {initial_stock}; {units} units ordered"),
                ),
                invariant(
                    "stock_matches_orders",
                    sold.abs_diff(units),
                    format!("stock went down by {sold}, orders hold {units} units"),
                ),
                invariant(
                    "money_matches_orders",
                    spent.abs_diff(paid).div_ceil(PRICE as u64),
                    format!("accounts went down by {spent}, orders paid {paid}"),
                ),
                invariant(
                    "no_negative_balance",
                    negative_money as u64,
                    format!("{negative_money} accounts below zero"),
                ),
            ])
        })
    }

    fn teardown<'a>(&'a self, ctx: &'a Ctx) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let t = tables(ctx);
            let mut keys = vec![row_key(&t.product, PRODUCT)];
            keys.extend((1..=ACCOUNTS).map(|id| row_key(&t.account, id)));
            fenced::teardown(ctx, &keys).await?;
            drop_tables(&ctx.db, &[t.product, t.account, t.orders]).await
        })
    }
}
