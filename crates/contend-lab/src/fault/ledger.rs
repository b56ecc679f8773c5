//! The workload's ledger, seen from both ends: what each client was told about its operations
//! ([`OpRecord`]), what the database holds at the end (how many times each operation id was
//! applied), and the accounting that compares the two ([`account`]): acknowledged, failed,
//! unknown, lost, duplicated. Also the recovery time after each injected fault
//! ([`recovery_after`]).
//!
//! Every operation has a unique id that its transaction writes into the ledger together with
//! its business effect, so "applied" is read from the final state, not assumed:
//! - lost: the client was told the operation succeeded, and the ledger has no trace of it;
//! - duplicated: the ledger holds the operation more than once (a retry applied it again);
//! - failed but applied: the client was told it definitely failed, and it was applied anyway.
//!
//! An operation whose answer never arrived (the connection broke, the server went away) is
//! unknown: it may or may not have been applied, and either is correct, as in Jepsen.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one attempt of an operation was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Committed: the client was told it succeeded.
    Ok,
    /// A business refusal (insufficient funds): definitely not applied.
    Refused,
    /// Definitely not applied, and worth trying again (no connection, a lock service down).
    Transient,
    /// Definitely not applied, not worth trying again (conflicts exhausted, a stale fencing
    /// token, a database error that rolled the transaction back).
    Rejected,
    /// No answer: the connection broke or the server went away while it ran. It may have been
    /// applied.
    Unknown,
}

/// What the client finally knows about one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Final {
    /// Told it succeeded (directly, or by finding its id in the ledger after a lost answer).
    Acknowledged,
    /// Told it definitely failed (refused or rejected), with no unresolved unknown attempt
    /// before.
    Failed,
    /// An attempt got no answer and the client could not find out before it gave up.
    Unknown,
}

/// One operation as its client saw it.
#[derive(Debug, Clone)]
pub struct OpRecord {
    /// The operation's unique id (written into the ledger by its transaction).
    pub id: u64,
    /// What the client finally knows.
    pub outcome: Final,
    /// Attempts that got no answer.
    pub no_answer: u32,
    /// When the acknowledged attempt started and ended (for recovery times).
    pub acked: Option<(Instant, Instant)>,
    /// When the client last heard about it: the end of its last attempt, or the ledger lookup
    /// that settled it (`None` when it was never tried).
    pub answered: Option<Instant>,
}

/// A client's view of one operation while it retries: fold the answers of its attempts in
/// order with [`Tracker::answer`] (and the result of looking its id up after a lost answer
/// with [`Tracker::looked_up`]), then take [`Tracker::finish`].
#[derive(Debug, Clone)]
pub struct Tracker {
    id: u64,
    /// An attempt got no answer and no lookup has settled it since.
    pending_unknown: bool,
    no_answer: u32,
    done: Option<Final>,
    acked: Option<(Instant, Instant)>,
    answered: Option<Instant>,
}

impl Tracker {
    /// A fresh operation with id `id`.
    pub fn new(id: u64) -> Self {
        Tracker {
            id,
            pending_unknown: false,
            no_answer: 0,
            done: None,
            acked: None,
            answered: None,
        }
    }

    /// Whether the client knows the final outcome (no further attempt is needed).
    pub fn settled(&self) -> bool {
        self.done.is_some()
    }

    /// Whether the last attempts left the outcome open (an answer was lost and not yet
    /// looked up).
    pub fn pending_unknown(&self) -> bool {
        self.pending_unknown
    }

    /// Records the answer of an attempt that ran from `started` to `ended`.
    pub fn answer(&mut self, answer: Answer, started: Instant, ended: Instant) {
        if self.done.is_some() {
            return;
        }
        self.answered = Some(ended);
        match answer {
            Answer::Ok => {
                self.done = Some(Final::Acknowledged);
                self.acked = Some((started, ended));
            }
            // A definite "no" settles the operation only if no earlier attempt is still in
            // doubt: that earlier attempt may have committed.
            Answer::Refused | Answer::Rejected if !self.pending_unknown => {
                self.done = Some(Final::Failed);
            }
            Answer::Refused | Answer::Rejected | Answer::Transient => {}
            Answer::Unknown => {
                self.no_answer += 1;
                self.pending_unknown = true;
            }
        }
    }

