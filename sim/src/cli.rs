//! The simulator's command line, shared by `bunting-sim` and `bunting sim`: run one seed or sweep
//! many, print what each seed derived, and exit with a code that tells a crash (10), a safety
//! violation (11) and a liveness violation (12) apart.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    run_seed, timeline_svg, Error, FaultRates, Options, Outcome, PlantedBug, Report, Scenario,
    Simulation, SweepSummary,
};

/// Deterministic simulation of a Bunting cluster under partitions, crashes and message loss.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Run this one seed.
    #[arg(long, env = "BUNTING_SIM_SEED", conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep the seeds A..B (B excluded), e.g. 0..1000.
    #[arg(long, env = "BUNTING_SIM_SEEDS")]
    seeds: Option<String>,
    #[arg(long, env = "BUNTING_SIM_REGIONS", default_value_t = 3)]
    regions: usize,
    #[arg(long, env = "BUNTING_SIM_NODES_PER_REGION", default_value_t = 3)]
    nodes_per_region: usize,
    /// Simulated length of the safety phase, e.g. 1h, 10m, 90s.
    #[arg(long, env = "BUNTING_SIM_DURATION", default_value = "1h")]
    duration: humantime::Duration,
    /// How long the cluster may take to converge after the final heal (simulated).
    #[arg(long, env = "BUNTING_SIM_LIVENESS_BOUND", default_value = "2m")]
    liveness_bound: humantime::Duration,
    /// Named fault schedule; with --seeds, `all` cycles through every scenario seed by seed.
    #[arg(long, env = "BUNTING_SIM_SCENARIO", default_value = "random")]
    scenario: String,
    /// Probability that a frame is lost (default: the seed chooses).
    #[arg(long, env = "BUNTING_SIM_LOSS")]
    loss: Option<f64>,
    /// Probability that a frame is delivered twice.
    #[arg(long, env = "BUNTING_SIM_DUPLICATION")]
    duplication: Option<f64>,
    /// Probability that a frame is held back and overtaken.
    #[arg(long, env = "BUNTING_SIM_REORDER")]
    reorder: Option<f64>,
    /// Partitions per simulated hour.
    #[arg(long, env = "BUNTING_SIM_PARTITIONS_PER_HOUR")]
    partitions_per_hour: Option<f64>,
    /// Node crashes per simulated hour.
    #[arg(long, env = "BUNTING_SIM_CRASHES_PER_HOUR")]
    crashes_per_hour: Option<f64>,
    /// Admin writes per simulated minute, whole cluster (default: the seed chooses).
    #[arg(long, env = "BUNTING_SIM_WRITES_PER_MINUTE")]
    writes_per_minute: Option<f64>,
    /// Plant a replica bug (tests of the simulator itself).
    #[arg(long, value_enum)]
    planted: Vec<PlantedBug>,
    /// Write the JSON report (one seed) or sweep summary here; `-` for stdout.
    #[arg(long, env = "BUNTING_SIM_JSON")]
    json: Option<String>,
    /// Draw the seed's timeline as an SVG (one seed only).
    #[arg(long, env = "BUNTING_SIM_PLOT")]
    plot: Option<String>,
    /// Seeds run in parallel during a sweep (each seed is still one thread).
    #[arg(long, env = "BUNTING_SIM_JOBS", default_value_t = 1)]
    jobs: usize,
}

