//! `mutex`: prevents lost updates between tasks of **one process** with an async mutex per key,
//! held around the whole read-decide-write.
//!
//! It is correct only while every writer of the data runs in this process: a second instance of
//! the service (or a cron job, or a database console) does not see this lock, and the lost update
//! comes back. It is here because it is the first thing people reach for, and the service shows
//! it failing across processes. Keys no one holds or waits for are removed, so the map does not
//! grow with the number of keys ever used.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use contend::strategy::mutex::KeyedMutex;
//! let locks = KeyedMutex::new();
//! let guard = locks.lock("account:1").await;
//! assert!(locks.try_lock("account:1").is_none()); // held
//! assert!(locks.try_lock("account:2").is_some()); // another key is independent
//! drop(guard);
//! assert!(locks.try_lock("account:1").is_some());
//! assert_eq!(locks.len(), 0);
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};

use tokio::sync::{Mutex, OwnedMutexGuard};

type Map = StdMutex<HashMap<String, Arc<Mutex<()>>>>;

/// An async mutex per string key, for one process. Cheap to clone; clones share the locks.
#[derive(Debug, Clone, Default)]
pub struct KeyedMutex {
    map: Arc<Map>,
}

/// Holds the lock on one key of a [`KeyedMutex`]; dropping it releases the lock.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct KeyGuard {
    guard: Option<OwnedMutexGuard<()>>,
    key: String,
    map: Arc<Map>,
}

impl KeyedMutex {
    /// An empty set of locks.
    pub fn new() -> Self {
        KeyedMutex::default()
    }

    fn entry(&self, key: &str) -> Arc<Mutex<()>> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(key.to_string()).or_default().clone()
    }

    /// Waits for the lock on `key` (first come, first served) and holds it until the guard drops.
    ///
    /// # Cancel safety
    /// Dropping the future while it waits gives up the place in the queue and takes nothing.
    pub async fn lock(&self, key: &str) -> KeyGuard {
        let mutex = self.entry(key);
        let guard = mutex.lock_owned().await;
        KeyGuard {
            guard: Some(guard),
            key: key.to_string(),
            map: self.map.clone(),
        }
    }

    /// Takes the lock on `key` if it is free right now.
    pub fn try_lock(&self, key: &str) -> Option<KeyGuard> {
        let mutex = self.entry(key);
        match mutex.try_lock_owned() {
            Ok(guard) => Some(KeyGuard {
                guard: Some(guard),
                key: key.to_string(),
                map: self.map.clone(),
            }),
            Err(_) => {
                forget_if_unused(&self.map, key);
                None
            }
        }
    }

    /// How many keys are currently held or waited for.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no key is held or waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes `key` from the map when only the map itself still refers to its mutex.
fn forget_if_unused(map: &Map, key: &str) {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    if map.get(key).is_some_and(|m| Arc::strong_count(m) == 1) {
        map.remove(key);
    }
}

impl KeyGuard {
    /// The key this guard holds.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        // Release first, then forget the key if no one else holds a reference (a waiter does).
        drop(self.guard.take());
        forget_if_unused(&self.map, &self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serializes_one_key_and_cleans_up() {
        let locks = KeyedMutex::new();
        let counter = Arc::new(StdMutex::new(0_i64));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let locks = locks.clone();
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let _g = locks.lock("k").await;
                    // Read, yield, write: loses updates unless the lock serializes.
                    let v = *counter.lock().unwrap();
                    tokio::task::yield_now().await;
                    *counter.lock().unwrap() = v + 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*counter.lock().unwrap(), 16 * 50);
        assert!(locks.is_empty());
    }
}
