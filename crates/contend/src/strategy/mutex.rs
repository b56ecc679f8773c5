//! `mutex`: prevents lost updates between tasks of **one process** with an async mutex per key,
//! held around the whole read-decide-write.
//!
//! It is correct only while every writer of the data runs in this process: a second instance of
//! the service (or a cron job, or a database console) does not see this lock, and the lost update
//! comes back. It is here because it is the first thing people reach for, and the service shows
//! it failing across processes. Keys no one holds or waits for are removed, so the map does not
//! grow with the number of keys ever used.
//!
//! An operation on several keys takes them all at once with [`KeyedMutex::lock_all`]: it queues
//! once, at its arrival, on every key, and is granted when it is first in all their queues. Taken
//! one at a time instead, it would queue on each key in turn, each time behind everyone who came
//! meanwhile (they took the later keys while it waited for the first), so that its wait is the sum
//! of one queue per key: those overtaken requests make the tail of the waits. No request
//! overtakes an earlier one that wants one of its keys, so none waits forever, and requests for
//! overlapping sets cannot deadlock.
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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};

use tokio::sync::oneshot;

/// One request for a set of keys, in the queue of each of its keys until it is released (or
/// given up while waiting).
#[derive(Debug)]
struct Request {
    /// Sorted and deduplicated.
    keys: Vec<String>,
    /// Whether it holds its keys.
    granted: bool,
    /// Wakes the waiting caller when it is granted (`None` once granted).
    wake: Option<oneshot::Sender<()>>,
}

/// The keys' queues: each key's requests in arrival order. A request holds its keys when it is
/// first in the queue of every one of them; it is granted then and stays first until released.
/// Requests enter all their queues at once, under one lock, so every queue orders any two
/// requests alike: the earliest request still waiting is first in all its queues as soon as the
/// holders before it are released, and no set of requests can wait for each other in a cycle.
#[derive(Debug, Default)]
struct State {
    next_id: u64,
    queues: HashMap<String, VecDeque<u64>>,
    requests: HashMap<u64, Request>,
}

impl State {
    /// Queues a request for `keys` (sorted, deduplicated); its id, and the receiver that wakes
    /// it when it must wait (`None`: granted at once).
    fn enqueue(&mut self, keys: Vec<String>) -> (u64, Option<oneshot::Receiver<()>>) {
        let id = self.next_id;
        self.next_id += 1;
        for key in &keys {
            self.queues.entry(key.clone()).or_default().push_back(id);
        }
        let granted = self.first_everywhere(id, &keys);
        let (wake, wait) = if granted {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        self.requests.insert(
            id,
            Request {
                keys,
                granted,
                wake,
            },
        );
        (id, wait)
    }

    fn first_everywhere(&self, id: u64, keys: &[String]) -> bool {
        keys.iter()
            .all(|k| self.queues.get(k).and_then(|q| q.front()) == Some(&id))
    }

    /// Removes request `id` (released, or given up while waiting) from its queues, and grants
    /// the requests that it was the last obstacle of.
    fn remove(&mut self, id: u64) {
        let Some(request) = self.requests.remove(&id) else {
            return;
        };
        let mut next = Vec::new();
        for key in &request.keys {
            let Some(queue) = self.queues.get_mut(key) else {
                continue;
            };
            queue.retain(|other| *other != id);
            match queue.front() {
                Some(first) => next.push(*first),
                None => {
                    self.queues.remove(key);
                }
            }
        }
        for first in next {
            let ready = match self.requests.get(&first) {
                Some(r) if !r.granted => self.first_everywhere(first, &r.keys),
                _ => false,
            };
            if ready && let Some(r) = self.requests.get_mut(&first) {
                r.granted = true;
                if let Some(wake) = r.wake.take() {
                    // A caller that has gone away gives its keys back from its own drop.
                    let _ = wake.send(());
                }
            }
        }
    }
}

type Shared = Arc<StdMutex<State>>;

fn state(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An async mutex per string key, for one process. Cheap to clone; clones share the locks.
#[derive(Debug, Clone, Default)]
pub struct KeyedMutex {
    shared: Shared,
}

/// A granted request; dropping it releases its keys.
#[derive(Debug)]
struct Held {
    shared: Shared,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        state(&self.shared).remove(self.id);
    }
}

/// Holds the lock on one key of a [`KeyedMutex`]; dropping it releases the lock.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct KeyGuard {
    key: String,
    _held: Held,
}

