//! When and how often a transaction that hit a concurrency conflict runs again: a time budget
//! (and, if asked, an attempt limit), with exponential backoff and full jitter.
//!
//! Retrying is explicit: [`RetryPolicy::none`] is the default, and errors that are not conflicts
//! (see [`crate::Error::conflict`]) are never retried.
//!
//! # Bounded by time, not by a count
//! Under contention the number of attempts an operation needs grows with the number of
//! contenders: with 64 workers on one hot row a transaction can lose dozens of rounds in a row
//! and still finish in a few hundred milliseconds. A small attempt count gives up on exactly
//! those operations (a correct strategy then answers errors under load), while a time budget
//! says what a caller can actually wait for. [`RetryPolicy::new`] therefore has no attempt
//! limit, only [`RetryPolicy::max_elapsed`] (30 s); [`RetryPolicy::max_attempts`] is still
//! there for callers who want one. An operation that is still losing when its budget runs out
//! fails with its last conflict, which [`crate::Error::is_contention`] recognises: it gave up
//! under contention, it did not fail.
//!
//! The backoff grows from [`RetryPolicy::base_delay`] by doubling up to
//! [`RetryPolicy::max_delay`], and each delay is drawn uniformly between zero and that cap
//! ("full jitter"), so that contenders that collided once do not collide again in lock step.

use std::time::Duration;

use rand::Rng;

use crate::error::ConflictKind;

/// A retry policy for transactions.
///
/// ```
/// use std::time::Duration;
/// use contend::RetryPolicy;
/// // The default: no attempt limit, 30 s in all.
/// assert_eq!(RetryPolicy::new().attempts(), None);
/// assert_eq!(RetryPolicy::new().elapsed_limit(), Some(Duration::from_secs(30)));
/// let policy = RetryPolicy::new()
///     .max_attempts(10)
///     .base_delay(Duration::from_millis(2))
///     .max_delay(Duration::from_millis(100))
///     .max_elapsed(Duration::from_secs(5));
/// assert_eq!(policy.attempts(), Some(10));
/// assert!(policy.backoff(3) <= Duration::from_millis(8));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct RetryPolicy {
    /// `None`: no limit (the time budget decides).
    max_attempts: Option<u32>,
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
    /// A policy that retries every conflict kind for up to 30 s in all, with no attempt limit,
    /// backoff from 1 ms up to 200 ms.
    pub fn new() -> Self {
        RetryPolicy {
            max_attempts: None,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(200),
            max_elapsed: Some(Duration::from_secs(30)),
            kinds: ConflictKind::ALL.to_vec(),
        }
    }

    /// Run once, never retry (the default).
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: Some(1),
            ..RetryPolicy::new()
        }
    }

    /// At most this many attempts in all, the first included (at least 1), on top of the time
    /// budget. Default: no limit (see the [module docs](self) for why).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// No attempt limit: only the time budget ([`RetryPolicy::max_elapsed`]) ends the retries
    /// (the default of [`RetryPolicy::new`]).
    pub fn unlimited_attempts(mut self) -> Self {
        self.max_attempts = None;
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

    /// The attempt limit, if there is one.
    pub fn attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// The time budget, if there is one.
    pub fn elapsed_limit(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// Whether attempt number `attempt` (1-based), which failed with `kind` after `elapsed`
    /// (since the first attempt started), should be followed by another.
    pub fn should_retry(&self, kind: ConflictKind, attempt: u32, elapsed: Duration) -> bool {
        self.max_attempts.is_none_or(|limit| attempt < limit)
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
    fn time_bounds_the_default() {
        let p = RetryPolicy::new().max_elapsed(Duration::from_secs(1));
        assert!(p.should_retry(
            ConflictKind::Deadlock,
            1_000_000,
            Duration::from_millis(999)
        ));
        assert!(!p.should_retry(ConflictKind::Deadlock, 2, Duration::from_secs(1)));
        let capped = p.max_attempts(3).unlimited_attempts();
        assert!(capped.should_retry(ConflictKind::Deadlock, 3, Duration::ZERO));
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
