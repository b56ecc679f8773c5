//! The names and results of the suite: anomalies, outcomes, how a prevention showed, and the
//! report (matrix cells with their details) in the JSON shape other tools read.

use std::fmt;
use std::str::FromStr;

use contend::IsolationLevel;
use serde::{Serialize, Serializer};

use crate::trace::Trace;

/// An anomaly the suite tests (names from Adya's thesis, as in Hermitage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Anomaly {
    /// Write cycles: dirty writes.
    G0,
    /// Aborted reads.
    G1a,
    /// Intermediate reads.
    G1b,
    /// Circular information flow.
    G1c,
    /// Observed transaction vanishes.
    Otv,
    /// Predicate-many-preceders.
    Pmp,
    /// Lost update.
    P4,
    /// Single anti-dependency cycle: read skew.
    GSingle,
    /// Item anti-dependency cycles: write skew.
    G2Item,
    /// Anti-dependency cycles with predicates.
    G2,
}

impl Anomaly {
    /// Every anomaly, in the matrix's column order.
    pub const ALL: [Anomaly; 10] = [
        Anomaly::G0,
        Anomaly::G1a,
        Anomaly::G1b,
        Anomaly::G1c,
        Anomaly::Otv,
        Anomaly::Pmp,
        Anomaly::P4,
        Anomaly::GSingle,
        Anomaly::G2Item,
        Anomaly::G2,
    ];

    /// The name used in the matrix and JSON: `G0`, `G1a`, ..., `G-single`, `G2-item`, `G2`.
    pub fn name(self) -> &'static str {
        match self {
            Anomaly::G0 => "G0",
            Anomaly::G1a => "G1a",
            Anomaly::G1b => "G1b",
            Anomaly::G1c => "G1c",
            Anomaly::Otv => "OTV",
            Anomaly::Pmp => "PMP",
            Anomaly::P4 => "P4",
            Anomaly::GSingle => "G-single",
            Anomaly::G2Item => "G2-item",
            Anomaly::G2 => "G2",
        }
    }

    /// A short description: `dirty write`, `lost update`, ...
    pub fn title(self) -> &'static str {
        match self {
            Anomaly::G0 => "write cycle (dirty write)",
            Anomaly::G1a => "aborted read",
            Anomaly::G1b => "intermediate read",
            Anomaly::G1c => "circular information flow",
            Anomaly::Otv => "observed transaction vanishes",
            Anomaly::Pmp => "predicate-many-preceders",
            Anomaly::P4 => "lost update",
            Anomaly::GSingle => "read skew (single anti-dependency cycle)",
            Anomaly::G2Item => "write skew (item anti-dependency cycle)",
            Anomaly::G2 => "anti-dependency cycle with predicates",
        }
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Anomaly {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The error of parsing an unknown anomaly name.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown anomaly `{0}` (expected G0, G1a, G1b, G1c, OTV, PMP, P4, G-single, G2-item or G2)"
)]
pub struct UnknownAnomaly(pub String);

impl FromStr for Anomaly {
    type Err = UnknownAnomaly;

    /// Case-insensitive; `-`, `_` and spaces are ignored (`g_single`, `G2 item`).
    ///
    /// ```
    /// use contend_anomalies::Anomaly;
    /// assert_eq!("g-single".parse::<Anomaly>().unwrap(), Anomaly::GSingle);
    /// assert_eq!("G2_ITEM".parse::<Anomaly>().unwrap(), Anomaly::G2Item);
    /// assert!("G3".parse::<Anomaly>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm: String = s
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        Anomaly::ALL
            .into_iter()
            .find(|a| a.name().replace('-', "").to_ascii_lowercase() == norm)
            .ok_or_else(|| UnknownAnomaly(s.to_string()))
    }
}

/// What the run showed for one anomaly at one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// No variant of the test showed the anomaly.
    Prevented,
    /// A variant showed it.
    Occurred,
    /// The read-only variants were prevented, but a variant with a writing transaction showed it.
    PreventedReadOnly,
    /// The test could not be run or interpreted (an unexpected error, a statement that never
    /// finished); the detail says what happened. The exit status is then 2.
    Error,
}

/// How a prevention showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    /// Every transaction ran without waiting or failing, and the values read show no anomaly.
    Values,
    /// A statement waited for another transaction's lock, and the values then show no anomaly.
    Blocking,
    /// The database aborted a transaction (serialization failure, deadlock victim).
    Abort,
}

/// Which `BEGIN` SQLite transactions use. SQLite has no isolation levels; this is the choice
/// that matters there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SqliteBegin {
    /// As `contend` does it: `BEGIN IMMEDIATE` (database write lock from the start) for
    /// transactions that write; `PRAGMA query_only = ON; BEGIN DEFERRED` for read-only ones.
    #[default]
    Immediate,
    /// `BEGIN DEFERRED` (SQLite's plain `BEGIN`) for every transaction: locks are taken when the
    /// first read and the first write need them.
    Deferred,
}

/// One variant of an anomaly's test as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    /// The variant's name (`read-only`, `write predicate`, ...).
    pub variant: &'static str,
    /// Whether the transaction that would observe the anomaly only reads.
    pub read_only: bool,
    /// Did the anomaly occur? `None` when the run could not be interpreted.
    pub occurred: Option<bool>,
    /// How it was prevented, when it was.
    pub how: Option<How>,
    /// What the observation was, in words (or what went wrong).
    pub detail: String,
    /// Everything the run observed.
    pub trace: Trace,
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    /// The level requested.
    #[serde(serialize_with = "serialize_level")]
    pub level: IsolationLevel,
    /// The anomaly.
    pub anomaly: Anomaly,
    /// What the run showed.
    pub outcome: Outcome,
    /// How the prevention showed (`null` when the anomaly occurred).
    pub how: Option<How>,
    /// The observation behind the outcome, one sentence per variant.
    pub detail: String,
    /// Every variant with its trace (for `--explain`; not in the JSON results).
    #[serde(skip)]
    pub variants: Vec<VariantResult>,
}

fn serialize_level<S: Serializer>(level: &IsolationLevel, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(level.as_str())
}

fn serialize_opt_level<S: Serializer>(
    level: &Option<IsolationLevel>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match level {
        Some(level) => s.serialize_str(level.as_str()),
        None => s.serialize_none(),
    }
}

/// A note about a level on this backend (what it really runs as), or about the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct LevelNote {
    /// The level, or `None` for a note about the whole run.
    #[serde(serialize_with = "serialize_opt_level")]
    pub level: Option<IsolationLevel>,
    /// The note.
    pub note: String,
}

/// The suite's report.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    /// `postgres`, `mysql` or `sqlite`.
    pub backend: &'static str,
    /// The server's version string.
    pub server_version: String,
    /// Notes about levels the backend does not really offer, and about the run.
    pub notes: Vec<LevelNote>,
    /// One entry per level and anomaly.
    pub results: Vec<CellResult>,
}

impl SuiteReport {
    /// The cell for `level` and `anomaly`, if it was run.
    pub fn cell(&self, level: IsolationLevel, anomaly: Anomaly) -> Option<&CellResult> {
        self.results
            .iter()
            .find(|c| c.level == level && c.anomaly == anomaly)
    }

    /// Whether any cell is an [`Outcome::Error`].
    pub fn has_errors(&self) -> bool {
        self.results.iter().any(|c| c.outcome == Outcome::Error)
    }
}
