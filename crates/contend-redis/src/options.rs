//! [`LockOptions`]: how long a lock is leased, how long to wait for it, and whether a watchdog
//! renews it while its guard lives.

use std::time::Duration;

use contend::{Error, Result};

/// Shortest lease accepted: below this the round trips to Redis eat the whole lease.
pub const MIN_LEASE: Duration = Duration::from_millis(10);

/// Longest lease accepted (one day): longer leases usually mean a forgotten lock.
pub const MAX_LEASE: Duration = Duration::from_secs(86_400);

/// Options of one lock acquisition.
///
/// ```
/// use std::time::Duration;
/// use contend_redis::LockOptions;
/// let options = LockOptions::new()
///     .lease(Duration::from_secs(5))
///     .wait(Duration::from_millis(500))
///     .watchdog(true);
/// assert_eq!(options.lease_time(), Duration::from_secs(5));
/// assert!(options.validate().is_ok());
/// assert!(LockOptions::new().lease(Duration::from_millis(1)).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct LockOptions {
    lease: Duration,
    wait: Duration,
    watchdog: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions::new()
    }
}

impl LockOptions {
    /// Lease 10 s, wait up to 10 s, no watchdog.
    pub fn new() -> Self {
        LockOptions {
            lease: Duration::from_secs(10),
            wait: Duration::from_secs(10),
            watchdog: false,
        }
    }

    /// How long the lock is held before Redis expires it on its own (when its holder crashed,
    /// say). Between 10 ms and one day. Default 10 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long `acquire` waits for a lock that someone else holds before it gives up with
    /// [`Error::LockNotAcquired`]. Zero: one attempt only. Default 10 s.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Renew the lease every third of it while the guard lives. If a renewal finds the lock
    /// taken, or Redis stays unreachable until the lease ends, the guard reports the lock lost
    /// (see [`crate::LockGuard::lost`]). Default off.
    pub fn watchdog(mut self, on: bool) -> Self {
        self.watchdog = on;
        self
    }

    /// The lease.
    pub fn lease_time(&self) -> Duration {
        self.lease
    }

    /// The wait limit.
    pub fn wait_time(&self) -> Duration {
        self.wait
    }

    /// Whether the watchdog is on.
    pub fn has_watchdog(&self) -> bool {
        self.watchdog
    }

    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::Aborted`] with the reason for a lease outside 10 ms to one day.
    pub fn validate(&self) -> Result<()> {
        if self.lease < MIN_LEASE || self.lease > MAX_LEASE {
            return Err(Error::aborted(format!(
                "invalid lock lease {} ms: it must be between {} ms and {} ms",
                self.lease.as_millis(),
                MIN_LEASE.as_millis(),
                MAX_LEASE.as_millis()
            )));
        }
        Ok(())
    }

    /// The lease in whole milliseconds, as sent to Redis.
    pub(crate) fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }
}

/// The clock-drift allowance subtracted from a lease to get its validity: 1 % of the lease plus
/// 2 ms (the Redlock reference implementations' figures).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(contend_redis::drift(Duration::from_secs(1)), Duration::from_millis(12));
/// ```
pub fn drift(lease: Duration) -> Duration {
    lease / 100 + Duration::from_millis(2)
}

/// Until when a lease of `lease` granted by a request sent at `sent` is surely held: the lease
/// less the clock [`drift`] allowance.
pub(crate) fn valid_until(sent: std::time::Instant, lease: Duration) -> std::time::Instant {
    sent + lease.saturating_sub(drift(lease))
}

/// Checks a lock key: not empty, at most 1024 bytes.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 1024 {
        return Err(Error::aborted(format!(
            "invalid lock key: it must be 1 to 1024 bytes long, got {}",
            key.len()
        )));
    }
    Ok(())
}

/// The Redis names belonging to one lock key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LockKeys {
    /// The caller's key.
    pub key: String,
    /// `{ns}:lock:{key}`: holds the owner's token, with the lease as its expiry.
    pub lock: String,
    /// `{ns}:fence:{key}`: the fencing counter (never expires).
    pub fence: String,
    /// `{ns}:released:{key}`: the release notification channel.
    pub channel: String,
}

impl LockKeys {
    pub fn new(namespace: &str, key: &str) -> LockKeys {
        LockKeys {
            key: key.to_string(),
            lock: format!("{namespace}:lock:{key}"),
            fence: format!("{namespace}:fence:{key}"),
            channel: format!("{namespace}:released:{key}"),
        }
    }
}

/// The start of one acquisition, shared by every lock kind: the key and options checked, the
/// deadline of the wait, the Redis names and a new owner token.
pub(crate) struct Acquiring {
    /// When the acquisition began.
    pub started: std::time::Instant,
    /// When waiting ends (`started` + the options' wait time).
    pub deadline: std::time::Instant,
    /// The Redis names of the key.
    pub keys: LockKeys,
    /// The owner token of this acquisition.
    pub token: String,
}

impl Acquiring {
    /// Checks `key` and `options` and begins an acquisition under `namespace`.
    pub fn begin(namespace: &str, key: &str, options: &crate::LockOptions) -> Result<Acquiring> {
        check_key(key)?;
        options.validate()?;
        let started = std::time::Instant::now();
        Ok(Acquiring {
            started,
            deadline: started + options.wait_time(),
            keys: LockKeys::new(namespace, key),
            token: new_token(),
        })
    }
}

/// A new owner token: 128 random bits, hex.
pub(crate) fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_apart() {
        let k = LockKeys::new("contend", "acct:1");
        assert_eq!(k.lock, "contend:lock:acct:1");
        assert_eq!(k.fence, "contend:fence:acct:1");
        assert_eq!(k.channel, "contend:released:acct:1");
        // A user key that looks like another key's fence counter stays in the lock space.
        assert_ne!(LockKeys::new("contend", "fence:x").lock, k.fence);
    }

    #[test]
    fn tokens_are_128_bit_and_distinct() {
        let a = new_token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_token());
    }

    #[test]
    fn bad_keys_and_leases_are_refused() {
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(1025)).is_err());
        assert!(check_key("ok").is_ok());
        assert!(LockOptions::new().lease(Duration::ZERO).validate().is_err());
        assert!(LockOptions::new().lease(MAX_LEASE * 2).validate().is_err());
        assert!(LockOptions::new().validate().is_ok());
    }
}
