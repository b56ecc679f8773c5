//! When and how often a transaction that hit a concurrency conflict runs again: attempt limit,
//! exponential backoff with full jitter, and a total time limit.
//!
//! Retrying is explicit: [`RetryPolicy::none`] is the default, and errors that are not conflicts
//! (see [`crate::Error::conflict`]) are never retried.

use std::time::Duration;

use rand::Rng;

use crate::error::ConflictKind;

/// A retry policy for transactions.
///
/// ```
/// use std::time::Duration;
/// use contend::RetryPolicy;
/// let policy = RetryPolicy::new()
///     .max_attempts(10)
///     .base_delay(Duration::from_millis(2))
///     .max_delay(Duration::from_millis(100))
///     .max_elapsed(Duration::from_secs(5));
/// assert_eq!(policy.attempts(), 10);
/// assert!(policy.backoff(3) <= Duration::from_millis(8));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    max_elapsed: Option<Duration>,
    kinds: Vec<ConflictKind>,
}

impl Default for RetryPolicy {
    /// Same as [`RetryPolicy::none`].
    fn default() -> Self {
        RetryPolicy::none()
    }
}

impl RetryPolicy {
    /// A policy that retries every conflict kind: 10 attempts, backoff from 1 ms up to 200 ms,
    /// at most 30 s in all.
    pub fn new() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(200),
            max_elapsed: Some(Duration::from_secs(30)),
            kinds: ConflictKind::ALL.to_vec(),
        }
    }

    /// Run once, never retry (the default).
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::new()
        }
    }

    /// How many attempts in all, the first included (at least 1). Default 10.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The backoff before the second attempt; it doubles with each attempt. Default 1 ms.
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The longest backoff. Default 200 ms.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// No new attempt starts once this much time has passed since the first. Default 30 s.
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = Some(limit);
        self
    }

    /// Retry only these conflict kinds (default: all).
    pub fn only(mut self, kinds: &[ConflictKind]) -> Self {
        self.kinds = kinds.to_vec();
        self
    }

    /// The attempt limit.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether attempt number `attempt` (1-based), which failed with `kind` after `elapsed`,
    /// should be followed by another.
    pub fn should_retry(&self, kind: ConflictKind, attempt: u32, elapsed: Duration) -> bool {
        attempt < self.max_attempts
            && self.kinds.contains(&kind)
            && self.max_elapsed.is_none_or(|limit| elapsed < limit)
    }

    /// The delay after failed attempt `attempt` (1-based): a random duration between zero and
    /// `min(max_delay, base_delay * 2^(attempt-1))` ("full jitter").
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let cap = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        if cap.is_zero() {
            return cap;
        }
        let nanos = rand::rng().random_range(0..=cap.as_nanos() as u64);
        Duration::from_nanos(nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_never_retries() {
        let p = RetryPolicy::none();
        assert!(!p.should_retry(ConflictKind::Deadlock, 1, Duration::ZERO));
    }

    #[test]
    fn limits() {
        let p = RetryPolicy::new()
            .max_attempts(3)
            .max_elapsed(Duration::from_secs(1))
            .only(&[ConflictKind::Serialization]);
        assert!(p.should_retry(ConflictKind::Serialization, 2, Duration::ZERO));
        assert!(!p.should_retry(ConflictKind::Serialization, 3, Duration::ZERO));
        assert!(!p.should_retry(ConflictKind::Deadlock, 1, Duration::ZERO));
        assert!(!p.should_retry(ConflictKind::Serialization, 1, Duration::from_secs(2)));
    }

    #[test]
    fn backoff_is_capped() {
        let p = RetryPolicy::new()
            .base_delay(Duration::from_millis(10))
            .max_delay(Duration::from_millis(50));
        for attempt in 1..40 {
            assert!(p.backoff(attempt) <= Duration::from_millis(50));
        }
        assert!(p.backoff(1) <= Duration::from_millis(10));
    }
}
