//! Several nodes of one database behind one [`Db`]: the nodes of a MariaDB Galera cluster
//! (multi-primary, synchronous replication), spread over the way a load balancer would.
//!
//! [`Db::connect`] and [`Db::builder`] take one URL or a comma-separated list of the URLs of
//! the nodes of one cluster. The `Db` then holds one pool per node, and every acquisition
//! ([`Db::acquire`], each transaction, a [`crate::Session`]'s first statement) takes the next
//! node in turn (round robin per acquisition, as HAProxy's `roundrobin` does per connection).
//! A session keeps its node for as long as it keeps its connection, so the lab's workers are
//! spread over the nodes one by one. [`Db::pool`] is the first node's pool (schema setup,
//! reports).
//!
//! At connect, every MySQL/MariaDB node is asked whether it is a Galera node (`wsrep_on`,
//! `wsrep_ready`, `wsrep_cluster_size`, `wsrep_cluster_state_uuid`), and [`Db::cluster`] says
//! what was found ([`Cluster`]). Several URLs are accepted only for the nodes of one Galera
//! cluster: a list that mixes clusters, names a server that is not a ready Galera node, or
//! names PostgreSQL or SQLite servers is refused with an error that says which URL and why.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> contend::Result<()> {
//! use contend::Db;
//! use contend::nodes::Cluster;
//! let db = Db::connect(
//!     "mysql://app@10.0.0.1/app,mysql://app@10.0.0.2/app,mysql://app@10.0.0.3/app",
//! ).await?;
//! assert!(matches!(db.cluster(), Cluster::Galera { nodes: 3, .. }));
//! // Each transaction takes the next node; a conflict with another node's commit comes back
//! // as a `ConflictKind::Certification` conflict and is retried like a deadlock.
//! # Ok(()) }
//! ```
//!
//! # What changes on a Galera cluster
//! Row locks (`SELECT ... FOR UPDATE`), `GET_LOCK` and SERIALIZABLE's shared locks are taken
//! on the node that runs the transaction only. Between nodes, the only protection is
//! *certification* at `COMMIT`: of two transactions that wrote the same row (or unique key) on
//! different nodes, the one ordered second is aborted (by certification, or by a brute-force
//! abort of the local transaction when the other's write set is applied first) with error
//! `1213` / `40001`, which contend reports as [`crate::ConflictKind::Certification`] when it
//! happens at `COMMIT`. So:
//! - strategies whose safety comes from the rows they write (`atomic`, `optimistic`,
//!   `pessimistic`, `batched`) stay safe: what the node-local lock does not stop, certification
//!   aborts, and the executor retries it;
//! - `advisory` (`GET_LOCK`) is not a lock between nodes at all (two nodes grant the same lock
//!   at once), `serializable` orders transactions of one node only (certification checks
//!   what was written, not what was read, so write skew between nodes goes through), and
//!   `mutex` reads outside its write's transaction, on a node that may not have applied the
//!   previous holder's commit yet (measured: lost updates in every lab scenario at 64
//!   workers); the executor refuses the three on a Galera cluster
//!   ([`crate::strategy::Executor::check_db`]);
//! - a row lock on a row that does not exist yet (a gap lock guarding an insert) is node-local
//!   too, and certification sees two inserts of the same thing only through a primary or
//!   unique key: give such tables one;
//! - reads on one node may not yet show what another node committed a moment ago (replication
//!   is synchronous up to certification, applying is not). [`Db::catch_up`] waits until every
//!   node has applied what the cluster had committed when it was called.

use std::fmt;

use crate::backend::{Backend, ColumnKind, Database, redact_url};
#[cfg(doc)]
use crate::db::Db;
use crate::error::{Error, Result};
use crate::strategy::{Strategy, Value};

/// What a [`Db`] is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cluster {
    /// One server (or nodes contend does not know as a cluster).
    Single,
    /// Nodes of a MariaDB Galera cluster.
    Galera {
        /// How many of the cluster's nodes this `Db` spreads its connections over.
        nodes: usize,
        /// The cluster's size (`wsrep_cluster_size`) when the `Db` connected.
        size: u32,
    },
}