/// Runs what `args` asks for and returns the process exit code: the worst outcome's code, or 2
/// for a command line that cannot be used.
pub fn main_with(args: SimArgs) -> ExitCode {
    match run(args) {
        Ok(outcome) => ExitCode::from(outcome.exit_code() as u8),
        Err(e) => {
            eprintln!("bunting sim: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_scenario(name: &str) -> Result<Option<Scenario>, Error> {
    if name == "all" {
        return Ok(None);
    }
    Scenario::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .map(Some)
        .ok_or_else(|| Error::InvalidOption(format!("unknown scenario {name:?}")))
}

fn options_for(cli: &SimArgs, seed: u64, scenario: Scenario) -> Options {
    Options {
        seed,
        regions: cli.regions,
        nodes_per_region: cli.nodes_per_region,
        duration_ms: cli.duration.as_millis() as u64,
        scenario,
        rates: FaultRates {
            loss: cli.loss,
            duplication: cli.duplication,
            reorder: cli.reorder,
            partitions_per_hour: cli.partitions_per_hour,
            crashes_per_hour: cli.crashes_per_hour,
            writes_per_minute: cli.writes_per_minute,
        },
        liveness_bound_ms: cli.liveness_bound.as_millis() as u64,
        planted: cli.planted.clone(),
        manual: false,
    }
}

fn write_out(path: &str, text: &str) -> Result<(), Error> {
    if path == "-" {
        println!("{text}");
        return Ok(());
    }
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

fn validate(cli: &SimArgs) -> Result<(), Error> {
    if cli.regions == 0 || cli.nodes_per_region == 0 {
        return Err(Error::InvalidOption(
            "--regions and --nodes-per-region must be at least 1".into(),
        ));
    }
    for (name, p) in [
        ("--loss", cli.loss),
        ("--duplication", cli.duplication),
        ("--reorder", cli.reorder),
    ] {
        if let Some(p) = p {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::InvalidOption(format!("{name} must be in [0, 1)")));
            }
        }
    }
    Ok(())
}

fn run(cli: SimArgs) -> Result<Outcome, Error> {
    validate(&cli)?;
    let scenario = parse_scenario(&cli.scenario)?;
    match (&cli.seeds, cli.seed) {
        (Some(range), _) => sweep(&cli, range, scenario),
        (None, seed) => one_seed(
            &cli,
            seed.unwrap_or(0),
            scenario.unwrap_or(Scenario::Random),
        ),
    }
}

fn one_seed(cli: &SimArgs, seed: u64, scenario: Scenario) -> Result<Outcome, Error> {
    let options = options_for(cli, seed, scenario);
    let sim = Simulation::new(options.clone());
    // The seed and everything it derived come first, so a crash still leaves them on screen.
    println!("seed {seed} · {}", options.replay_command());
    println!(
        "derived: {}",
        serde_json::to_string(sim.derived()).unwrap_or_default()
    );
    drop(sim);
    let started = Instant::now();
    let report = match run_seed(options.clone()) {
        Ok(r) => r,
        Err(panic) => {
            println!("CRASH (panic): {panic}");
            println!("replay: {}", options.replay_command());
            return Ok(Outcome::Crash);
        }
    };
    print_report(&report, started.elapsed().as_secs_f64());
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        write_out(path, &text)?;
    }
    if let Some(path) = &cli.plot {
        let title = format!("bunting-sim seed {seed} ({})", scenario.name());
        write_out(path, &timeline_svg(&report.timeline, &title))?;
    }
    Ok(report.outcome)
}

fn print_report(report: &Report, wall_s: f64) {
    println!(
        "{:?}: {} writes acknowledged ({} accepted, {} refused, {} concurrent bursts), {} conflicts, {} evaluations",
        report.outcome,
        report.writes_acknowledged,
        report.writes_accepted,
        report.writes_refused,
        report.concurrent_bursts,
        report.conflicts,
        report.evaluations
    );
    println!(
        "network: {} messages, {} bytes, {} lost, {} duplicated; {} partitions, {} crashes",
        report.messages,
        report.bytes,
        report.messages_lost,
        report.messages_duplicated,
        report.partitions,
        report.crashes
    );
    let times = report.convergence_times();
    println!(
        "convergence after {} heals: p50 {}, p99 {}; after the final heal: {}",
        report.heals.len(),
        millis(crate::percentile(&times, 50.0)),
        millis(crate::percentile(&times, 99.0)),
        millis(report.final_convergence_ms)
    );
    println!(
        "simulated {:.1} s in {wall_s:.2} s wall; trace {}",
        report.simulated_ms as f64 / 1000.0,
        report.trace_hash
    );
    for v in &report.violations {
        println!(
            "VIOLATION {:?} at {} ms: {}",
            v.invariant, v.at_ms, v.detail
        );
    }
    if report.outcome != Outcome::Pass {
        println!("replay: {}", report.replay);
    }
}

fn parse_range(range: &str) -> Result<(u64, u64), Error> {
    let bad = || Error::InvalidOption(format!("--seeds wants A..B, got {range:?}"));
    let (a, b) = range.split_once("..").ok_or_else(bad)?;
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b.trim().parse().map_err(|_| bad())?;
    if b <= a {
        return Err(bad());
    }
    Ok((a, b))
}

fn sweep(cli: &SimArgs, range: &str, scenario: Option<Scenario>) -> Result<Outcome, Error> {
    let (a, b) = parse_range(range)?;
    let scenario_of =
        |seed: u64| scenario.unwrap_or(Scenario::ALL[(seed % Scenario::ALL.len() as u64) as usize]);
    println!(
        "sweep seeds {a}..{b}: {}",
        options_for(cli, a, scenario_of(a)).replay_command()
    );
    let bar = ProgressBar::new(b - a);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} seeds · {elapsed} · eta {eta} · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut summary = SweepSummary::default();
    let jobs = cli.jobs.max(1);
    // Workers take the next seed as soon as they are free (seeds differ in cost several-fold);
    // results are added in seed order, so the summary and its failure list do not depend on
    // which worker finished first.
    let next_seed = AtomicU64::new(a);
    let (results, finished) = mpsc::channel::<(u64, Options, Result<Report, String>)>();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let results = results.clone();
            let next_seed = &next_seed;
            scope.spawn(move || loop {
                let s = next_seed.fetch_add(1, Ordering::Relaxed);
                if s >= b {
                    break;
                }
                let options = options_for(cli, s, scenario_of(s));
                let result = run_seed(options.clone());
                if results.send((s, options, result)).is_err() {
                    break;
                }
            });
        }
        drop(results);
        let mut waiting = BTreeMap::new();
        let mut expected = a;
        for (s, options, result) in finished {
            waiting.insert(s, (options, result));
            while let Some((options, result)) = waiting.remove(&expected) {
                expected += 1;
                summary.add(&options, &result);
                let failed = !matches!(&result, Ok(r) if r.outcome == Outcome::Pass);
                if failed {
                    bar.println(format!(
                        "FAIL seed {}: {}",
                        options.seed,
                        summary
                            .failures
                            .last()
                            .map(|(cmd, why)| format!("{why}\n  replay: {cmd}"))
                            .unwrap_or_default()
                    ));
                }
                bar.inc(1);
                bar.set_message(format!("{} failed", summary.seeds - summary.passed));
            }
        }
    });
    summary.finish();
    bar.finish();
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!(
        "{} seeds: {} passed, {} safety violations, {} liveness violations, {} crashes ({:.1} seeds/min)",
        summary.seeds,
        summary.passed,
        summary.safety_violations,
        summary.liveness_violations,
        summary.crashes,
        summary.seeds as f64 / minutes.max(1e-9)
    );
    println!(
        "convergence after {} heals ({} converged before new faults): p50 {}, p90 {}, p99 {}, max {}",
        summary.heals,
        summary.heals_converged,
        millis(summary.convergence_p50_ms),
        millis(summary.convergence_p90_ms),
        millis(summary.convergence_p99_ms),
        millis(summary.convergence_max_ms)
    );
    println!(
        "after the final heal: p50 {}, p99 {}, max {}",
        millis(summary.final_convergence_p50_ms),
        millis(summary.final_convergence_p99_ms),
        millis(summary.final_convergence_max_ms)
    );
    for (cmd, why) in &summary.failures {
        println!("FAILED: {why}\n  replay: {cmd}");
    }
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
        write_out(path, &text)?;
    }
    Ok(summary.worst())
}