/// Holds the locks on a set of keys of a [`KeyedMutex`] ([`KeyedMutex::lock_all`]); dropping it
/// releases them all.
#[derive(Debug)]
#[must_use = "dropping the guard releases the locks"]
pub struct KeysGuard {
    keys: Vec<String>,
    _held: Held,
}

impl KeyedMutex {
    /// An empty set of locks.
    pub fn new() -> Self {
        KeyedMutex::default()
    }

    /// Waits until request `id` is granted; gives the place up if dropped before.
    async fn granted(&self, id: u64, wait: Option<oneshot::Receiver<()>>) -> Held {
        let held = Held {
            shared: self.shared.clone(),
            id,
        };
        if let Some(wait) = wait {
            // The sender is dropped unsent only with the request, which `held` owns.
            let _ = wait.await;
        }
        held
    }

    /// Waits for the lock on `key` (first come, first served) and holds it until the guard drops.
    ///
    /// # Cancel safety
    /// Dropping the future while it waits gives up the place in the queue and takes nothing.
    pub async fn lock(&self, key: &str) -> KeyGuard {
        let (id, wait) = state(&self.shared).enqueue(vec![key.to_string()]);
        KeyGuard {
            key: key.to_string(),
            _held: self.granted(id, wait).await,
        }
    }

