//! The `redis` and `redlock` strategies: Redis locks per key, with fencing tokens checked by the
//! database write.

use contend::strategy::Strategy;

use crate::AppState;
use crate::engine::Op;
use crate::error::ApiError;

/// Redis lock settings of the service (built from `--redis-url` / `--redlock-urls`).
#[derive(Debug, Clone)]
pub struct RedisLocks {
    /// Node URLs.
    pub urls: Vec<String>,
}

/// Runs `op` under a Redis lock.
pub(crate) async fn execute<O: Op>(
    _state: &AppState,
    strategy: Strategy,
    _op: std::sync::Arc<O>,
) -> Result<O::Output, ApiError> {
    Err(ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "strategy_unsupported",
        format!("strategy `{strategy}` is not available yet"),
    ))
}
