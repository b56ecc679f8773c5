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
    "pttl", "psetex", "incr", "incrby", "get", "del", "publish", "pexpire",
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

/// Raise (Redlock): while we still hold the lock on this node, raise its fence counter to at
/// least the token the quorum agreed on, so that any later quorum sees a larger counter.
///
/// `KEYS[1]` lock key, `KEYS[2]` fence counter key; `ARGV[1]` token, `ARGV[2]` fence value.
/// Returns 1 when the lock is still ours (counter raised if it was lower), 0 otherwise.
const RAISE_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local wanted = tonumber(ARGV[2])
if current < wanted then
  redis.call('INCRBY', KEYS[2], wanted - current)
end
return 1
";
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
