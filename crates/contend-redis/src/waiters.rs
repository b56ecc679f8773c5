//! Waiting without polling: one pub/sub connection per [`crate::LockClient`], shared by every
//! task of the process that waits for a lock, and a dispatcher that wakes one waiter per
//! release notification.
//!
//! # Design
//! - A waiter registers interest in a key's release channel (a reference count on an entry in
//!   a shared map) before it tries the lock, and notes whether the channel was already
//!   subscribed at that moment. If it was, any release after the failed attempt is delivered
//!   to this process. If it was not, the waiter subscribes (once per channel, confirmed by
//!   Redis) and tries again before it waits: the release it might have missed happened before
//!   the subscription, so the second attempt sees the lock free.
//! - The dispatcher task owns the connection. It performs subscriptions one at a time (so an
//!   unsubscribe can never overtake a later subscribe), and for every message wakes *one*
//!   waiting task of that key (`Notify::notify_one`): one release, one retry, no thundering
//!   herd. A woken task that is cancelled passes its wake-up on to the next waiter.
//! - Within the process, a task arriving while others already wait for the same key queues
//!   behind them instead of barging in (it would mostly fail and cost a command).
//! - Every waiter also wakes when the holder's lease (as last seen) ends, so a crashed holder
//!   or a lost message delays it by at most one lease.
//! - Channels without waiters are unsubscribed after a short linger, so keys under steady
//!   contention do not pay a subscribe/unsubscribe pair per wait.
//! - If the connection drops, every waiter is woken; its next wait subscribes again on a new
//!   connection, or fails with [`contend::Error::LockService`] if Redis is unreachable.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contend::Result;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::node::{Timeouts, other_failure, redis_failure, timeout_failure};

/// How long a channel stays subscribed after its last waiter left.
const LINGER: Duration = Duration::from_secs(2);

/// One key's waiters in this process.
pub(crate) struct Entry {
    pub notify: Notify,
    state: Mutex<EntryState>,
}

#[derive(Debug)]
struct EntryState {
    /// Registered interests (waiting or about to).
    refs: usize,
    /// Tasks parked on `notify`.
    parked: usize,
    /// Whether the dispatcher has a confirmed subscription for the channel.
    subscribed: bool,
    /// When the current holder's lease ends, as last reported by a failed attempt.
    holder_until: Option<Instant>,
    /// When `refs` last dropped to zero.
    idle_since: Instant,
}

type Map = Mutex<HashMap<String, Arc<Entry>>>;

enum Command {
    Subscribe(String, oneshot::Sender<Result<()>>),
}

/// The process-wide registry of waiters for one Redis node.
pub(crate) struct Waiters {
    map: Arc<Map>,
    commands: mpsc::UnboundedSender<Command>,
    timeouts: Timeouts,
    address: String,
}

impl Waiters {
    /// Starts the dispatcher. The pub/sub connection is opened when the first waiter needs it.
    pub fn start(client: redis::Client, address: String, timeouts: Timeouts) -> Waiters {
        let map: Arc<Map> = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(client, address.clone(), timeouts, map.clone(), rx));
        Waiters {
            map,
            commands: tx,
            timeouts,
            address,
        }
    }

    /// Registers interest in `channel` until the returned handle is dropped.
    pub fn register(&self, channel: &str) -> Interest<'_> {
        let mut map = lock(&self.map);
        let entry = map
            .entry(channel.to_string())
            .or_insert_with(|| {
                Arc::new(Entry {
                    notify: Notify::new(),
                    state: Mutex::new(EntryState {
                        refs: 0,
                        parked: 0,
                        subscribed: false,
                        holder_until: None,
                        idle_since: Instant::now(),
                    }),
                })
            })
            .clone();
        lock(&entry.state).refs += 1;
        Interest {
            waiters: self,
            channel: channel.to_string(),
            entry,
        }
    }
}

/// A registered interest in one channel.
pub(crate) struct Interest<'a> {
    waiters: &'a Waiters,
    channel: String,
    entry: Arc<Entry>,
}

impl Interest<'_> {
    /// Whether the channel is subscribed now.
    pub fn is_subscribed(&self) -> bool {
        lock(&self.entry.state).subscribed
    }

    /// When others of this process already wait for the key: the holder's lease end they saw.
    /// A newcomer then queues behind them instead of trying the lock.
    pub fn queue_behind(&self) -> Option<Instant> {
        let state = lock(&self.entry.state);
        if state.subscribed && state.parked > 0 {
            state.holder_until
        } else {
            None
        }
    }

    /// Subscribes the channel (confirmed by Redis) if it is not already.
    pub async fn subscribe(&self) -> Result<()> {
        if self.is_subscribed() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let unavailable = || other_failure(&self.waiters.address, "the pub/sub dispatcher stopped");
        self.waiters
            .commands
            .send(Command::Subscribe(self.channel.clone(), tx))
            .map_err(|_| unavailable())?;
        // The dispatcher bounds connect + subscribe itself; this is a backstop.
        let limit = self.waiters.timeouts.op() * 2;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable()),
            Err(_) => Err(timeout_failure(&self.waiters.address, "subscribe", limit)),
        }
    }

    /// Parks until a release notification or `until`, whichever comes first. `holder_until`
    /// is the holder's lease end, shared with newcomers.
    pub async fn park(&self, holder_until: Option<Instant>, until: Instant) {
        {
            let mut state = lock(&self.entry.state);
            state.parked += 1;
            if holder_until.is_some() {
                state.holder_until = holder_until;
            }
        }
        let _unpark = Unpark(&self.entry);
        tokio::select! {
            _ = self.entry.notify.notified() => {}
            _ = tokio::time::sleep_until(until.into()) => {}
        }
    }
}

