//! Scenario stories (partition, write, heal, expect), determinism, and the planted-bug tests that
//! show the simulator can fail. The CI sweep of many seeds lives in tests/sweep.rs.

use bunting_replica::WriteCommand;

use crate::workload::random_flag;
use crate::*;

use rand::SeedableRng;

const SET: &str = "production";

fn manual(seed: u64) -> Simulation {
    let mut options = Options::new(seed);
    options.manual = true;
    options.liveness_bound_ms = 60_000;
    Simulation::new(options)
}

fn a_flag(seed: u64) -> bunting_model::Flag {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    random_flag(&mut rng)
}

fn put(key: &str, seed: u64) -> WriteCommand {
    WriteCommand::PutFlag {
        key: key.to_owned(),
        flag: a_flag(seed),
    }
}

#[test]
fn partitioned_region_keeps_accepting_writes_and_converges_after_heal() {
    let mut sim = manual(1);
    sim.run_for(2_000);
    let cut = sim.isolate_region(0);
    sim.run_for(15_000); // long enough for the idle timeout to drop the cut links
    assert!(
        sim.write(0, SET, put("cut-off", 1)),
        "isolated node refused a write"
    );
    assert!(
        sim.write(5, SET, put("mainland", 2)),
        "majority node refused a write"
    );
    sim.run_for(2_000);
    assert_eq!(
        sim.acknowledged_writes(),
        2,
        "writes are acknowledged during the partition"
    );
    assert!(
        sim.flag(0, SET, "mainland").is_none(),
        "the partition let a change through"
    );
    assert!(
        sim.flag(5, SET, "cut-off").is_none(),
        "the partition let a change through"
    );
    sim.heal(cut);
    sim.run_for(60_000);
    assert!(sim.converged(), "not converged a minute after the heal");
    for n in 0..sim.node_count() {
        assert!(sim.flag(n, SET, "cut-off").is_some());
        assert!(sim.flag(n, SET, "mainland").is_some());
    }
    let report = sim.finish();
    assert_eq!(report.outcome, Outcome::Pass, "{:?}", report.violations);
    assert!(report.heals.iter().any(|h| h.converged_after_ms.is_some()));
}

#[test]
fn concurrent_writes_to_one_field_converge_to_one_winner_everywhere() {
    let mut sim = manual(2);
    assert!(sim.write(0, SET, put("kill-switch", 3)));
    sim.run_for(20_000);
    let cut = sim.isolate_region(2);
    sim.run_for(15_000);
    for (node, note) in [(1, "from region 0"), (7, "from region 2")] {
        let set = WriteCommand::SetFlagMetadata {
            key: "kill-switch".into(),
            name: "note".into(),
            value: Some(serde_json::json!(note)),
        };
        assert!(sim.write(node, SET, set));
    }
    sim.run_for(1_000);
    sim.heal(cut);
    sim.run_for(60_000);
    assert!(sim.converged());
    let winner = sim
        .flag(0, SET, "kill-switch")
        .and_then(|f| f.metadata.get("note").cloned());
    assert!(winner.is_some());
    for n in 0..sim.node_count() {
        let note = sim
            .flag(n, SET, "kill-switch")
            .and_then(|f| f.metadata.get("note").cloned());
        assert_eq!(note, winner);
    }
    let report = sim.finish();
    assert_eq!(report.outcome, Outcome::Pass, "{:?}", report.violations);
    assert!(
        report.conflicts >= 1,
        "the concurrent writes are a visible conflict"
    );
}

#[test]
fn crashed_node_keeps_its_acknowledged_writes() {
    let mut sim = manual(3);
    assert!(sim.write(4, SET, put("durable", 4)));
    sim.run_for(1_000); // persisted and acknowledged
    assert_eq!(sim.acknowledged_writes(), 1);
    // Cut the node off first, so only its disk can bring the write back.
    let cut = sim.isolate_region(1);
    assert!(sim.write(4, SET, put("also-durable", 5)));
    sim.run_for(1_000);
    sim.crash(4);
    sim.run_for(5_000);
    sim.restart(4);
    assert!(sim.flag(4, SET, "durable").is_some());
    assert!(sim.flag(4, SET, "also-durable").is_some());
    sim.heal(cut);
    let report = sim.finish();
    assert_eq!(report.outcome, Outcome::Pass, "{:?}", report.violations);
}

