//! Running seeds one after another, with panics caught and turned into reports.

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::Serialize;

use crate::options::Options;
use crate::report::{percentile, Outcome, Report};
use crate::sim::Simulation;

/// Runs one seed; a panic anywhere (simulator or replica) becomes `Err` with its message.
pub fn run_seed(options: Options) -> Result<Report, String> {
    catch_unwind(AssertUnwindSafe(|| Simulation::new(options).run())).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".to_owned())
    })
}

/// What a sweep of many seeds found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepSummary {
    pub seeds: u64,
    pub passed: u64,
    pub safety_violations: u64,
    pub liveness_violations: u64,
    pub crashes: u64,
    /// Replay commands of every failing seed, with the first violation or panic message.
    pub failures: Vec<(String, String)>,
    pub writes_acknowledged: u64,
    pub conflicts: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Convergence time after heals across the sweep, in simulated milliseconds.
    pub heals: u64,
    pub heals_converged: u64,
    pub convergence_p50_ms: Option<u64>,
    pub convergence_p90_ms: Option<u64>,
    pub convergence_p99_ms: Option<u64>,
    pub convergence_max_ms: Option<u64>,
    /// Time to converge after the final heal (liveness phase).
    pub final_convergence_p50_ms: Option<u64>,
    pub final_convergence_p99_ms: Option<u64>,
    pub final_convergence_max_ms: Option<u64>,
    /// Every convergence time after a heal, for merging sweeps run in chunks.
    pub convergence: Vec<u64>,
    /// Every convergence time after the final heal.
    pub finals: Vec<u64>,
}

impl SweepSummary {
    /// Adds one seed's result; [`Self::finish`] then computes the percentiles.
    pub fn add(&mut self, options: &Options, result: &Result<Report, String>) {
        self.seeds += 1;
        match result {
            Err(panic) => {
                self.crashes += 1;
                self.failures
                    .push((options.replay_command(), format!("panic: {panic}")));
            }
            Ok(report) => {
                match report.outcome {
                    Outcome::Pass => self.passed += 1,
                    Outcome::SafetyViolation => self.safety_violations += 1,
                    Outcome::LivenessViolation => self.liveness_violations += 1,
                    Outcome::Crash => self.crashes += 1,
                }
                if let Some(v) = report.violations.first() {
                    self.failures.push((
                        report.replay.clone(),
                        format!("{:?} at {} ms: {}", v.invariant, v.at_ms, v.detail),
                    ));
                }
                self.writes_acknowledged += report.writes_acknowledged;
                self.conflicts += report.conflicts;
                self.messages += report.messages;
                self.bytes += report.bytes;
                self.heals += report.heals.len() as u64;
                let times = report.convergence_times();
                self.heals_converged += times.len() as u64;
                self.convergence.extend(times);
                self.finals.extend(report.final_convergence_ms);
            }
        }
    }

    /// Computes the percentiles over every seed added so far (once, at the end: sorting a
    /// 10,000-seed sweep's million convergence times after every seed would dominate the sweep).
    pub fn finish(&mut self) {
        self.convergence_p50_ms = percentile(&self.convergence, 50.0);
        self.convergence_p90_ms = percentile(&self.convergence, 90.0);
        self.convergence_p99_ms = percentile(&self.convergence, 99.0);
        self.convergence_max_ms = self.convergence.iter().copied().max();
        self.final_convergence_p50_ms = percentile(&self.finals, 50.0);
        self.final_convergence_p99_ms = percentile(&self.finals, 99.0);
        self.final_convergence_max_ms = self.finals.iter().copied().max();
    }

    /// The worst outcome seen.
    pub fn worst(&self) -> Outcome {
        if self.crashes > 0 {
            Outcome::Crash
        } else if self.safety_violations > 0 {
            Outcome::SafetyViolation
        } else if self.liveness_violations > 0 {
            Outcome::LivenessViolation
        } else {
            Outcome::Pass
        }
    }
}
