//! From traces to matrix cells: how each variant's prevention showed, and how the variants of
//! one anomaly combine into prevented, occurred or "prevented only for read-only".

use crate::catalog::Variant;
use crate::model::{CellResult, How, Outcome, VariantResult};
use crate::script::{Op, tx_name};
use crate::trace::{StepResult, Trace};

/// Judges one variant's trace.
///
/// A trace with an unexpected error or an unfinished statement cannot be judged (`occurred` is
/// `None`). Otherwise the variant's verdict function decides whether the anomaly occurred, and a
/// prevention is attributed, among the variant's key transactions, to an abort (serialization
/// failure or deadlock; a failed `COMMIT` only when the verdict depends on commits) first, then
/// to blocking (a statement that waited, even if the suite's lock timeout ended the wait), and
/// otherwise to the values read.
pub fn judge(variant: &Variant, trace: Trace) -> VariantResult {
    let broken = trace.broken_steps();
    if !broken.is_empty() {
        let what: Vec<String> = broken
            .iter()
            .map(|s| {
                let why = match &s.result {
                    StepResult::Failed(f) => format!("failed: {}", f.message),
                    _ => "never finished".to_string(),
                };
                format!(
                    "step {} ({}: {}) {why}",
                    s.index + 1,
                    tx_name(s.step.tx),
                    s.sql.clone().unwrap_or_else(|| s.step.op.to_string())
                )
            })
            .collect();
        return VariantResult {
            variant: variant.name,
            read_only: variant.read_only,
            occurred: None,
            how: None,
            detail: format!("could not be judged: {}", what.join("; ")),
            trace,
        };
    }
    let evaluation = (variant.evaluate)(&trace);
    let how = (!evaluation.occurred).then(|| prevention(&trace, variant));
    VariantResult {
        variant: variant.name,
        read_only: variant.read_only,
        occurred: Some(evaluation.occurred),
        how,
        detail: evaluation.detail,
        trace,
    }
}

fn prevention(trace: &Trace, variant: &Variant) -> How {
    let key_txs = &variant.key_txs;
    let aborted = trace.steps.iter().any(|s| {
        key_txs.contains(&s.step.tx)
            && (variant.judged_on_commit || s.step.op != Op::Commit)
            && matches!(&s.result, StepResult::Failed(f) if f.kind.is_abort())
    });
    let waited = key_txs
        .iter()
        .any(|t| trace.blocked(*t) || trace.failure(*t).is_some_and(|f| f.kind.is_wait_timeout()));
    if aborted {
        How::Abort
    } else if waited {
        How::Blocking
    } else {
        How::Values
    }
}

/// Combines the variants of one anomaly at one level into a matrix cell.
///
/// - any variant that could not be judged: [`Outcome::Error`];
/// - no variant occurred: [`Outcome::Prevented`], `how` the strongest mechanism seen (abort over
///   blocking over values);
/// - only variants with a writing observer occurred, and at least one read-only variant exists
///   and was prevented: [`Outcome::PreventedReadOnly`], `how` as the read-only variants';
/// - otherwise [`Outcome::Occurred`].
pub fn combine(
    level: contend::IsolationLevel,
    anomaly: crate::Anomaly,
    variants: Vec<VariantResult>,
) -> CellResult {
    let detail = variants
        .iter()
        .map(|v| {
            if variants.len() > 1 {
                format!("[{}] {}", v.variant, v.detail)
            } else {
                v.detail.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" | ");
    let strongest = |vs: &mut dyn Iterator<Item = &VariantResult>| vs.filter_map(|v| v.how).max();
    let (outcome, how) = if variants.iter().any(|v| v.occurred.is_none()) {
        (Outcome::Error, None)
    } else if variants.iter().all(|v| v.occurred == Some(false)) {
        (Outcome::Prevented, strongest(&mut variants.iter()))
    } else {
        let read_only: Vec<&VariantResult> = variants.iter().filter(|v| v.read_only).collect();
        let read_only_prevented =
            !read_only.is_empty() && read_only.iter().all(|v| v.occurred == Some(false));
        let only_writers_occurred = variants
            .iter()
            .filter(|v| v.occurred == Some(true))
            .all(|v| !v.read_only);
        if read_only_prevented && only_writers_occurred {
            (
                Outcome::PreventedReadOnly,
                strongest(&mut read_only.into_iter()),
            )
        } else {
            (Outcome::Occurred, None)
        }
    };
    CellResult {
        level,
        anomaly,
        outcome,
        how,
        detail,
        variants,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Anomaly;
    use contend::IsolationLevel;

    fn variant(read_only: bool, occurred: Option<bool>, how: Option<How>) -> VariantResult {
        VariantResult {
            variant: "v",
            read_only,
            occurred,
            how,
            detail: String::new(),
            trace: Trace {
                txs: 0,
                steps: Vec::new(),
                final_state: Default::default(),
            },
        }
    }

    fn outcome(vs: Vec<VariantResult>) -> (Outcome, Option<How>) {
        let cell = combine(IsolationLevel::RepeatableRead, Anomaly::GSingle, vs);
        (cell.outcome, cell.how)
    }

    #[test]
    fn combining_variants() {
        use How::*;
        assert_eq!(
            outcome(vec![
                variant(true, Some(false), Some(Values)),
                variant(false, Some(false), Some(Abort))
            ]),
            (Outcome::Prevented, Some(Abort))
        );
        assert_eq!(
            outcome(vec![
                variant(true, Some(false), Some(Values)),
                variant(false, Some(true), None)
            ]),
            (Outcome::PreventedReadOnly, Some(Values))
        );
        assert_eq!(
            outcome(vec![
                variant(true, Some(true), None),
                variant(false, Some(true), None)
            ]),
            (Outcome::Occurred, None)
        );
        assert_eq!(
            outcome(vec![variant(false, Some(true), None)]),
            (Outcome::Occurred, None)
        );
        assert_eq!(
            outcome(vec![
                variant(true, None, None),
                variant(false, Some(false), Some(Values))
            ]),
            (Outcome::Error, None)
        );
    }
}