#[test]
fn one_way_partition_heals_and_converges() {
    let mut sim = manual(4);
    let deaf = sim.block_one_way(0, 1);
    assert!(sim.write(0, SET, put("one-way", 6)));
    assert!(sim.write(1, SET, put("other-way", 7)));
    sim.run_for(30_000);
    // Changes travel around the cut through the other nodes.
    assert!(sim.flag(1, SET, "one-way").is_some());
    sim.heal(deaf);
    let report = sim.finish();
    assert_eq!(report.outcome, Outcome::Pass, "{:?}", report.violations);
    assert!(report.final_convergence_ms.is_some());
}

fn short(seed: u64, scenario: Scenario, duration_ms: u64) -> Options {
    let mut options = Options::new(seed);
    options.scenario = scenario;
    options.duration_ms = duration_ms;
    options
}

#[test]
fn the_same_seed_replays_the_same_run_and_another_seed_differs() {
    let a = Simulation::new(short(11, Scenario::Random, 30_000)).run();
    let b = Simulation::new(short(11, Scenario::Random, 30_000)).run();
    let c = Simulation::new(short(12, Scenario::Random, 30_000)).run();
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.messages, b.messages);
    assert_eq!(a.writes_acknowledged, b.writes_acknowledged);
    assert_ne!(a.trace_hash, c.trace_hash);
    assert!(
        a.messages > 0 && a.writes_attempted > 0,
        "the run did something"
    );
}

#[test]
fn a_failing_report_carries_the_command_that_replays_it() {
    let mut options = short(5, Scenario::RollingCrash, 30_000);
    options.planted = vec![PlantedBug::SkipAntiEntropy];
    options.rates.loss = Some(0.25);
    let replay = options.replay_command();
    assert!(replay.contains("--seed 5"));
    assert!(replay.contains("--scenario rolling-crash"));
    assert!(replay.contains("--loss 0.25"));
    assert!(replay.contains("--planted skip-anti-entropy"));
}

/// Runs seeds until one reports a violation with `bug` planted; returns the failing report.
fn find_violation(bug: PlantedBug, configure: impl Fn(u64) -> Options) -> Report {
    for seed in 0..60 {
        let mut options = configure(seed);
        options.planted = vec![bug];
        options.liveness_bound_ms = 30_000;
        let report = Simulation::new(options).run();
        if report.outcome != Outcome::Pass {
            assert!(report.replay.contains(bug.name()), "{}", report.replay);
            assert!(report.replay.contains(&format!("--seed {seed} ")));
            assert!(!report.violations.is_empty());
            return report;
        }
    }
    panic!("no seed caught the planted bug {}", bug.name());
}

#[test]
fn planted_ack_before_persist_is_caught_as_a_lost_write() {
    let report = find_violation(PlantedBug::AckBeforePersist, |seed| {
        short(seed, Scenario::RollingCrash, 60_000)
    });
    assert_eq!(report.outcome, Outcome::SafetyViolation);
    assert!(report
        .violations
        .iter()
        .any(|v| v.invariant == Invariant::Durability));
}

#[test]
fn planted_send_before_persist_with_actor_reuse_is_caught() {
    let report = find_violation(PlantedBug::SendBeforePersistReuseActor, |seed| {
        // Many writes, so a restarted node soon writes again with its reused actor id.
        let mut o = short(seed, Scenario::RollingCrash, 120_000);
        o.rates.writes_per_minute = Some(90.0);
        o
    });
    assert_ne!(report.outcome, Outcome::Pass);
}

#[test]
fn planted_dropped_sync_message_without_retry_is_caught() {
    let report = find_violation(PlantedBug::DropSyncWithoutRetry, |seed| {
        let mut o = short(seed, Scenario::Asymmetric, 20_000);
        o.rates.partitions_per_hour = Some(0.0);
        o.rates.loss = Some(0.0);
        o
    });
    assert_eq!(report.outcome, Outcome::LivenessViolation);
}

#[test]
fn planted_skipped_anti_entropy_is_caught() {
    let report = find_violation(PlantedBug::SkipAntiEntropy, |seed| {
        let mut o = short(seed, Scenario::Asymmetric, 30_000);
        o.rates.partitions_per_hour = Some(0.0);
        o.rates.loss = Some(0.3);
        o
    });
    assert_eq!(report.outcome, Outcome::LivenessViolation);
}

#[test]
fn the_timeline_plot_is_an_svg_with_a_row_per_node() {
    let report = Simulation::new(short(21, Scenario::RegionSplit, 60_000)).run();
    let svg = timeline_svg(&report.timeline, "seed 21");
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    for name in &report.timeline.nodes {
        assert!(svg.contains(&format!(">{name}<")));
    }
}