impl Cluster {
    /// Whether this is a Galera cluster (even a `Db` on one of its nodes).
    pub fn is_galera(&self) -> bool {
        matches!(self, Cluster::Galera { .. })
    }

    /// How many nodes the `Db` spreads its connections over (1 for [`Cluster::Single`]).
    pub fn nodes(&self) -> usize {
        match self {
            Cluster::Single => 1,
            Cluster::Galera { nodes, .. } => *nodes,
        }
    }
}

impl Cluster {
    /// Why `strategy` cannot be safe on this cluster, or `None` when it can (always `None` on
    /// one server). [`crate::strategy::Executor::check_db`] refuses these strategies.
    ///
    /// ```
    /// use contend::nodes::Cluster;
    /// use contend::strategy::Strategy;
    /// let galera = Cluster::Galera { nodes: 3, size: 3 };
    /// assert!(galera.unsafe_strategy(Strategy::Advisory).is_some());
    /// assert!(galera.unsafe_strategy(Strategy::Mutex).is_some());
    /// assert!(galera.unsafe_strategy(Strategy::Pessimistic).is_none());
    /// assert!(Cluster::Single.unsafe_strategy(Strategy::Advisory).is_none());
    /// ```
    pub fn unsafe_strategy(&self, strategy: Strategy) -> Option<&'static str> {
        if !self.is_galera() {
            return None;
        }
        match strategy {
            Strategy::Advisory => Some(
                "GET_LOCK is local to the node that grants it, so two nodes grant the same lock \
                 at once and it excludes nothing between them",
            ),
            Strategy::Mutex => Some(
                "the in-process lock orders the operations, but `mutex` reads outside the write's \
                 transaction, and a node may not yet have applied the previous holder's commit \
                 (Galera applies after certification, asynchronously): the read is stale and the \
                 write, in a later transaction, is certified against a snapshot that already \
                 includes that commit, so the lost update goes through",
            ),
            Strategy::Serializable => Some(
                "SERIALIZABLE orders the transactions of one node only; certification checks \
                 what transactions wrote, not what they read, so write skew between nodes \
                 goes through",
            ),
            _ => None,
        }
    }
}

impl fmt::Display for Cluster {
    /// `one server`, or `a Galera cluster of 3 nodes (2 used)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cluster::Single => f.write_str("one server"),
            Cluster::Galera { nodes, size } if *nodes as u32 == *size => {
                write!(f, "a Galera cluster of {size} nodes")
            }
            Cluster::Galera { nodes, size } => {
                write!(f, "a Galera cluster of {size} nodes ({nodes} used)")
            }
        }
    }
}

