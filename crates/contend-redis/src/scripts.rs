//! The Lua scripts every lock runs on Redis, and the one place that calls them by SHA.
//!
//! Each script is atomic on its node. They are loaded once per connection (`SCRIPT LOAD` when
//! the client connects) and called with `EVALSHA`; a server that lost its script cache (a
//! restart, `SCRIPT FLUSH`) answers `NOSCRIPT`, and the call loads the script and tries again.
//!
//! The scripts only call the commands in [`SCRIPT_COMMANDS`]. Redis 7 counts the commands a
//! script calls in `INFO commandstats` too; [`crate::command_count`] subtracts these names so
//! that it counts what clients sent. None of contend's clients sends them directly.

use std::sync::LazyLock;

use redis::Script;

/// The commands the lock scripts call, lower case as in `INFO commandstats`.
pub const SCRIPT_COMMANDS: &[&str] = &[
    "pttl",
    "psetex",
    "incr",
    "incrby",
    "get",
    "del",
    "publish",
    "pexpire",
    "time",
    "hget",
    "hset",
    "hincrby",
    "zadd",
    "zrem",
    "zscore",
    "zcard",
    "zrange",
    "zrangebyscore",
    "zremrangebyscore",
];

/// Acquire: `SET lock token NX PX lease` semantics plus a fencing counter increment.
///
/// `KEYS[1]` lock key, `KEYS[2]` fence counter key; `ARGV[1]` token, `ARGV[2]` lease in ms.
/// Returns `{1, fence}` when granted, `{0, pttl}` when held by someone else (`pttl` is the
/// holder's remaining lease in ms, -1 if the key has no expiry).
const ACQUIRE_LUA: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl ~= -2 then
  return {0, ttl}
end
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
return {1, redis.call('INCR', KEYS[2])}
";
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_LUA));

/// Release: delete the lock only if it still carries our token, and tell waiters.
///
/// `KEYS[1]` lock key; `ARGV[1]` token, `ARGV[2]` the release channel. Returns 1 when released,
/// 0 when the lock was not ours (expired, or taken by someone else since).
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
return 0
";
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));

/// Release without notification, for the spin-lock baseline (nobody subscribes).
///
/// `KEYS[1]` lock key; `ARGV[1]` token. Returns 1 when released, 0 when not ours.
const RELEASE_QUIET_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";
pub(crate) static RELEASE_QUIET: LazyLock<Script> =
    LazyLock::new(|| Script::new(RELEASE_QUIET_LUA));

/// Extend: reset the lease only if the lock still carries our token.
///
/// `KEYS[1]` lock key; `ARGV[1]` token, `ARGV[2]` new lease in ms. Returns 1 or 0.
const EXTEND_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(EXTEND_LUA));

/// The end of both raise scripts, once the lock is known to be ours: raises the counter
/// `KEYS[2]` to at least `ARGV[2]` and returns 1. A macro so that `concat!` can join it.
macro_rules! raise_counter_lua {
    () => {
        r"
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local wanted = tonumber(ARGV[2])
if current < wanted then
  redis.call('INCRBY', KEYS[2], wanted - current)
end
return 1
"
    };
}

/// Raise: while we still hold the lock on this node, raise its fence counter to at least a
/// token: for Redlock the token the quorum agreed on, so that any later quorum sees a larger
/// counter; for any lock the highest token a database has accepted (`LockGuard::raise_fence`).
///
/// `KEYS[1]` lock key, `KEYS[2]` fence counter key; `ARGV[1]` token, `ARGV[2]` fence value.
/// Returns 1 when the lock is still ours (counter raised if it was lower), 0 otherwise.
const RAISE_LUA: &str = concat!(
    r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end",
    raise_counter_lua!()
);
pub(crate) static RAISE: LazyLock<Script> = LazyLock::new(|| Script::new(RAISE_LUA));

/// Acquire (Redlock, one node): as [`ACQUIRE`], but a refusal also names the holder by a hash
/// of its token, so that the client can tell a holder with a majority (wait for its release)
/// from a split vote (back off), and recognise that holder's release notifications.
///
/// `KEYS[1]` lock key, `KEYS[2]` fence counter key; `ARGV[1]` token, `ARGV[2]` lease in ms.
/// Returns `{1, fence, ''}` when granted, `{0, pttl, sha1(holder token)}` when held.
const REDLOCK_ACQUIRE_LUA: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder then
  return {0, redis.call('PTTL', KEYS[1]), redis.sha1hex(holder)}
