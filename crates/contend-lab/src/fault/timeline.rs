//! One run over time, for the fault suite's page (`contend faults --html FILE`): acknowledged
//! operations per time bucket, so that the dip at an injection and the recovery after it
//! show; when the fault was injected; and when the operations the final state convicts (lost,
//! duplicated, failed but applied) were answered. Times are seconds since the phase's load
//! started, the same origin for every strategy of the phase.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::ledger::{self, OpRecord};

/// One run over time (the `timeline` object of a run in the JSON document).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// The width of one bucket in seconds ([`bucket_width`]).
    pub bucket_s: f64,
    /// Seconds of load: no operation started after this (an operation in hand may still be
    /// retried, so buckets can go on after it).
    pub load_s: f64,
    /// Acknowledged operations per bucket, by when the client learnt it (the end of the attempt
    /// that committed, or the ledger lookup that found it): bucket `i` covers
    /// `[i * bucket_s, (i + 1) * bucket_s)`.
    pub acked: Vec<u64>,
    /// When each injection hit (the same for every run of the phase).
    pub injections_s: Vec<f64>,
    /// When each lost operation was acknowledged.
    pub lost_s: Vec<f64>,
    /// When each operation applied more than once got its last answer.
    pub duplicated_s: Vec<f64>,
    /// When each operation reported failed, but applied, got its last answer.
    pub failed_applied_s: Vec<f64>,
}

/// The bucket width for a load of `load`: 100 ms up to 20 s of load, else a 1-2-5 step that
/// keeps the load within about 200 buckets.
pub fn bucket_width(load: Duration) -> Duration {
    let ms = load.as_secs_f64() * 1000.0 / 200.0;
    if ms <= 100.0 {
        Duration::from_millis(100)
    } else {
        Duration::from_secs_f64(crate::html::nice_step(ms) / 1000.0)
    }
}

/// Seconds from `start` to `t` (0 for a moment before it), to the millisecond.
fn since(start: Instant, t: Instant) -> f64 {
    (t.saturating_duration_since(start).as_secs_f64() * 1000.0).round() / 1000.0
}

impl Timeline {
    /// The timeline of one run whose load started at `start` and lasted `load`: `records` are
    /// its clients' operations, `applied` how many times the final state holds each id (as for
    /// [`ledger::account`]), `injected` the phase's injections.
    pub fn build(
        start: Instant,
        load: Duration,
        records: &[OpRecord],
        applied: &HashMap<u64, u64>,
        injected: &[Instant],
    ) -> Timeline {
        let width = bucket_width(load);
        let bucket_s = width.as_secs_f64();
        let mut t = Timeline {
            bucket_s,
            load_s: load.as_secs_f64(),
            injections_s: injected.iter().map(|&i| since(start, i)).collect(),
            ..Timeline::default()
        };
        // At least the load's buckets, more when acknowledgements came after it.
        let load_buckets = (load.as_secs_f64() / bucket_s).ceil() as usize;
        let mut acked = vec![0u64; load_buckets.max(1)];
        for r in records {
            if let Some((_, end)) = r.acked {
                let i = (end.saturating_duration_since(start).as_secs_f64() / bucket_s) as usize;
                if i >= acked.len() {
                    acked.resize(i + 1, 0);
                }
                acked[i] += 1;
            }
            let found = ledger::findings(r, applied.get(&r.id).copied().unwrap_or(0));
            let acked_at = r.acked.map(|(_, end)| end).or(r.answered);
            let answered = r.answered.or(acked_at);
            if found.lost
                && let Some(at) = acked_at
            {
                t.lost_s.push(since(start, at));
            }
            if found.duplicated
                && let Some(at) = answered
            {
                t.duplicated_s.push(since(start, at));
            }
            if found.failed_but_applied
                && let Some(at) = answered
            {
                t.failed_applied_s.push(since(start, at));
            }
        }
        for v in [&mut t.lost_s, &mut t.duplicated_s, &mut t.failed_applied_s] {
            v.sort_by(f64::total_cmp);
        }
        t.acked = acked;
        t
    }

    /// Seconds the buckets cover.
    pub fn span_s(&self) -> f64 {
        self.acked.len() as f64 * self.bucket_s
    }

