//! Run with `DATABASE_URL=postgres://user@127.0.0.1/app cargo run -p ticket-shop`
//! (`LISTEN`, default `127.0.0.1:8080`; `STRATEGY`, default `pessimistic`).

use std::error::Error;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL=postgres://...")?;
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let strategy = std::env::var("STRATEGY")
        .unwrap_or_else(|_| "pessimistic".into())
        .parse()?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let app = ticket_shop::app(pool, strategy).await?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("ticket-shop on http://{listen}");
    axum::serve(listener, app).await?;
    Ok(())
}
