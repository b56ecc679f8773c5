//! Counting the commands clients send to Redis, from `INFO commandstats`, so that the lab can
//! report Redis commands per lock acquisition.

use std::time::Duration;

use contend::Result;
use futures_util::future::try_join_all;

use crate::node::{Node, Timeouts};
use crate::scripts::SCRIPT_COMMANDS;

/// The number of commands clients have sent to the servers at `urls`, summed over the servers,
/// since their statistics were last reset. Take it before and after a run; the difference is
/// what the run sent (plus whatever else used the same servers meanwhile).
///
/// Read from `INFO commandstats`: the sum of `calls` over all commands, less
/// - the commands Redis 7 also counts when a Lua script calls them (the lock scripts' internal
///   `GET`, `DEL`, `PUBLISH`, ... listed in [`crate::scripts::SCRIPT_COMMANDS`]), which were
///   not sent by a client: an `EVALSHA` counts once, as one round trip;
/// - `INFO` itself, the measuring command.
///
/// ```no_run
/// # async fn demo() -> contend::Result<()> {
/// let urls = ["redis://127.0.0.1:56379/0"];
/// let before = contend_redis::command_count(&urls).await?;
/// // ... run the load ...
/// let sent = contend_redis::command_count(&urls).await? - before;
/// # let _ = sent;
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`contend::Error::InvalidUrl`] for a bad URL; [`contend::Error::LockService`] when a server cannot
/// be reached within 1 s.
///
/// # Cancel safety
/// Safe: it only reads.
pub async fn command_count<S: AsRef<str>>(urls: &[S]) -> Result<u64> {
    let timeouts = Timeouts {
        connect: Duration::from_secs(1),
        response: Duration::from_secs(1),
    };
    let counts = try_join_all(urls.iter().map(|url| async move {
        let node = Node::connect_plain(url.as_ref(), timeouts).await?;
        let info: String = node
            .cmd(redis::cmd("INFO").arg("commandstats").clone())
            .await?;
        Ok::<u64, contend::Error>(client_calls(&info))
    }))
    .await?;
    Ok(counts.into_iter().sum())
}

/// Sums the `calls` of an `INFO commandstats` reply, leaving out script-internal commands and
/// `INFO`.
pub(crate) fn client_calls(info: &str) -> u64 {
    info.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let base = name.split('|').next().unwrap_or(name);
            if base == "info" || SCRIPT_COMMANDS.contains(&base) {
                return None;
            }
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            calls.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_client_calls_only() {
        let info = "# Commandstats\r\n\
            cmdstat_evalsha:calls=10,usec=100,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_set:calls=5,usec=5,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_pttl:calls=10,usec=5,usec_per_call=0.50,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_publish:calls=3,usec=5,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_client|setinfo:calls=2,usec=5,usec_per_call=2.50,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_info:calls=7,usec=5,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n";
        assert_eq!(client_calls(info), 10 + 5 + 2);
        assert_eq!(client_calls(""), 0);
    }
}