end
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
return {1, redis.call('INCR', KEYS[2]), ''}
";
pub(crate) static REDLOCK_ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(REDLOCK_ACQUIRE_LUA));

/// Release (Redlock, one node): delete the lock only if it still carries our token and, when
/// `ARGV[2]` names a channel, publish the hash of the token there: waiters count the nodes
/// that published the same release.
///
/// `KEYS[1]` lock key; `ARGV[1]` token, `ARGV[2]` the release channel or `''` (no notification).
/// Returns 1 when released, 0 when the lock was not ours.
const REDLOCK_RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '' then
    redis.call('PUBLISH', ARGV[2], redis.sha1hex(ARGV[1]))
  end
  return 1
end
return 0
";
pub(crate) static REDLOCK_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(REDLOCK_RELEASE_LUA));

// The locks beyond mutual exclusion (`crate::kinds`). Times inside these scripts are the
// server's (`TIME`, in ms), so that the clients' clocks never matter; every set of holders or
// waiters is a sorted set scored by the time its member expires, cleaned by the script that
// acquires, so that a member whose client died goes away with its lease.

/// Reentrant acquire: the lock is a hash `{o: owner, n: holds, f: fencing token}`.
///
/// `KEYS[1]` lock hash, `KEYS[2]` fence counter; `ARGV[1]` owner, `ARGV[2]` lease in ms.
/// Returns `{1, fence, holds}` when granted (a new hold, or one more by the same owner; the
/// lease is extended to at least `ARGV[2]`), `{0, pttl, 0}` when another owner holds it.
const REENTRANT_ACQUIRE_LUA: &str = r"
local owner = redis.call('HGET', KEYS[1], 'o')
if owner and owner ~= ARGV[1] then
  return {0, redis.call('PTTL', KEYS[1]), 0}
end
local holds = redis.call('HINCRBY', KEYS[1], 'n', 1)
if holds == 1 then
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'f', redis.call('INCR', KEYS[2]))
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {1, tonumber(redis.call('HGET', KEYS[1], 'f')), holds}
";
pub(crate) static REENTRANT_ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(REENTRANT_ACQUIRE_LUA));

/// Reentrant raise: as [`RAISE`], for the reentrant lock's hash (owned by `o`).
///
/// `KEYS[1]` lock hash, `KEYS[2]` fence counter key; `ARGV[1]` owner, `ARGV[2]` fence value.
/// Returns 1 when the lock is still the owner's (counter raised if it was lower), 0 otherwise.
const REENTRANT_RAISE_LUA: &str = concat!(
    r"
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then
  return 0
end",
    raise_counter_lua!()
);
pub(crate) static REENTRANT_RAISE: LazyLock<Script> =
    LazyLock::new(|| Script::new(REENTRANT_RAISE_LUA));

/// Reentrant release: one hold less; the last one deletes the lock and tells waiters.
///
/// `KEYS[1]` lock hash; `ARGV[1]` owner, `ARGV[2]` release channel. Returns the holds left
/// (0: released), or -1 when the lock is not this owner's (expired, or taken since).
const REENTRANT_RELEASE_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then
  return -1
end
local holds = redis.call('HINCRBY', KEYS[1], 'n', -1)
if holds <= 0 then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 0
end
return holds
";
pub(crate) static REENTRANT_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(REENTRANT_RELEASE_LUA));

/// Reentrant extend: reset the lease if the owner still holds the lock.
///
/// `KEYS[1]` lock hash; `ARGV[1]` owner, `ARGV[2]` lease in ms. Returns 1 or 0.
const REENTRANT_EXTEND_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";
pub(crate) static REENTRANT_EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(REENTRANT_EXTEND_LUA));

/// Lease-set acquire (semaphore permits): a sorted set of holders scored by lease end.
/// Expired holders are removed first, so a crashed client's permit comes back by itself.
///
/// `KEYS[1]` holder set; `ARGV[1]` token, `ARGV[2]` lease in ms, `ARGV[3]` permits.
/// Returns `{1, 0}` when granted, `{0, ms until the first permit expires}` when all are taken.
const PERMIT_ACQUIRE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
";
pub(crate) static PERMIT_ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(PERMIT_ACQUIRE_LUA));

