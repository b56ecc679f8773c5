//! Waiting without polling: one pub/sub connection per Redis node of a client, shared by every
//! task of the process that waits for a lock, and a dispatcher per node that wakes waiters on
//! release notifications.
//!
//! # Design
//! - A waiter registers interest in a key's release channel (a reference count on an entry in
//!   a shared map) before it tries the lock, and notes whether the channel was already
//!   subscribed at that moment. If it was, any release after the failed attempt is delivered
//!   to this process. If it was not, the waiter subscribes (once per channel and node, confirmed
//!   by Redis) and tries again before it waits: the release it might have missed happened before
//!   the subscription, so the second attempt sees the lock free.
//! - Each dispatcher task owns one node's connection. It performs subscriptions one at a time
//!   (so an unsubscribe can never overtake a later subscribe). What a message wakes depends on
//!   the lock kind ([`Wake`]): *one* waiting task of that key (`Notify::notify_one`: one
//!   release, one retry, no thundering herd; a woken task that is cancelled passes its wake-up
//!   on), every waiting task (a writer's release lets all readers in), the one waiter the
//!   message names (the head of a fair queue), or, for Redlock, one task once enough nodes
//!   published the same release (N nodes publish one release; counting them wakes one waiter
//!   once, when a majority is free, instead of N waiters at once).
//! - Within the process, a task arriving while others already wait for the same key queues
//!   behind them instead of barging in (it would mostly fail and cost a command).
//! - Every waiter also wakes when the holder's lease (as last seen) ends, so a crashed holder
//!   or a lost message delays it by at most one lease.
//! - Channels without waiters are unsubscribed after a short linger, so keys under steady
//!   contention do not pay a subscribe/unsubscribe pair per wait.
//! - If a connection drops, every waiter is woken; its next wait subscribes again on a new
//!   connection, or fails with [`contend::Error::LockService`] if Redis is unreachable.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contend::Result;
use futures_util::StreamExt;
use futures_util::future::join_all;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::node::{Timeouts, other_failure, redis_failure, timeout_failure};

/// How long a channel stays subscribed after its last waiter left.
const LINGER: Duration = Duration::from_secs(2);

/// How many recent Redlock releases an entry remembers while counting their nodes.
const RECENT_RELEASES: usize = 32;

/// What a release notification on a channel wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// One waiting task per message (mutexes, semaphore permits).
    One,
    /// Every waiting task of the key in this process (read-write locks).
    All,
    /// The task registered under the token the message carries (the head of a fair queue).
    Named,
    /// Redlock: each node publishes the same release (its payload names it); one task is woken
    /// once enough of the subscribed nodes published it for a majority to be free.
    Quorum,
}

/// One key's waiters in this process.
pub(crate) struct Entry {
    notify: Notify,
    state: Mutex<EntryState>,
}

#[derive(Debug)]
struct EntryState {
    wake: Wake,
    /// Registered interests (waiting or about to).
    refs: usize,
    /// Tasks parked on `notify`.
    parked: usize,
    /// Per node: whether its dispatcher has a confirmed subscription for the channel.
    subscribed: Vec<bool>,
    /// When the current holder's lease ends, as last reported by a failed attempt.
    holder_until: Option<Instant>,
    /// When `refs` last dropped to zero.
    idle_since: Instant,
    /// Messages seen ([`Wake::All`]: a waiter that saw it change since its attempt does not park).
    generation: u64,
    /// [`Wake::Named`]: the waiters by token.
    named: HashMap<String, Arc<Notify>>,
    /// [`Wake::Quorum`]: recent releases (payload, nodes that published it, whether it woke a task).
    releases: VecDeque<(String, Vec<usize>, bool)>,
}

