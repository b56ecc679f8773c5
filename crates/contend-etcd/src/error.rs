//! What can go wrong talking to etcd, and how it reaches the caller: every failure becomes a
//! [`contend::Error::LockService`] carrying an [`EtcdError`] (or
//! [`contend::Error::LockNotAcquired`] when the wait ran out).

use std::time::Duration;

/// A failure of the etcd lock service, carried inside [`contend::Error::LockService`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// The cluster did not answer within the request budget: no member reachable, or no
    /// leader (fewer than a quorum of members up).
    #[error(
        "etcd unavailable: {what} got no answer within {waited_ms} ms ({last}); \
         is a quorum of the cluster's members up and reachable?"
    )]
    Unavailable {
        /// The request that failed.
        what: &'static str,
        /// How long it was tried.
        waited_ms: u64,
        /// The last error seen.
        last: String,
    },
    /// The cluster answered that it has no leader (no quorum) for the whole request budget.
    #[error(
        "etcd has no quorum: {what} was refused with \"no leader\" for {waited_ms} ms; \
         more than half of the cluster's members are down or cut off"
    )]
    NoQuorum {
        /// The request that failed.
        what: &'static str,
        /// How long it was tried.
        waited_ms: u64,
    },
    /// This client's lease expired (keepalive failing, or the process paused past the lease):
    /// every lock it held or waited for is gone.
    #[error("the etcd lease of this client expired: its locks are lost")]
    LeaseLost,
    /// Bad settings (URLs, lease, namespace).
    #[error("etcd lock settings: {0}")]
    Config(String),
    /// Any other error of etcd or of the client.
    #[error("etcd {what}: {source}")]
    Request {
        /// The request that failed.
        what: &'static str,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
}

impl From<EtcdError> for contend::Error {
    fn from(e: EtcdError) -> contend::Error {
        contend::Error::LockService(Box::new(e))
    }
}

/// How a failed request is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Try again (another member, or after an election), within the request budget.
    Retry,
    /// A member without a leader: try again, and say "no quorum" if it lasts.
    NoLeader,
    /// The lease named in the request does not exist any more.
    LeaseGone,
    /// Anything else: give up at once.
    Fatal,
}

/// Classifies an error of the etcd client.
pub(crate) fn classify(e: &etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => Failure::Retry,
        E::LeaseKeepAliveError(m) if m.contains("not found") => Failure::LeaseGone,
        E::LeaseKeepAliveError(_) | E::WatchError(_) => Failure::Retry,
        E::GRpcStatus(status) => {
            let message = status.message();
            if message.contains("no leader") {
                Failure::NoLeader
            } else if message.contains("lease not found") {
                Failure::LeaseGone
            } else {
                match status.code() as i32 {
                    tonic_code::UNAVAILABLE | tonic_code::DEADLINE_EXCEEDED => Failure::Retry,
                    // "etcdserver: request timed out", "leader changed", transport resets.
                    tonic_code::UNKNOWN | tonic_code::CANCELLED | tonic_code::ABORTED => {
                        Failure::Retry
                    }
                    _ => Failure::Fatal,
                }
            }
        }
        _ => Failure::Fatal,
    }
}

/// The gRPC status codes [`classify`] looks at (without a direct dependency on tonic).
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const ABORTED: i32 = 10;
    pub const UNAVAILABLE: i32 = 14;
}

/// Milliseconds of `d`, for messages.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