/// Lease-set release (a permit, a read lock): remove the holder and tell waiters (with
/// `ARGV[3]` = `'1'`, only when the set is left empty: a writer waits for the last reader).
///
/// `KEYS[1]` holder set; `ARGV[1]` token, `ARGV[2]` release channel, `ARGV[3]` `'1'` or `'0'`.
/// Returns 1 when the holder was there and not expired, 0 otherwise.
const SHARED_RELEASE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' or redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('PUBLISH', ARGV[2], '1')
end
if tonumber(score) <= now then
  return 0
end
return 1
";
pub(crate) static SHARED_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(SHARED_RELEASE_LUA));

/// Lease-set extend: push the holder's lease end to now + `ARGV[2]`, if it has not expired.
///
/// `KEYS[1]` holder set; `ARGV[1]` token, `ARGV[2]` lease in ms. Returns 1 or 0.
const SHARED_EXTEND_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
";
pub(crate) static SHARED_EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(SHARED_EXTEND_LUA));

/// Fair acquire: join the queue (once, with the next ticket), renew this waiter's heartbeat,
/// drop waiters whose heartbeat ran out, and take the lock if it is free and this waiter is
/// at the head. A waiter that vanished thus leaves the queue one queue timeout after its last
/// call, whatever the others do; when that makes another waiter the head of a free lock, it is
/// told (published on the channel with its token).
///
/// `KEYS[1]` lock, `KEYS[2]` queue (token -> ticket), `KEYS[3]` heartbeats (token -> expiry),
/// `KEYS[4]` ticket counter, `KEYS[5]` fence counter; `ARGV[1]` token, `ARGV[2]` lease in ms,
/// `ARGV[3]` queue timeout in ms, `ARGV[4]` channel. Returns `{1, fence}` or `{0, pttl}` (the
/// holder's remaining lease, -2 when free but others are ahead).
const FAIR_ACQUIRE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, waiter in ipairs(gone) do
  redis.call('ZREM', KEYS[2], waiter)
  redis.call('ZREM', KEYS[3], waiter)
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
for i = 2, 4 do
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
local ttl = redis.call('PTTL', KEYS[1])
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if ttl == -2 and head == ARGV[1] then
  redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {1, redis.call('INCR', KEYS[5])}
end
if ttl == -2 and #gone > 0 and head then
  redis.call('PUBLISH', ARGV[4], head)
end
return {0, ttl}
";
pub(crate) static FAIR_ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(FAIR_ACQUIRE_LUA));

/// Fair release: delete the lock if ours and tell the first live waiter (by its token).
///
/// `KEYS[1]` lock, `KEYS[2]` queue, `KEYS[3]` heartbeats; `ARGV[1]` token, `ARGV[2]` channel.
/// Returns 1 when released, 0 when the lock was not ours.
const FAIR_RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, waiter in ipairs(gone) do
  redis.call('ZREM', KEYS[2], waiter)
  redis.call('ZREM', KEYS[3], waiter)
end
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if head then
  redis.call('PUBLISH', ARGV[2], head)
end
return 1
";
pub(crate) static FAIR_RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(FAIR_RELEASE_LUA));

/// Fair leave: a waiter that gives up (timeout, cancelled) leaves the queue; if the lock is
/// free, the new head is told.
///
/// `KEYS[1]` lock, `KEYS[2]` queue, `KEYS[3]` heartbeats; `ARGV[1]` token, `ARGV[2]` channel.
/// Returns 1 when the waiter was queued.
const FAIR_LEAVE_LUA: &str = r"
local was = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -2 then
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if head then
    redis.call('PUBLISH', ARGV[2], head)
  end
end
return was
";
pub(crate) static FAIR_LEAVE: LazyLock<Script> = LazyLock::new(|| Script::new(FAIR_LEAVE_LUA));

/// Read lock: granted when no writer holds the lock and no writer waits (writer preference:
/// a waiting writer's intent, which expires unless renewed, keeps new readers out).
///
/// `KEYS[1]` writer lock, `KEYS[2]` readers (token -> lease end), `KEYS[3]` writer intents
/// (token -> expiry); `ARGV[1]` token, `ARGV[2]` lease in ms. Returns `{1, 0}` or `{0, ms}`
/// (how long the writer holds it or, with a writer waiting, until its intent expires).
const READ_ACQUIRE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local writer = redis.call('PTTL', KEYS[1])
if writer ~= -2 then
  return {0, writer}
end
if redis.call('ZCARD', KEYS[3]) > 0 then
  local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
  return {0, tonumber(last[2]) - now}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return {1, 0}