    /// Waits for the locks on all of `keys` at once and holds them until the guard drops.
    ///
    /// The request is served in arrival order on every key it shares with other requests (those
    /// of [`KeyedMutex::lock`] too): it waits for the requests before it that want one of its
    /// keys, and the later ones that want one of its keys wait for it. It holds none of its keys
    /// while it waits. Requests for overlapping sets cannot deadlock, whatever order their keys
    /// are given in. Duplicate keys count once.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use contend::strategy::mutex::KeyedMutex;
    /// let locks = KeyedMutex::new();
    /// let both = locks.lock_all(["account:2", "account:1"]).await;
    /// assert_eq!(both.keys(), ["account:1", "account:2"]);
    /// assert!(locks.try_lock("account:1").is_none());
    /// drop(both);
    /// assert!(locks.is_empty());
    /// # }
    /// ```
    ///
    /// # Cancel safety
    /// Dropping the future while it waits gives up the place in every queue and takes nothing.
    pub async fn lock_all<I, K>(&self, keys: I) -> KeysGuard
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let mut keys: Vec<String> = keys.into_iter().map(Into::into).collect();
        keys.sort();
        keys.dedup();
        let (id, wait) = state(&self.shared).enqueue(keys.clone());
        KeysGuard {
            keys,
            _held: self.granted(id, wait).await,
        }
    }

    /// Takes the lock on `key` if no one holds it or waits for it right now.
    pub fn try_lock(&self, key: &str) -> Option<KeyGuard> {
        let mut state = state(&self.shared);
        if state.queues.contains_key(key) {
            return None;
        }
        let (id, wait) = state.enqueue(vec![key.to_string()]);
        debug_assert!(wait.is_none(), "a key no one queues for is granted at once");
        Some(KeyGuard {
            key: key.to_string(),
            _held: Held {
                shared: self.shared.clone(),
                id,
            },
        })
    }

    /// The first of `keys` that someone holds or waits for right now, if any (what a request
    /// that gave up waiting was most likely stopped by).
    pub(crate) fn first_taken<'k>(&self, keys: &'k [String]) -> Option<&'k str> {
        let state = state(&self.shared);
        keys.iter()
            .find(|k| state.queues.contains_key(k.as_str()))
            .map(String::as_str)
    }

    /// How many keys are currently held or waited for.
    pub fn len(&self) -> usize {
        state(&self.shared).queues.len()
    }

    /// Whether no key is held or waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KeyGuard {
    /// The key this guard holds.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl KeysGuard {
    /// The keys this guard holds, sorted and deduplicated.
    pub fn keys(&self) -> &[String] {
        &self.keys
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

    /// Lets the spawned tasks run until they wait (for locks that are held).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_set_is_served_in_arrival_order_on_every_key() {
        // "a" is held; the first request wants "a" and "b", a later one only "b".
        async fn order(all_at_once: bool) -> Vec<&'static str> {
            let locks = KeyedMutex::new();
            let granted = Arc::new(StdMutex::new(Vec::new()));
            let holder = locks.lock("a").await;
            let (l, g) = (locks.clone(), granted.clone());
            let first = tokio::spawn(async move {
                if all_at_once {
                    let _both = l.lock_all(["a", "b"]).await;
                    g.lock().unwrap().push("first");
                } else {
                    // One key at a time: the executor's `mutex` before lock_all.
                    let _a = l.lock("a").await;
                    let _b = l.lock("b").await;
                    g.lock().unwrap().push("first");
                }
            });
            settle().await;
            let (l, g) = (locks.clone(), granted.clone());
            let later = tokio::spawn(async move {
                let _b = l.lock("b").await;
                g.lock().unwrap().push("later");
            });
            settle().await;
            drop(holder);
            first.await.unwrap();
            later.await.unwrap();
            assert!(locks.is_empty());
            granted.lock().unwrap().clone()
        }
        // One key at a time the later request takes "b" while the first waits for "a": the
        // first then queues again behind it.
        assert_eq!(order(false).await, ["later", "first"]);
        assert_eq!(order(true).await, ["first", "later"]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_given_up_while_waiting_leaves_its_place() {
        let locks = KeyedMutex::new();
        let holder = locks.lock("a").await;
        let l = locks.clone();
        let waiting = tokio::spawn(async move { l.lock_all(["b", "a"]).await.keys().len() });
        settle().await;
        assert!(
            locks.try_lock("b").is_none(),
            "the waiting request is queued on b"
        );
        let l = locks.clone();
        let later = tokio::spawn(async move { l.lock("b").await.key().to_string() });
        settle().await;
        assert!(!later.is_finished());
        waiting.abort();
        assert!(waiting.await.is_err());
        // The later request gets "b" while "a" is still held.
        assert_eq!(later.await.unwrap(), "b");
        drop(holder);
        assert!(locks.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_sets_serialize_without_deadlock() {
        // Each task adds 1 to two or three of four counters per round, taking their keys in
        // varying orders; read, yield, write loses updates unless the locks serialize.
        const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
        let locks = KeyedMutex::new();
        let counters = Arc::new(StdMutex::new([0_u64; 4]));
        let expected = Arc::new(StdMutex::new([0_u64; 4]));
        let mut tasks = Vec::new();
        for t in 0..16_usize {
            let (locks, counters, expected) = (locks.clone(), counters.clone(), expected.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..50_usize {
                    let mut picked: Vec<usize> =
                        (0..4).filter(|i| (t + round + i) % 3 != 0).collect();
                    if (t + round) % 2 == 1 {
                        picked.reverse();
                    }
                    let _g = locks.lock_all(picked.iter().map(|&i| KEYS[i])).await;
                    for &i in &picked {
                        let v = counters.lock().unwrap()[i];
                        tokio::task::yield_now().await;
                        counters.lock().unwrap()[i] = v + 1;
                        expected.lock().unwrap()[i] += 1;
                    }
                }
            }));
        }
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .expect("no deadlock");
        assert_eq!(*counters.lock().unwrap(), *expected.lock().unwrap());
        assert!(locks.is_empty());
    }
}
