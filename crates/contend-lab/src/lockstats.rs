//! Counting what a distributed lock costs: a [`KeyLock`] wrapper that counts grants and measures
//! handoff (release to the next waiter's grant) for one run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use contend::BoxFuture;
use hdrhistogram::Histogram;

use crate::scenario::{HeldLock, KeyLock};

/// Grants and handoffs of one run.
#[derive(Debug)]
pub struct LockCounters {
    acquisitions: AtomicU64,
    state: Mutex<HandoffState>,
}

#[derive(Debug)]
struct HandoffState {
    /// When the last release of each key started.
    last_release: HashMap<String, Instant>,
    /// Handoff times in microseconds.
    handoffs: Histogram<u64>,
}

impl Default for LockCounters {
    fn default() -> Self {
        LockCounters {
            acquisitions: AtomicU64::new(0),
            state: Mutex::new(HandoffState {
                last_release: HashMap::new(),
                handoffs: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("valid histogram bounds"),
            }),
        }
    }
}

impl LockCounters {
    /// Locks granted so far.
    pub fn acquisitions(&self) -> u64 {
        self.acquisitions.load(Ordering::Relaxed)
    }

    /// Median handoff in milliseconds (0 when no waiter was ever handed a lock).
    pub fn handoff_p50_ms(&self) -> f64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.handoffs.is_empty() {
            0.0
        } else {
            state.handoffs.value_at_quantile(0.5) as f64 / 1000.0
        }
    }

    /// How many handoffs were measured.
    pub fn handoffs(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.handoffs.len()
    }

    fn granted(&self, key: &str, wait_started: Instant, granted: Instant) {
        self.acquisitions.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A handoff: this caller was already waiting when the previous holder began to release.
        if let Some(&released) = state.last_release.get(key)
            && wait_started <= released
            && released <= granted
        {
            let us = granted.duration_since(released).as_micros() as u64;
            state.handoffs.saturating_record(us.max(1));
        }
    }

    fn releasing(&self, key: &str) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.last_release.get_mut(key) {
            Some(t) => *t = now,
            None => {
                state.last_release.insert(key.to_string(), now);
            }
        }
    }
}

/// A [`KeyLock`] that counts for one run what the lock underneath does.
pub struct CountingLock {
    inner: Arc<dyn KeyLock>,
    counters: Arc<LockCounters>,
}

impl CountingLock {
    /// Wraps `inner`; read the counts from [`CountingLock::counters`].
    pub fn new(inner: Arc<dyn KeyLock>) -> Self {
        CountingLock {
            inner,
            counters: Arc::new(LockCounters::default()),
        }
    }

    /// The counters of this wrapper.
    pub fn counters(&self) -> Arc<LockCounters> {
        self.counters.clone()
    }
}

impl KeyLock for CountingLock {
    fn lock<'a>(&'a self, key: &'a str) -> BoxFuture<'a, contend::Result<Box<dyn HeldLock>>> {
        Box::pin(async move {
            let started = Instant::now();
            let held = self.inner.lock(key).await?;
            self.counters.granted(key, started, Instant::now());
            Ok(Box::new(CountedHeld {
                inner: held,
                key: key.to_string(),
                counters: self.counters.clone(),
            }) as Box<dyn HeldLock>)
        })
    }
}

struct CountedHeld {
    inner: Box<dyn HeldLock>,
    key: String,
    counters: Arc<LockCounters>,
}

impl HeldLock for CountedHeld {
    fn fencing_token(&self) -> u64 {
        self.inner.fencing_token()
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, contend::Result<()>> {
        let CountedHeld {
            inner,
            key,
            counters,
        } = *self;
        counters.releasing(&key);
        inner.release()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_counted_only_for_waiters() {
        let c = LockCounters::default();
        let t0 = Instant::now();
        c.granted("k", t0, t0);
        c.releasing("k");
        let after = Instant::now();
        // Started waiting before the release: a handoff.
        c.granted("k", t0, after);
        // Started after the release: not a handoff.
        c.granted("k", Instant::now(), Instant::now());
        assert_eq!(c.acquisitions(), 3);
        assert_eq!(c.handoffs(), 1);
    }
}
