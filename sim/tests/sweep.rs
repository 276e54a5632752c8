//! The CI sweep: 200 seeds, 40 per named scenario, each with a 30-second simulated safety phase
//! (kept short so the sweep fits in CI's budget in the dev profile), all with zero violations.
//! Longer sweeps run outside CI with the `bunting-sim` binary (see sim/README.md).

use bunting_sim::{run_seed, Options, Outcome, Scenario, SweepSummary};

const SEEDS_PER_SCENARIO: u64 = 40;
const SAFETY_PHASE_MS: u64 = 30_000;

fn sweep(scenario: Scenario, first_seed: u64) {
    let mut summary = SweepSummary::default();
    for seed in first_seed..first_seed + SEEDS_PER_SCENARIO {
        let mut options = Options::new(seed);
        options.scenario = scenario;
        options.duration_ms = SAFETY_PHASE_MS;
        let result = run_seed(options.clone());
        summary.add(&options, &result);
    }
    assert_eq!(summary.seeds, SEEDS_PER_SCENARIO);
    assert_eq!(
        summary.worst(),
        Outcome::Pass,
        "failing seeds:\n{}",
        summary
            .failures
            .iter()
            .map(|(cmd, why)| format!("{why}\n  replay: {cmd}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(summary.writes_acknowledged > 0, "the workload ran");
    assert_eq!(
        summary.finals.len() as u64,
        SEEDS_PER_SCENARIO,
        "every seed records when it converged after the final heal"
    );
}

#[test]
fn random_swarm_seeds_keep_every_invariant() {
    sweep(Scenario::Random, 0);
}

#[test]
fn region_split_seeds_keep_every_invariant() {
    sweep(Scenario::RegionSplit, 1_000);
}

#[test]
fn flapping_link_seeds_keep_every_invariant() {
    sweep(Scenario::FlappingLink, 2_000);
}

#[test]
fn rolling_crash_seeds_keep_every_invariant() {
    sweep(Scenario::RollingCrash, 3_000);
}

#[test]
fn asymmetric_partition_seeds_keep_every_invariant() {
    sweep(Scenario::Asymmetric, 4_000);
}