impl Entry {
    /// A message from node `node` on this entry's channel.
    fn deliver(&self, node: usize, payload: &str, quorum: usize) {
        let mut state = lock(&self.state);
        match state.wake {
            Wake::One => {
                drop(state);
                self.notify.notify_one();
            }
            Wake::All => {
                state.generation += 1;
                drop(state);
                self.notify.notify_waiters();
            }
            Wake::Named => {
                if let Some(waiter) = state.named.get(payload) {
                    waiter.notify_one();
                }
            }
            Wake::Quorum => {
                // A holder holds at least a quorum of nodes; at most the unsubscribed ones can
                // stay silent, so this many messages come from any full release.
                let n = state.subscribed.len();
                let subscribed = state.subscribed.iter().filter(|s| **s).count();
                let threshold = quorum.saturating_sub(n - subscribed).max(1);
                let index = match state.releases.iter().position(|r| r.0 == payload) {
                    Some(i) => i,
                    None => {
                        if state.releases.len() == RECENT_RELEASES {
                            state.releases.pop_front();
                        }
                        state
                            .releases
                            .push_back((payload.to_string(), Vec::new(), false));
                        state.releases.len() - 1
                    }
                };
                let release = &mut state.releases[index];
                if !release.1.contains(&node) {
                    release.1.push(node);
                }
                if !release.2 && release.1.len() >= threshold {
                    release.2 = true;
                    drop(state);
                    self.notify.notify_one();
                }
            }
        }
    }

    /// Node `node`'s connection is gone: its subscriptions are, and every waiter must look again.
    fn disconnected(&self, node: usize) {
        let mut state = lock(&self.state);
        state.subscribed[node] = false;
        state.generation += 1;
        for waiter in state.named.values() {
            waiter.notify_one();
        }
        drop(state);
        self.notify.notify_waiters();
    }
}

type Map = Mutex<HashMap<String, Arc<Entry>>>;

enum Command {
    Subscribe(String, oneshot::Sender<Result<()>>),
}

/// The process-wide registry of waiters for the nodes of one client.
pub(crate) struct Waiters {
    map: Arc<Map>,
    /// One dispatcher per node.
    commands: Vec<mpsc::UnboundedSender<Command>>,
    timeouts: Timeouts,
    addresses: Vec<String>,
    /// Nodes whose subscription a waiter needs: 1 for one node, the majority for Redlock.
    quorum: usize,
}

impl Waiters {
    /// Starts one dispatcher per node (`(client, address)`). The pub/sub connections are opened
    /// when the first waiter needs them. `quorum`: how many nodes must be subscribed for a
    /// waiter to rely on notifications.
    pub fn start(
        nodes: Vec<(redis::Client, String)>,
        timeouts: Timeouts,
        quorum: usize,
    ) -> Waiters {
        let map: Arc<Map> = Arc::new(Mutex::new(HashMap::new()));
        let mut commands = Vec::with_capacity(nodes.len());
        let mut addresses = Vec::with_capacity(nodes.len());
        for (index, (client, address)) in nodes.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            let dispatcher = Dispatcher {
                index,
                client,
                address: address.clone(),
                timeouts,
                map: map.clone(),
                quorum,
            };
            tokio::spawn(dispatcher.run(rx));
            commands.push(tx);
            addresses.push(address);
        }
        Waiters {
            map,
            commands,
            timeouts,
            addresses,
            quorum: quorum.max(1),
        }
    }

    /// Registers interest in `channel` until the returned handle is dropped. Every
    /// registration of a channel must use the same `wake`.
    pub fn register(&self, channel: &str, wake: Wake) -> Interest<'_> {
        let mut map = lock(&self.map);
        let nodes = self.commands.len();
        let entry = map
            .entry(channel.to_string())
            .or_insert_with(|| {
                Arc::new(Entry {
                    notify: Notify::new(),
                    state: Mutex::new(EntryState {
                        wake,
                        refs: 0,
                        parked: 0,
                        subscribed: vec![false; nodes],
                        holder_until: None,
                        idle_since: Instant::now(),
                        generation: 0,
                        named: HashMap::new(),
                        releases: VecDeque::new(),
                    }),
                })
            })
            .clone();
        lock(&entry.state).refs += 1;
        Interest {
            waiters: self,
            channel: channel.to_string(),
            entry,
            name: None,
            seen: AtomicU64::new(0),
        }
    }

    /// Registers a [`Wake::Named`] waiter: messages carrying `token` wake it.
    pub fn register_named(&self, channel: &str, token: &str) -> Interest<'_> {
        let mut interest = self.register(channel, Wake::Named);
        let notify = Arc::new(Notify::new());
        lock(&interest.entry.state)
            .named
            .insert(token.to_string(), notify.clone());
        interest.name = Some((token.to_string(), notify));
        interest
    }
}

