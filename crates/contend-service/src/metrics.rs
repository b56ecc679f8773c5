//! Prometheus metrics, written by hand in the text exposition format: HTTP requests and latencies
//! by route and status, transaction attempts and conflicts, lock waits, waits for a database
//! session.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use contend::ConflictKind;
use contend::strategy::Strategy;

/// Latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

#[derive(Debug, Default)]
struct Data {
    requests: BTreeMap<(String, String, u16), Histogram>,
    attempts: BTreeMap<&'static str, (u64, u64)>,
    conflicts: BTreeMap<(&'static str, &'static str), u64>,
    lock_waits: BTreeMap<&'static str, Histogram>,
    session_waits: Histogram,
}

/// The service's metrics. Shared by all requests.
#[derive(Debug, Default)]
pub struct Metrics {
    data: Mutex<Data>,
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Data) -> R) -> R {
        f(&mut self.data.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Records one HTTP request.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.with(|d| {
            d.requests
                .entry((method.to_string(), route.to_string(), status))
                .or_default()
                .observe(elapsed.as_secs_f64())
        });
    }

    /// Records one transaction run: its attempts and the conflicts that made it retry.
    pub fn transaction(&self, strategy: Strategy, attempts: u32, conflicts: &[ConflictKind]) {
        self.with(|d| {
            let e = d.attempts.entry(strategy.as_str()).or_default();
            e.0 += 1;
            e.1 += u64::from(attempts);
            for kind in conflicts {
                *d.conflicts
                    .entry((strategy.as_str(), kind.as_str()))
                    .or_default() += 1;
            }
        });
    }

    /// Records time spent waiting for locks.
    pub fn lock_wait(&self, strategy: Strategy, waited: Duration) {
        self.with(|d| {
            d.lock_waits
                .entry(strategy.as_str())
                .or_default()
                .observe(waited.as_secs_f64())
        });
    }

    /// Records how long a request waited for a database session (only requests that found
    /// none free).
    pub fn session_wait(&self, waited: Duration) {
        self.with(|d| d.session_waits.observe(waited.as_secs_f64()));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let d = self.with(|d| {
            (
                d.requests.clone(),
                d.attempts.clone(),
                d.conflicts.clone(),
                d.lock_waits.clone(),
                d.session_waits.clone(),
            )
        });
        let (requests, attempts, conflicts, lock_waits, session_waits) = d;
        let mut out = String::new();
        out.push_str(
            "# HELP contend_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE contend_http_requests_total counter\n");
        for ((m, r, s), h) in &requests {
            let _ = writeln!(
                out,
                "contend_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{s}\"}} {}",
                label(m),
                label(r),
                h.count
            );
        }
        out.push_str("# HELP contend_http_request_duration_seconds HTTP request latency by method, route and status.\n");
        out.push_str("# TYPE contend_http_request_duration_seconds histogram\n");
        for ((m, r, s), h) in &requests {
            let labels = format!(
                "method=\"{}\",route=\"{}\",status=\"{s}\"",
                label(m),
                label(r)
            );
            write_histogram(
                &mut out,
                "contend_http_request_duration_seconds",
                &labels,
                h,
            );
        }
        out.push_str(
            "# HELP contend_tx_runs_total Transactions run (each possibly retried), by strategy.\n",
        );
        out.push_str("# TYPE contend_tx_runs_total counter\n");
        for (s, (runs, _)) in &attempts {
            let _ = writeln!(out, "contend_tx_runs_total{{strategy=\"{s}\"}} {runs}");
        }
        out.push_str("# HELP contend_tx_attempts_total Transaction attempts (first tries and retries), by strategy.\n");
        out.push_str("# TYPE contend_tx_attempts_total counter\n");
        for (s, (_, n)) in &attempts {
            let _ = writeln!(out, "contend_tx_attempts_total{{strategy=\"{s}\"}} {n}");
        }
        out.push_str(
            "# HELP contend_tx_conflicts_total Transaction conflicts by strategy and kind.\n",
        );
        out.push_str("# TYPE contend_tx_conflicts_total counter\n");
        for ((s, k), n) in &conflicts {
            let _ = writeln!(
                out,
                "contend_tx_conflicts_total{{strategy=\"{s}\",kind=\"{k}\"}} {n}"
            );
        }
        out.push_str("# HELP contend_lock_wait_seconds Time spent acquiring locks, by strategy.\n");
        out.push_str("# TYPE contend_lock_wait_seconds histogram\n");
        for (s, h) in &lock_waits {
            write_histogram(
                &mut out,
                "contend_lock_wait_seconds",
                &format!("strategy=\"{s}\""),
                h,
            );
        }
        out.push_str("# HELP contend_session_wait_seconds Time requests waited for a free database session.\n");
        out.push_str("# TYPE contend_session_wait_seconds histogram\n");
        write_histogram(&mut out, "contend_session_wait_seconds", "", &session_waits);
        out
    }
}

/// The `batched` strategy's counters ([`contend::batch::BatchStats`]) in the Prometheus text
/// exposition: how many operations each commit served, the largest batch, retries and splits.
pub fn render_batches(stats: &contend::batch::BatchStats) -> String {
    let mut out = String::new();
    let counters = [
        (
            "contend_batch_commits_total",
            "Transactions that committed a batch of the batched strategy.",
            stats.commits,
        ),
        (
            "contend_batch_operations_total",
            "Operations decided and answered by batches.",
            stats.operations,
        ),
        (
            "contend_batch_retries_total",
            "Batch attempts that failed before their commit and ran again.",
            stats.retries,
        ),
        (
            "contend_batch_splits_total",
            "Batches split into their operations after their attempts failed.",
            stats.splits,
        ),
        (
            "contend_batch_unknown_total",
            "Batches whose COMMIT failed with an unknown outcome.",
            stats.unknown,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP contend_batch_largest The most operations one committed batch held.\n\
         # TYPE contend_batch_largest gauge\ncontend_batch_largest {}",
        stats.largest
    );
    out
}

fn write_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    for (bound, count) in BUCKETS.iter().zip(h.counts) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_histograms() {
        let m = Metrics::default();
        m.request("POST", "/transfers", 201, Duration::from_millis(3));
        m.request("POST", "/transfers", 201, Duration::from_millis(30));
        m.transaction(
            Strategy::Optimistic,
            3,
            &[ConflictKind::Version, ConflictKind::Version],
        );
        let text = m.render();
        assert!(text.contains(
            "contend_http_requests_total{method=\"POST\",route=\"/transfers\",status=\"201\"} 2"
        ));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("contend_tx_attempts_total{strategy=\"optimistic\"} 3"));
        assert!(
            text.contains("contend_tx_conflicts_total{strategy=\"optimistic\",kind=\"version\"} 2")
        );
        m.session_wait(Duration::from_millis(2));
        let text = m.render();
        assert!(text.contains("contend_session_wait_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(text.contains("contend_session_wait_seconds_count 1"));
    }
}