";
pub(crate) static READ_ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(READ_ACQUIRE_LUA));

/// Write lock: granted when no writer and no live reader holds it; otherwise the writer's
/// intent is recorded (or renewed) so that new readers wait.
///
/// `KEYS[1]` writer lock, `KEYS[2]` readers, `KEYS[3]` writer intents, `KEYS[4]` fence
/// counter; `ARGV[1]` token, `ARGV[2]` lease in ms, `ARGV[3]` intent timeout in ms. Returns
/// `{1, fence}` or `{0, ms}` (until the writer's lease or the last reader's lease ends).
const WRITE_ACQUIRE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local writer = redis.call('PTTL', KEYS[1])
if writer == -2 and redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {1, redis.call('INCR', KEYS[4])}
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
if writer ~= -2 then
  return {0, writer}
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
return {0, tonumber(last[2]) - now}
";
pub(crate) static WRITE_ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(WRITE_ACQUIRE_LUA));

/// Writer leave: a writer that gives up withdraws its intent and wakes the readers it kept out.
///
/// `KEYS[1]` writer intents; `ARGV[1]` token, `ARGV[2]` channel. Returns 1 when it was there.
const WRITE_LEAVE_LUA: &str = r"
local was = redis.call('ZREM', KEYS[1], ARGV[1])
if was == 1 then
  redis.call('PUBLISH', ARGV[2], '1')
end
return was
";
pub(crate) static WRITE_LEAVE: LazyLock<Script> = LazyLock::new(|| Script::new(WRITE_LEAVE_LUA));

/// All scripts, for loading them when a connection is made.
pub(crate) fn all() -> Vec<&'static Script> {
    let scripts: Vec<&'static Script> = vec![
        &ACQUIRE,
        &RELEASE,
        &RELEASE_QUIET,
        &EXTEND,
        &RAISE,
        &REDLOCK_ACQUIRE,
        &REDLOCK_RELEASE,
        &REENTRANT_ACQUIRE,
        &REENTRANT_RELEASE,
        &REENTRANT_EXTEND,
        &PERMIT_ACQUIRE,
        &SHARED_RELEASE,
        &SHARED_EXTEND,
        &FAIR_ACQUIRE,
        &FAIR_RELEASE,
        &FAIR_LEAVE,
        &READ_ACQUIRE,
        &WRITE_ACQUIRE,
        &WRITE_LEAVE,
    ];
    scripts
}

/// Every script source, for the checks below.
#[cfg(test)]
fn sources() -> Vec<&'static str> {
    let sources = vec![
        ACQUIRE_LUA,
        RELEASE_LUA,
        RELEASE_QUIET_LUA,
        EXTEND_LUA,
        RAISE_LUA,
        REDLOCK_ACQUIRE_LUA,
        REDLOCK_RELEASE_LUA,
        REENTRANT_ACQUIRE_LUA,
        REENTRANT_RELEASE_LUA,
        REENTRANT_EXTEND_LUA,
        PERMIT_ACQUIRE_LUA,
        SHARED_RELEASE_LUA,
        SHARED_EXTEND_LUA,
        FAIR_ACQUIRE_LUA,
        FAIR_RELEASE_LUA,
        FAIR_LEAVE_LUA,
        READ_ACQUIRE_LUA,
        WRITE_ACQUIRE_LUA,
        WRITE_LEAVE_LUA,
    ];
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `redis.call('NAME'` in the script sources names a command listed in SCRIPT_COMMANDS,
    /// so that `command_count` never counts script-internal calls as client commands.
    #[test]
    fn scripts_only_call_listed_commands() {
        let mut seen = 0;
        for source in sources() {
            for part in source.split("redis.call('").skip(1) {
                let name = part.split('\'').next().unwrap_or("").to_ascii_lowercase();
                seen += 1;
                assert!(
                    SCRIPT_COMMANDS.contains(&name.as_str()),
                    "script command `{name}` missing from SCRIPT_COMMANDS"
                );
            }
        }
        assert!(seen >= 10, "found only {seen} script calls");
        // And the clients' own commands are not in the list.
        for client_command in ["set", "evalsha", "eval", "subscribe", "unsubscribe"] {
            assert!(!SCRIPT_COMMANDS.contains(&client_command));
        }
    }

    #[test]
    fn scripts_have_distinct_hashes() {
        let mut hashes: Vec<&str> = all().iter().map(|s| s.get_hash()).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), sources().len());
    }
}