/// A registered interest in one channel.
pub(crate) struct Interest<'a> {
    waiters: &'a Waiters,
    channel: String,
    entry: Arc<Entry>,
    /// [`Wake::Named`]: this waiter's token and its own wake-up.
    name: Option<(String, Arc<Notify>)>,
    /// [`Wake::All`]: the entry's generation when this waiter last looked ([`Interest::mark`]).
    seen: AtomicU64,
}

impl Interest<'_> {
    /// Whether enough nodes have the channel subscribed now.
    pub fn is_subscribed(&self) -> bool {
        let state = lock(&self.entry.state);
        state.subscribed.iter().filter(|s| **s).count() >= self.waiters.quorum
    }

    /// Notes the messages seen so far, before an attempt: a [`Wake::All`] message after this
    /// makes the next [`Interest::park`] return at once.
    pub fn mark(&self) {
        let generation = lock(&self.entry.state).generation;
        self.seen.store(generation, Ordering::SeqCst);
    }

    /// When others of this process already wait for the key: the holder's lease end they saw.
    /// A newcomer then queues behind them instead of trying the lock.
    pub fn queue_behind(&self) -> Option<Instant> {
        let state = lock(&self.entry.state);
        let subscribed = state.subscribed.iter().filter(|s| **s).count() >= self.waiters.quorum;
        if subscribed && state.parked > 0 && state.wake != Wake::All {
            state.holder_until
        } else {
            None
        }
    }

    /// Subscribes the channel (confirmed by Redis) on every node where it is not, and succeeds
    /// when enough nodes have it.
    pub async fn subscribe(&self) -> Result<()> {
        let missing: Vec<usize> = {
            let state = lock(&self.entry.state);
            (0..state.subscribed.len())
                .filter(|i| !state.subscribed[*i])
                .collect()
        };
        let results = join_all(missing.into_iter().map(|i| self.subscribe_on(i))).await;
        if self.is_subscribed() {
            return Ok(());
        }
        match results.into_iter().find_map(|r| r.err()) {
            Some(e) => Err(e),
            None => Err(other_failure(
                &self.waiters.addresses.join(","),
                "too few nodes subscribed",
            )),
        }
    }

    async fn subscribe_on(&self, node: usize) -> Result<()> {
        let address = &self.waiters.addresses[node];
        let (tx, rx) = oneshot::channel();
        let unavailable = || other_failure(address, "the pub/sub dispatcher stopped");
        self.waiters.commands[node]
            .send(Command::Subscribe(self.channel.clone(), tx))
            .map_err(|_| unavailable())?;
        // The dispatcher bounds connect + subscribe itself; this is a backstop.
        let limit = self.waiters.timeouts.op() * 2;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable()),
            Err(_) => Err(timeout_failure(address, "subscribe", limit)),
        }
    }

    /// Parks until a release notification or `until`, whichever comes first. `holder_until`
    /// is the holder's lease end, shared with newcomers.
    pub async fn park(&self, holder_until: Option<Instant>, until: Instant) {
        let own = self.name.as_ref().map(|(_, n)| n.clone());
        let notify = own.as_deref().unwrap_or(&self.entry.notify);
        let notified = notify.notified();
        tokio::pin!(notified);
        {
            let mut state = lock(&self.entry.state);
            if state.wake == Wake::All {
                // Registered before the check, so a message after it wakes this future.
                notified.as_mut().enable();
                if state.generation != self.seen.load(Ordering::SeqCst) {
                    return;
                }
            }
            state.parked += 1;
            if holder_until.is_some() {
                state.holder_until = holder_until;
            }
        }
        let _unpark = Unpark(&self.entry);
        tokio::select! {
            _ = notified => {}
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
        if let Some((token, _)) = &self.name {
            state.named.remove(token);
        }
        state.refs -= 1;
        if state.refs == 0 {
            state.idle_since = Instant::now();
            if !state.subscribed.iter().any(|s| *s) {
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

/// The dispatcher of one node.
struct Dispatcher {
    index: usize,
    client: redis::Client,
    address: String,
    timeouts: Timeouts,
    map: Arc<Map>,
    quorum: usize,
}

impl Dispatcher {
    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
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
                    let result = self.subscribe(&mut conn, &mut subscribed, &channel).await;
                    if result.is_ok()
                        && let Some(entry) = lock(&self.map).get(&channel)
                    {
                        lock(&entry.state).subscribed[self.index] = true;
                    }
                    if result.is_err() && conn.is_none() {
                        self.disconnected(&mut subscribed);
                    }
                    let _ = reply.send(result);
                }
                message = message => match message {
                    Some(msg) => {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        let entry = lock(&self.map).get(msg.get_channel_name()).cloned();
                        if let Some(entry) = entry {
                            entry.deliver(self.index, &payload, self.quorum);
                        }
                    }
                    None => {
                        tracing::debug!(address = %self.address, "pub/sub connection closed");
                        conn = None;
                        self.disconnected(&mut subscribed);
                    }
                },
                _ = sweep.tick() => {
                    // Entries idle past the linger go; so do subscriptions whose entry is gone (a
                    // waiter cancelled while its subscription was being made).
                    let stale: Vec<String> = {
                        let mut map = lock(&self.map);
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
                            if !matches!(tokio::time::timeout(self.timeouts.response, unsubscribe).await, Ok(Ok(()))) {
                                // Stale subscriptions only cost ignored messages, but a connection
                                // that does not answer is replaced.
                                conn = None;
                                self.disconnected(&mut subscribed);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Subscribes `channel`, connecting first if needed.
    async fn subscribe(
        &self,
        conn: &mut Option<Connection>,
        subscribed: &mut HashSet<String>,
        channel: &str,
    ) -> Result<()> {
        let (address, timeouts) = (&self.address, self.timeouts);
        if subscribed.contains(channel) && conn.is_some() {
            return Ok(());
        }
        if conn.is_none() {
            let pubsub =
                match tokio::time::timeout(timeouts.op(), self.client.get_async_pubsub()).await {
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

    /// The connection is gone: nothing is subscribed on this node any more, and every waiter
    /// must look again.
    fn disconnected(&self, subscribed: &mut HashSet<String>) {
        subscribed.clear();
        for entry in lock(&self.map).values() {
            entry.disconnected(self.index);
        }
    }
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("addresses", &self.addresses)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn entry(wake: Wake, subscribed: &[bool]) -> Entry {
        Entry {
            notify: Notify::new(),
            state: Mutex::new(EntryState {
                wake,
                refs: 1,
                parked: 0,
                subscribed: subscribed.to_vec(),
                holder_until: None,
                idle_since: Instant::now(),
                generation: 0,
                named: HashMap::new(),
                releases: VecDeque::new(),
            }),
        }
    }

    /// Whether a wake-up is waiting for the next `notified()`.
    fn woken(entry: &Entry) -> bool {
        entry.notify.notified().now_or_never().is_some()
    }

    #[test]
    fn a_redlock_release_wakes_one_waiter_once_a_majority_published_it() {
        let e = entry(Wake::Quorum, &[true; 5]);
        e.deliver(0, "a", 3);
        e.deliver(1, "a", 3);
        e.deliver(1, "a", 3); // the same node twice counts once
        assert!(!woken(&e), "woken before a majority was free");
        e.deliver(2, "a", 3);
        assert!(woken(&e));
        // The other nodes' messages of the same release wake nobody else.
        e.deliver(3, "a", 3);
        e.deliver(4, "a", 3);
        assert!(!woken(&e));
        // Another release counts on its own.
        e.deliver(0, "b", 3);
        assert!(!woken(&e));
    }

    #[test]
    fn nodes_without_a_subscription_lower_the_count_needed() {
        // Two of five nodes cannot tell us: any release of a majority holder reaches us from
        // at least one of the three others.
        let e = entry(Wake::Quorum, &[true, true, true, false, false]);
        e.deliver(2, "a", 3);
        assert!(woken(&e));
    }

    #[test]
    fn named_messages_wake_only_their_waiter() {
        let e = entry(Wake::Named, &[true]);
        let mine = Arc::new(Notify::new());
        lock(&e.state).named.insert("me".into(), mine.clone());
        e.deliver(0, "someone-else", 1);
        assert!(mine.notified().now_or_never().is_none());
        e.deliver(0, "me", 1);
        assert!(mine.notified().now_or_never().is_some());
    }
}