    /// Acknowledged operations per second in each bucket.
    pub fn rates(&self) -> impl Iterator<Item = f64> + '_ {
        self.acked.iter().map(|&n| n as f64 / self.bucket_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::ledger::{Answer, Tracker};

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    /// An operation acknowledged by an attempt from `from` to `to` ms.
    fn ok(id: u64, base: Instant, from: u64, to: u64) -> OpRecord {
        let mut t = Tracker::new(id);
        t.answer(Answer::Ok, ms(base, from), ms(base, to));
        t.finish()
    }

    #[test]
    fn the_bucket_is_100_ms_for_short_loads_and_coarser_for_long_ones() {
        assert_eq!(
            bucket_width(Duration::from_secs(3)),
            Duration::from_millis(100)
        );
        assert_eq!(
            bucket_width(Duration::from_secs(20)),
            Duration::from_millis(100)
        );
        assert_eq!(
            bucket_width(Duration::from_secs(30)),
            Duration::from_millis(200)
        );
        assert_eq!(
            bucket_width(Duration::from_secs(60)),
            Duration::from_millis(500)
        );
        assert_eq!(
            bucket_width(Duration::from_secs(600)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn acknowledgements_fall_into_the_bucket_of_their_answer() {
        let b = Instant::now();
        let records = vec![
            ok(1, b, 0, 50),     // bucket 0
            ok(2, b, 20, 99),    // bucket 0 (99 ms)
            ok(3, b, 90, 100),   // bucket 1: by its end, not its start
            ok(4, b, 150, 290),  // bucket 2
            ok(5, b, 900, 1250), // after the 1 s load: bucket 12, the buckets grow
        ];
        let applied: HashMap<u64, u64> = (1..=5).map(|id| (id, 1)).collect();
        let t = Timeline::build(b, Duration::from_secs(1), &records, &applied, &[ms(b, 120)]);
        assert_eq!(t.bucket_s, 0.1);
        assert_eq!(t.load_s, 1.0);
        assert_eq!(t.acked.len(), 13);
        assert_eq!(&t.acked[..4], &[2, 1, 1, 0]);
        assert_eq!(t.acked[12], 1);
        assert_eq!(t.acked.iter().sum::<u64>(), 5);
        assert_eq!(t.injections_s, vec![0.12]);
        assert!((t.span_s() - 1.3).abs() < 1e-9);
        assert_eq!(t.rates().next(), Some(20.0));
        assert!(t.lost_s.is_empty() && t.duplicated_s.is_empty());
        // No operation at all: the load's buckets, empty.
        let empty = Timeline::build(b, Duration::from_secs(3), &[], &HashMap::new(), &[]);
        assert_eq!(empty.acked, vec![0; 30]);
    }

    #[test]
    fn lost_duplicated_and_failed_but_applied_are_placed_at_their_answers() {
        let b = Instant::now();
        let mut failed = Tracker::new(3);
        failed.answer(Answer::Rejected, ms(b, 400), ms(b, 420));
        let mut unknown = Tracker::new(4);
        unknown.answer(Answer::Unknown, ms(b, 500), ms(b, 640));
        let records = vec![
            ok(1, b, 100, 210), // acknowledged, absent: lost at 0.21
            ok(2, b, 300, 330), // applied twice: duplicated at 0.33
            failed.finish(),    // failed, applied: at 0.42
            unknown.finish(),   // unknown, applied twice: duplicated at 0.64
        ];
        let applied: HashMap<u64, u64> = [(2, 2), (3, 1), (4, 2)].into_iter().collect();
        let t = Timeline::build(b, Duration::from_secs(1), &records, &applied, &[]);
        assert_eq!(t.lost_s, vec![0.21]);
        assert_eq!(t.duplicated_s, vec![0.33, 0.64]);
        assert_eq!(t.failed_applied_s, vec![0.42]);
        // The same counts as the accounting.
        let c = ledger::account(&records, &applied);
        assert_eq!(
            (c.lost, c.duplicated, c.failed_but_applied),
            (1, 2, 1),
            "{c:?}"
        );
        // Acknowledged: only the lost and the duplicated one.
        assert_eq!(t.acked.iter().sum::<u64>(), 2);
    }
}