    /// Records the lookup of the operation's id in the ledger after a lost answer (`applied`:
    /// whether it was found), done at `at`. Found: acknowledged. Not found: the lost attempt
    /// did not commit, and the operation may be tried again.
    pub fn looked_up(&mut self, applied: bool, at: Instant) {
        if self.done.is_some() {
            return;
        }
        self.answered = Some(at);
        if applied {
            self.done = Some(Final::Acknowledged);
            self.acked = Some((at, at));
        }
        self.pending_unknown = false;
    }

    /// The client's final record; an operation given up while unsettled is failed when every
    /// attempt was definitely not applied, and unknown when one is still in doubt.
    pub fn finish(self) -> OpRecord {
        let outcome = match self.done {
            Some(f) => f,
            None if self.pending_unknown => Final::Unknown,
            None => Final::Failed,
        };
        OpRecord {
            id: self.id,
            outcome,
            no_answer: self.no_answer,
            acked: self.acked,
            answered: self.answered,
        }
    }
}

/// The accounting of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Operations the client was told succeeded.
    pub acknowledged: u64,
    /// Operations the client was told definitely failed.
    pub failed: u64,
    /// Operations whose outcome the client never learnt.
    pub unknown: u64,
    /// Attempts that got no answer (over all operations, resolved or not).
    pub no_answer: u64,
    /// Acknowledged operations absent from the ledger.
    pub lost: u64,
    /// Operations applied more than once.
    pub duplicated: u64,
    /// Operations the client was told definitely failed but which were applied.
    pub failed_but_applied: u64,
    /// Ids in the ledger that no client ever sent (should never happen).
    pub unexpected: u64,
    /// Unknown operations that were applied (correct either way; for the report).
    pub unknown_applied: u64,
}

/// What the final state says about one operation applied `times` times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Findings {
    /// Acknowledged, and absent from the ledger.
    pub lost: bool,
    /// Applied more than once.
    pub duplicated: bool,
    /// Reported definitely failed, and applied.
    pub failed_but_applied: bool,
}

/// The findings of the final state (`times`: how many times the ledger holds the operation)
/// against what the client of `r` was told.
pub fn findings(r: &OpRecord, times: u64) -> Findings {
    Findings {
        lost: r.outcome == Final::Acknowledged && times == 0,
        duplicated: times > 1,
        failed_but_applied: r.outcome == Final::Failed && times > 0,
    }
}

/// Compares the clients' `records` with `applied` (operation id -> times applied, from the
/// final state; ids never applied may be absent or 0).
pub fn account(records: &[OpRecord], applied: &HashMap<u64, u64>) -> Counts {
    let mut c = Counts::default();
    let mut sent = std::collections::HashSet::with_capacity(records.len());
    for r in records {
        sent.insert(r.id);
        let times = applied.get(&r.id).copied().unwrap_or(0);
        let found = findings(r, times);
        c.no_answer += u64::from(r.no_answer);
        match r.outcome {
            Final::Acknowledged => c.acknowledged += 1,
            Final::Failed => c.failed += 1,
            Final::Unknown => {
                c.unknown += 1;
                if times > 0 {
                    c.unknown_applied += 1;
                }
            }
        }
        c.lost += u64::from(found.lost);
        c.duplicated += u64::from(found.duplicated);
        c.failed_but_applied += u64::from(found.failed_but_applied);
    }
    c.unexpected = applied
        .iter()
        .filter(|(id, n)| **n > 0 && !sent.contains(id))
        .count() as u64;
    c
}

