//! The error type of the withdraw operations that the executor and batch tests (and the
//! `hot_row` example) run: a business refusal beside the library's errors, as a user's own
//! error type would be. Included with `#[path]` so that it needs nothing from `common/mod.rs`.

use contend::{ConflictKind, Error, TxError};

/// Insufficient funds, or a library error.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// The withdrawal would overdraw.
    #[error("insufficient funds")]
    Insufficient,
    /// From the database or the strategy.
    #[error(transparent)]
    Db(#[from] Error),
}

impl From<sqlx::Error> for BankError {
    fn from(e: sqlx::Error) -> Self {
        BankError::Db(e.into())
    }
}

impl TxError for BankError {
    fn conflict(&self) -> Option<ConflictKind> {
        match self {
            BankError::Db(e) => e.conflict(),
            BankError::Insufficient => None,
        }
    }
}