/// A duration in milliseconds for the summary lines; "none" when nothing was measured.
fn millis(ms: Option<u64>) -> String {
    ms.map_or_else(|| "none".to_owned(), |ms| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimArgs,
    }

    fn sweep_summary(jobs: &str) -> serde_json::Value {
        let path = std::env::temp_dir().join(format!(
            "bunting-sim-sweep-{}-{jobs}.json",
            std::process::id()
        ));
        let path_arg = path.to_string_lossy().into_owned();
        let cli = Cli::parse_from([
            "bunting-sim",
            "--seeds",
            "0..6",
            "--scenario",
            "all",
            "--duration",
            "20s",
            "--jobs",
            jobs,
            "--json",
            &path_arg,
        ]);
        let outcome = run(cli.args).expect("the sweep runs");
        assert_eq!(outcome, Outcome::Pass);
        let text = std::fs::read_to_string(&path).expect("the summary was written");
        let _ = std::fs::remove_file(&path);
        serde_json::from_str(&text).expect("the summary is JSON")
    }

    #[test]
    fn a_parallel_sweep_summarises_its_seeds_as_a_serial_one_does() {
        let serial = sweep_summary("1");
        let parallel = sweep_summary("3");
        assert_eq!(serial["seeds"], 6);
        assert!(
            serial["convergence_p50_ms"].is_u64(),
            "percentiles computed"
        );
        // Equal down to the order of every convergence time: seeds are added in seed order
        // whichever worker finished first.
        assert_eq!(serial, parallel);
    }
}
