//! What a run found: counts, convergence times, and every invariant violation.

use serde::Serialize;

use crate::options::{Derived, Options};

/// Which invariant a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// An acknowledged write's change is missing from a node.
    Durability,
    /// Nodes with identical heads answer a probe differently.
    EvaluationAgreement,
    /// A live node refused a valid write, or did not acknowledge it in time.
    Availability,
    /// A node holds a change without a change it depends on.
    Causality,
    /// One actor used one sequence number for two different changes.
    ActorReuse,
    /// An honest peer's frame was refused.
    Protocol,
    /// Nodes did not reach identical heads within the bound after the final heal.
    Convergence,
}

impl Invariant {
    /// Whether breaking it is a liveness (rather than safety) failure.
    pub fn is_liveness(self) -> bool {
        self == Invariant::Convergence
    }
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub invariant: Invariant,
    /// Simulated time of detection, in milliseconds.
    pub at_ms: u64,
    pub detail: String,
}

/// The verdict of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Pass,
    SafetyViolation,
    LivenessViolation,
    /// The simulator or the system under test panicked.
    Crash,
}

impl Outcome {
    /// The process exit code for this outcome (tigerbeetle's VOPR tells them apart the same way).
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Pass => 0,
            Outcome::Crash => 10,
            Outcome::SafetyViolation => 11,
            Outcome::LivenessViolation => 12,
        }
    }

    /// How bad it is, to pick the worst of a sweep.
    pub fn severity(self) -> u8 {
        match self {
            Outcome::Pass => 0,
            Outcome::LivenessViolation => 1,
            Outcome::SafetyViolation => 2,
            Outcome::Crash => 3,
        }
    }
}

/// One heal (partition end, restart, final heal) and how long the cluster took to take in
/// everything that existed anywhere at that moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Heal {
    pub at_ms: u64,
    pub what: String,
    /// Milliseconds until every live node held every change that existed at the heal; `None` if
    /// the safety phase ended first (new faults may have cut the cluster again).
    pub converged_after_ms: Option<u64>,
}

/// What the plot draws: one seed's timeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// Node names, in row order (grouped by region).
    pub nodes: Vec<String>,
    pub regions: Vec<usize>,
    /// (label, start, end, nodes affected)
    pub partitions: Vec<(String, u64, u64, Vec<usize>)>,
    /// (node, down at, up at)
    pub crashes: Vec<(usize, u64, u64)>,
    /// (node, at, acknowledged)
    pub writes: Vec<(usize, u64, bool)>,
    /// (node, heal index, converged at)
    pub converged: Vec<(usize, usize, u64)>,
    pub liveness_at: u64,
    pub end_at: u64,
}

/// Everything one run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub options: Options,
    pub derived: Derived,
    pub outcome: Outcome,
    pub violations: Vec<Violation>,
    /// Writes the workload attempted, accepted, saw acknowledged, saw refused as invalid.
    pub writes_attempted: u64,
    pub writes_accepted: u64,
    pub writes_acknowledged: u64,
    pub writes_refused: u64,
    /// Bursts of concurrent writes to one field from several regions.
    pub concurrent_bursts: u64,
    /// Conflicted keys visible at the end (on the first node, all flag sets).
    pub conflicts: u64,
    pub evaluations: u64,
    pub messages: u64,
    pub bytes: u64,
    pub messages_lost: u64,
    pub messages_duplicated: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub heals: Vec<Heal>,
    /// Milliseconds from the start of the liveness phase to identical heads everywhere.
    pub final_convergence_ms: Option<u64>,
    /// Simulated milliseconds the run covered.
    pub simulated_ms: u64,
    /// Hash of everything that happened, in order: equal hashes mean identical runs.
    pub trace_hash: String,
    /// The command that replays this run.
    pub replay: String,
    #[serde(skip)]
    pub timeline: Timeline,
}

impl Report {
    /// Convergence times after heals that converged, in milliseconds.
    pub fn convergence_times(&self) -> Vec<u64> {
        self.heals
            .iter()
            .filter_map(|h| h.converged_after_ms)
            .collect()
    }
}

/// The `p`-th percentile (0–100) of `values`, nearest rank; `None` when empty.
pub fn percentile(values: &[u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn the_worst_outcome_has_the_highest_severity() {
        assert!(Outcome::Crash.severity() > Outcome::SafetyViolation.severity());
        assert!(Outcome::SafetyViolation.severity() > Outcome::LivenessViolation.severity());
        assert_ne!(
            Outcome::SafetyViolation.exit_code(),
            Outcome::LivenessViolation.exit_code()
        );
    }
}