/// Splits a comma-separated list of database URLs. A comma splits only where a new URL begins
/// (`scheme://` or `sqlite:` after it) or where an empty item is, so that commas inside a URL
/// (a query string, a password) stay where they are. Items are trimmed; empty items are
/// dropped.
///
/// ```
/// use contend::nodes::split_urls;
/// assert_eq!(
///     split_urls("mysql://root@n1/app, mysql://root@n2/app?x=a,b"),
///     vec!["mysql://root@n1/app", "mysql://root@n2/app?x=a,b"]
/// );
/// assert_eq!(split_urls("sqlite::memory:"), vec!["sqlite::memory:"]);
/// ```
pub fn split_urls(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut rest = list;
    while let Some(i) = rest.find(',') {
        let (head, tail) = rest.split_at(i);
        current.push_str(head);
        let tail = &tail[1..];
        let next = tail.trim_start();
        if next.is_empty() || next.starts_with(',') || starts_url(next) {
            out.push(std::mem::take(&mut current));
        } else {
            current.push(',');
        }
        rest = tail;
    }
    current.push_str(rest);
    out.push(current);
    out.into_iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Whether `s` begins with a URL scheme (`letters://`, or `sqlite:`).
fn starts_url(s: &str) -> bool {
    if s.to_ascii_lowercase().starts_with("sqlite:") {
        return true;
    }
    match s.split_once("://") {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// What one MySQL/MariaDB node said about itself at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeInfo {
    /// `wsrep_on` is `ON` (the server runs with a Galera provider).
    galera: bool,
    /// `wsrep_ready` is `ON` (the node accepts queries as part of a primary component).
    ready: bool,
    /// `wsrep_cluster_size`.
    size: u32,
    /// `wsrep_cluster_state_uuid`: the same on every node of one cluster.
    state_uuid: String,
}

/// The second column of the first row of `sql` (a `SHOW VARIABLES` / `SHOW STATUS` line), or
/// `None` when there is no such row (MySQL without Galera has no `wsrep_*` variables).
async fn show_value<DB: Database>(
    conn: &mut DB::Connection,
    sql: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row = DB::fetch_row(
        conn,
        Backend::MySql,
        sql,
        &[],
        &[ColumnKind::Text, ColumnKind::Text],
    )
    .await?;
    Ok(row.and_then(|mut r| match r.pop() {
        Some(Value::Text(v)) => Some(v),
        _ => None,
    }))
}

/// Asks a MySQL/MariaDB node whether it is a Galera node.
pub(crate) async fn probe<DB: Database>(
    conn: &mut DB::Connection,
) -> Result<NodeInfo, sqlx::Error> {
    let on = |v: Option<String>| v.is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1");
    let galera = on(show_value::<DB>(conn, "SHOW VARIABLES LIKE 'wsrep_on'").await?);
    if !galera {
        return Ok(NodeInfo {
            galera,
            ready: false,
            size: 0,
            state_uuid: String::new(),
        });
    }
    let ready = on(show_value::<DB>(conn, "SHOW STATUS LIKE 'wsrep_ready'").await?);
    let size = show_value::<DB>(conn, "SHOW STATUS LIKE 'wsrep_cluster_size'")
        .await?
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let state_uuid = show_value::<DB>(conn, "SHOW STATUS LIKE 'wsrep_cluster_state_uuid'")
        .await?
        .unwrap_or_default();
    Ok(NodeInfo {
        galera,
        ready,
        size,
        state_uuid,
    })
}

/// The cluster formed by nodes that answered `infos` (one per URL of `urls`, in order).
///
/// # Errors
/// [`Error::InvalidUrl`] naming the URL when several URLs are given and one is not a ready node
/// of the same Galera cluster as the first.
pub(crate) fn cluster_of(urls: &[String], infos: &[NodeInfo]) -> Result<Cluster> {
    let Some(first) = infos.first() else {
        return Ok(Cluster::Single);
    };
    if infos.len() == 1 {
        return Ok(if first.galera {
            Cluster::Galera {
                nodes: 1,
                size: first.size,
            }
        } else {
            Cluster::Single
        });
    }
    for (url, info) in urls.iter().zip(infos) {
        let reason = if !info.galera {
            Some("several URLs are accepted only for the nodes of one Galera cluster, and this server has wsrep_on = OFF".to_string())
        } else if !info.ready {
            Some("this Galera node is not ready (wsrep_ready = OFF: not part of a primary component)".to_string())
        } else if info.state_uuid != first.state_uuid {
            Some(format!(
                "this node belongs to another Galera cluster (wsrep_cluster_state_uuid {} where the first URL's is {})",
                info.state_uuid, first.state_uuid
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::InvalidUrl {
                url: redact_url(url),
                reason,
            });
        }
    }
    Ok(Cluster::Galera {
        nodes: infos.len(),
        size: infos.iter().map(|i| i.size).max().unwrap_or(0),
    })
}

/// Checks a list of node URLs before connecting: at least one, all of one backend, and several
/// only for MySQL/MariaDB (the Galera nodes are confirmed at connect). Returns the backend.
///
/// ```
/// use contend::{Backend, nodes::{check_urls, split_urls}};
/// assert_eq!(check_urls(&split_urls("mysql://h1/app,mysql://h2/app")).unwrap(), Backend::MySql);
/// assert!(check_urls(&split_urls("sqlite:a.db,sqlite:b.db")).is_err());
/// ```
///
/// # Errors
/// [`Error::InvalidUrl`] for an empty list, a URL of another backend than the first, or several
/// PostgreSQL or SQLite URLs.
pub fn check_urls(urls: &[String]) -> Result<Backend> {
    let Some(first) = urls.first() else {
        // No URL at all: the same error as any URL that names no backend.
        return Backend::from_url("");
    };
    let backend = Backend::from_url(first)?;
    for url in &urls[1..] {
        let other = Backend::from_url(url)?;
        if other != backend {
            return Err(Error::InvalidUrl {
                url: redact_url(url),
                reason: format!(
                    "the nodes of one database must be of one backend, and the first URL is {backend}"
                ),
            });
        }
    }
    if urls.len() > 1 && backend != Backend::MySql {
        return Err(Error::InvalidUrl {
            url: urls
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(","),
            reason: format!(
                "several URLs are accepted only for the nodes of a MariaDB Galera cluster, not for {backend}"
            ),
        });
    }
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(galera: bool, ready: bool, uuid: &str) -> NodeInfo {
        NodeInfo {
            galera,
            ready,
            size: 3,
            state_uuid: uuid.into(),
        }
    }

    #[test]
    fn splitting_keeps_commas_inside_urls() {
        assert_eq!(
            split_urls(" mysql://a:p,w@h1/app ,, mariadb://h2/app,"),
            vec!["mysql://a:p,w@h1/app", "mariadb://h2/app"]
        );
        assert_eq!(
            split_urls("postgres://h/app?options=a,b,sqlite:x.db"),
            vec!["postgres://h/app?options=a,b", "sqlite:x.db"]
        );
        assert!(split_urls(" , ").is_empty());
    }

    #[test]
    fn several_urls_must_be_one_galera_cluster() {
        let urls: Vec<String> = ["mysql://h1/a", "mysql://h2/a"].map(String::from).to_vec();
        assert_eq!(
            cluster_of(&urls, &[node(true, true, "u"), node(true, true, "u")]).unwrap(),
            Cluster::Galera { nodes: 2, size: 3 }
        );
        let e = cluster_of(&urls, &[node(true, true, "u"), node(true, true, "v")]).unwrap_err();
        assert!(
            e.to_string().contains("mysql://h2/a")
                && e.to_string().contains("another Galera cluster"),
            "{e}"
        );
        let e = cluster_of(&urls, &[node(true, true, "u"), node(false, false, "")]).unwrap_err();
        assert!(e.to_string().contains("wsrep_on = OFF"), "{e}");
        let e = cluster_of(&urls, &[node(true, true, "u"), node(true, false, "u")]).unwrap_err();
        assert!(e.to_string().contains("not ready"), "{e}");
        // One URL: whatever the server is.
        assert_eq!(
            cluster_of(&urls[..1], &[node(false, false, "")]).unwrap(),
            Cluster::Single
        );
        assert!(
            cluster_of(&urls[..1], &[node(true, true, "u")])
                .unwrap()
                .is_galera()
        );
    }

    #[test]
    fn url_lists_are_checked() {
        let list = |s: &str| split_urls(s);
        assert_eq!(
            check_urls(&list("mysql://h1/a,mariadb://h2/a")).unwrap(),
            Backend::MySql
        );
        let e = check_urls(&list("postgres://h1/a,postgres://h2/a")).unwrap_err();
        assert!(e.to_string().contains("Galera"), "{e}");
        let e = check_urls(&list("mysql://h1/a,postgres://h2/a")).unwrap_err();
        assert!(e.to_string().contains("one backend"), "{e}");
        assert!(check_urls(&[]).is_err());
        assert_eq!(
            Cluster::Galera { nodes: 3, size: 3 }.to_string(),
            "a Galera cluster of 3 nodes"
        );
    }
}