/// The recovery time after faults injected at `injections`: for each one, the time from it to
/// the end of the first acknowledged attempt that started at or after it; the longest of
/// these. `None` when there was no injection, or when after some injection no attempt
/// succeeded (the system did not recover within the run).
pub fn recovery_after(injections: &[Instant], acked: &[(Instant, Instant)]) -> Option<Duration> {
    let mut worst: Option<Duration> = None;
    for &t in injections {
        let first = acked
            .iter()
            .filter(|(start, _)| *start >= t)
            .map(|(_, end)| end.saturating_duration_since(t))
            .min()?;
        worst = Some(worst.map_or(first, |w| w.max(first)));
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn run(id: u64, answers: &[Answer], lookups: &[bool]) -> OpRecord {
        let base = Instant::now();
        let mut t = Tracker::new(id);
        let mut lookups = lookups.iter();
        for (i, a) in answers.iter().enumerate() {
            t.answer(*a, at(base, i as u64), at(base, i as u64 + 1));
            if *a == Answer::Unknown
                && let Some(found) = lookups.next()
            {
                t.looked_up(*found, at(base, i as u64 + 2));
            }
        }
        t.finish()
    }

    #[test]
    fn answers_fold_into_the_final_outcome() {
        use Answer::*;
        assert_eq!(run(1, &[Ok], &[]).outcome, Final::Acknowledged);
        assert_eq!(run(1, &[Refused], &[]).outcome, Final::Failed);
        assert_eq!(run(1, &[Transient, Ok], &[]).outcome, Final::Acknowledged);
        assert_eq!(run(1, &[Transient, Transient], &[]).outcome, Final::Failed);
        // An answer lost and never looked up: in doubt, whatever came after.
        assert_eq!(run(1, &[Unknown], &[]).outcome, Final::Unknown);
        assert_eq!(run(1, &[Unknown, Rejected], &[]).outcome, Final::Unknown);
        assert_eq!(run(1, &[Unknown, Transient], &[]).outcome, Final::Unknown);
        // Looked up and found: acknowledged (its answer was lost after the commit).
        let found = run(1, &[Unknown], &[true]);
        assert_eq!(found.outcome, Final::Acknowledged);
        assert_eq!(found.no_answer, 1);
        // Looked up, absent: the lost attempt did not commit; the retry decides.
        assert_eq!(
            run(1, &[Unknown, Ok], &[false]).outcome,
            Final::Acknowledged
        );
        assert_eq!(
            run(1, &[Unknown, Rejected], &[false]).outcome,
            Final::Failed
        );
        // Nothing after a settled answer changes it.
        assert_eq!(run(1, &[Ok, Unknown], &[]).outcome, Final::Acknowledged);
    }

    #[test]
    fn lost_duplicated_and_unknown_are_counted_from_the_final_state() {
        use Answer::*;
        let records = vec![
            run(1, &[Ok], &[]),               // applied once: fine
            run(2, &[Ok], &[]),               // acknowledged, absent: lost
            run(3, &[Ok], &[]),               // applied twice: duplicated
            run(4, &[Unknown], &[]),          // unknown, applied: fine
            run(5, &[Unknown], &[]),          // unknown, absent: fine
            run(6, &[Rejected], &[]),         // failed, absent: fine
            run(7, &[Refused], &[]),          // failed, applied: a broken promise
            run(8, &[Unknown], &[true]),      // found by the lookup: acknowledged
            run(9, &[Unknown, Ok], &[false]), // retried after a lookup: applied once
        ];
        let applied: HashMap<u64, u64> = [(1, 1), (3, 2), (4, 1), (7, 1), (8, 1), (9, 1), (42, 1)]
            .into_iter()
            .collect();
        let c = account(&records, &applied);
        assert_eq!(c.acknowledged, 5);
        assert_eq!(c.failed, 2);
        assert_eq!(c.unknown, 2);
        assert_eq!(c.lost, 1);
        assert_eq!(c.duplicated, 1);
        assert_eq!(c.failed_but_applied, 1);
        assert_eq!(c.unknown_applied, 1);
        assert_eq!(c.no_answer, 4);
        assert_eq!(c.unexpected, 1, "id 42 was never sent");
        // The same records against a ledger that holds everything exactly once: clean.
        let clean: HashMap<u64, u64> = [1, 2, 3, 8, 9].into_iter().map(|id| (id, 1)).collect();
        let c = account(&records, &clean);
        assert_eq!((c.lost, c.duplicated, c.failed_but_applied), (0, 0, 0));
    }

    #[test]
    fn recovery_is_the_longest_wait_for_a_success_after_an_injection() {
        let b = Instant::now();
        let acked = vec![
            (at(b, 0), at(b, 5)),
            (at(b, 100), at(b, 350)), // started after the first injection
            (at(b, 500), at(b, 520)), // after the second
        ];
        let r = recovery_after(&[at(b, 50), at(b, 400)], &acked).unwrap();
        assert_eq!(r, Duration::from_millis(300));
        // An attempt that started before the injection does not count as recovery.
        assert_eq!(recovery_after(&[at(b, 501)], &acked), None);
        assert_eq!(recovery_after(&[], &acked), None);
    }
}