struct Unpark<'a>(&'a Entry);

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).parked -= 1;
    }
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.waiters.map);
        let mut state = lock(&self.entry.state);
        state.refs -= 1;
        if state.refs == 0 {
            state.idle_since = Instant::now();
            if !state.subscribed {
                // Never subscribed: nothing to undo in Redis.
                drop(state);
                if map
                    .get(&self.channel)
                    .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
                {
                    map.remove(&self.channel);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the counters half-updated in a way that
    // matters more than stopping every waiter; keep going with the data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Connection {
    sink: PubSubSink,
    stream: PubSubStream,
}

/// The dispatcher task.
async fn dispatch(
    client: redis::Client,
    address: String,
    timeouts: Timeouts,
    map: Arc<Map>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut conn: Option<Connection> = None;
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut sweep = tokio::time::interval(LINGER / 2);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = async {
            match conn.as_mut() {
                Some(c) => c.stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv() => {
                let Some(Command::Subscribe(channel, reply)) = command else {
                    return; // the client is gone
                };
                let result =
                    subscribe(&client, &address, timeouts, &mut conn, &mut subscribed, &channel)
                        .await;
                if result.is_ok()
                    && let Some(entry) = lock(&map).get(&channel)
                {
                    lock(&entry.state).subscribed = true;
                }
                if result.is_err() && conn.is_none() {
                    disconnected(&map, &mut subscribed);
                }
                let _ = reply.send(result);
            }
            message = message => match message {
                Some(msg) => {
                    let channel = msg.get_channel_name();
                    if let Some(entry) = lock(&map).get(channel) {
                        entry.notify.notify_one();
                    }
                }
                None => {
                    tracing::debug!(%address, "pub/sub connection closed");
                    conn = None;
                    disconnected(&map, &mut subscribed);
                }
            },
            _ = sweep.tick() => {
                // Entries idle past the linger go; so do subscriptions whose entry is gone (a
                // waiter cancelled while its subscription was being made).
                let stale: Vec<String> = {
                    let mut map = lock(&map);
                    let now = Instant::now();
                    map.retain(|_, e| {
                        let s = lock(&e.state);
                        !(s.refs == 0 && now.duration_since(s.idle_since) >= LINGER)
                    });
                    subscribed.iter().filter(|c| !map.contains_key(*c)).cloned().collect()
                };
                for channel in stale {
                    subscribed.remove(&channel);
                    if let Some(c) = conn.as_mut() {
                        let unsubscribe = c.sink.unsubscribe(&channel);
                        if !matches!(tokio::time::timeout(timeouts.response, unsubscribe).await, Ok(Ok(()))) {
                            // Stale subscriptions only cost ignored messages, but a connection
                            // that does not answer is replaced.
                            conn = None;
                            disconnected(&map, &mut subscribed);
                        }
                    }
                }
            }
        }
    }
}

/// Subscribes `channel`, connecting first if needed.
async fn subscribe(
    client: &redis::Client,
    address: &str,
    timeouts: Timeouts,
    conn: &mut Option<Connection>,
    subscribed: &mut HashSet<String>,
    channel: &str,
) -> Result<()> {
    if subscribed.contains(channel) && conn.is_some() {
        return Ok(());
    }
    if conn.is_none() {
        let pubsub = match tokio::time::timeout(timeouts.op(), client.get_async_pubsub()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return Err(redis_failure(
                    address,
                    "cannot open the pub/sub connection",
                    e,
                ));
            }
            Err(_) => {
                return Err(timeout_failure(
                    address,
                    "cannot open the pub/sub connection",
                    timeouts.op(),
                ));
            }
        };
        let (sink, stream) = pubsub.split();
        *conn = Some(Connection { sink, stream });
    }
    let Some(c) = conn.as_mut() else {
        return Err(other_failure(address, "no pub/sub connection"));
    };
    match tokio::time::timeout(timeouts.response, c.sink.subscribe(channel)).await {
        Ok(Ok(())) => {
            subscribed.insert(channel.to_string());
            Ok(())
        }
        Ok(Err(e)) => {
            *conn = None;
            Err(redis_failure(address, "subscribe failed", e))
        }
        Err(_) => {
            *conn = None;
            Err(timeout_failure(
                address,
                "subscribe failed",
                timeouts.response,
            ))
        }
    }
}

/// The connection is gone: nothing is subscribed any more, and every waiter must look again.
fn disconnected(map: &Map, subscribed: &mut HashSet<String>) {
    subscribed.clear();
    for entry in lock(map).values() {
        lock(&entry.state).subscribed = false;
        entry.notify.notify_waiters();
    }
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("address", &self.address)
            .finish()
    }
}
