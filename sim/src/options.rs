//! What a run is asked to do ([`Options`]), and everything the seed derives from it ([`Derived`]).
//!
//! Swarm testing: the seed picks which fault classes are on and how hard they hit, the latencies,
//! the disk speed, the workload mix — so a sweep covers many different worlds, not one world many
//! times. Options given explicitly (fault rates) override what the seed would pick.

use bunting_replica::Faults;
use rand::Rng;
use serde::Serialize;

/// A named fault schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Swarm: the seed picks which fault classes are on and their rates.
    Random,
    /// Whole regions cut off from the others, then healed.
    RegionSplit,
    /// Single links (node pairs across regions) going down and up quickly.
    FlappingLink,
    /// Nodes crash and restart one after another.
    RollingCrash,
    /// One-way partitions: A hears B, B does not hear A.
    Asymmetric,
}

impl Scenario {
    /// Every scenario, in CLI order.
    pub const ALL: [Scenario; 5] = [
        Scenario::Random,
        Scenario::RegionSplit,
        Scenario::FlappingLink,
        Scenario::RollingCrash,
        Scenario::Asymmetric,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Random => "random",
            Scenario::RegionSplit => "region-split",
            Scenario::FlappingLink => "flapping-link",
            Scenario::RollingCrash => "rolling-crash",
            Scenario::Asymmetric => "asymmetric",
        }
    }
}

/// A planted replica bug, by its CLI name (see [`Faults`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PlantedBug {
    /// `Faults::ack_before_persist`.
    AckBeforePersist,
    /// `Faults::send_before_persist_and_reuse_actor`.
    SendBeforePersistReuseActor,
    /// `Faults::drop_sync_message_without_retry`.
    DropSyncWithoutRetry,
    /// `Faults::skip_anti_entropy`.
    SkipAntiEntropy,
}

impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 4] = [
        PlantedBug::AckBeforePersist,
        PlantedBug::SendBeforePersistReuseActor,
        PlantedBug::DropSyncWithoutRetry,
        PlantedBug::SkipAntiEntropy,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::AckBeforePersist => "ack-before-persist",
            PlantedBug::SendBeforePersistReuseActor => "send-before-persist-reuse-actor",
            PlantedBug::DropSyncWithoutRetry => "drop-sync-without-retry",
            PlantedBug::SkipAntiEntropy => "skip-anti-entropy",
        }
    }

    fn apply(self, faults: &mut Faults) {
        match self {
            PlantedBug::AckBeforePersist => faults.ack_before_persist = true,
            PlantedBug::SendBeforePersistReuseActor => {
                faults.send_before_persist_and_reuse_actor = true
            }
            PlantedBug::DropSyncWithoutRetry => faults.drop_sync_message_without_retry = true,
            PlantedBug::SkipAntiEntropy => faults.skip_anti_entropy = true,
        }
    }
}

/// Fault rates given on the command line; `None` lets the seed choose.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FaultRates {
    /// Probability that a frame is lost.
    pub loss: Option<f64>,
    /// Probability that a frame is delivered twice.
    pub duplication: Option<f64>,
    /// Probability that a frame is held back long enough to overtake later ones.
    pub reorder: Option<f64>,
    /// Partitions opened per simulated hour.
    pub partitions_per_hour: Option<f64>,
    /// Node crashes per simulated hour (whole cluster).
    pub crashes_per_hour: Option<f64>,
    /// Admin writes per simulated minute (whole cluster).
    pub writes_per_minute: Option<f64>,
}

/// What one run does. Everything else derives from `seed`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Options {
    pub seed: u64,
    pub regions: usize,
    pub nodes_per_region: usize,
    /// Simulated length of the safety phase (faults on, workload running), in milliseconds.
    pub duration_ms: u64,
    pub scenario: Scenario,
    pub rates: FaultRates,
    /// How long the liveness phase may take to converge after everything healed, in milliseconds.
    pub liveness_bound_ms: u64,
    /// Planted replica bugs, for the tests that show the simulator catches them.
    pub planted: Vec<PlantedBug>,
    /// No random workload or faults: for scenario tests that drive the cluster by hand.
    pub manual: bool,
}

impl Options {
    /// 3 regions × 3 nodes, one simulated hour, random scenario.
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            regions: 3,
            nodes_per_region: 3,
            duration_ms: 3_600_000,
            scenario: Scenario::Random,
            rates: FaultRates::default(),
            liveness_bound_ms: 120_000,
            planted: Vec::new(),
            manual: false,
        }
    }

    /// The replica faults these options plant.
    pub fn faults(&self) -> Faults {
        let mut faults = Faults::default();
        for bug in &self.planted {
            bug.apply(&mut faults);
        }
        faults
    }

    /// The command line that replays exactly this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "bunting-sim --seed {} --regions {} --nodes-per-region {} --duration {}ms --scenario {} --liveness-bound {}ms",
            self.seed,
            self.regions,
            self.nodes_per_region,
            self.duration_ms,
            self.scenario.name(),
            self.liveness_bound_ms
        );
        let rates = [
            ("--loss", self.rates.loss),
            ("--duplication", self.rates.duplication),
            ("--reorder", self.rates.reorder),
            ("--partitions-per-hour", self.rates.partitions_per_hour),
            ("--crashes-per-hour", self.rates.crashes_per_hour),
            ("--writes-per-minute", self.rates.writes_per_minute),
        ];
        for (flag, value) in rates {
            if let Some(v) = value {
                cmd.push_str(&format!(" {flag} {v}"));
            }
        }
        for bug in &self.planted {
            cmd.push_str(&format!(" --planted {}", bug.name()));
        }
        cmd
    }
}

/// Everything the seed chose, printed before the run so a failure can be read against it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Derived {
    /// Flag sets the workload writes to.
    pub flag_sets: Vec<String>,
    /// Size of the pool of flag keys writes pick from (small, so writes collide).
    pub flag_keys: usize,
    /// Links from each node to nodes of every other region (full mesh inside a region).
    pub links_per_region: usize,
    /// One-way base latency between regions, in milliseconds (diagonal: inside a region).
    pub latency_ms: Vec<Vec<u64>>,
    /// Jitter as a percentage of the base latency (at least 1 ms).
    pub jitter_percent: u64,
    pub loss: f64,
    pub duplication: f64,
    pub reorder: f64,
    /// Simulated fsync time, in milliseconds (min, max).
    pub fsync_ms: (u64, u64),
    pub anti_entropy_ms: u64,
    /// How long a link may be silent one way before the connection is dropped.
    pub idle_timeout_ms: u64,
    /// Delay before a reconnect once a link works again (min, max).
    pub reconnect_ms: (u64, u64),
    pub writes_per_minute: f64,
    /// Share of write events that are bursts of concurrent writes to one field from several regions.
    pub concurrent_share: f64,
    /// Share of write events that upload a whole flag set.
    pub upload_share: f64,
    pub evaluations_per_minute: f64,
    /// Compact a flag set once this many changes are stored after its snapshot.
    pub compact_after: u64,
    /// Per node: how far its wall clock is off (only recorded in change metadata).
    pub clock_skew_ms: Vec<i64>,
    pub partitions_per_hour: f64,
    pub crashes_per_hour: f64,
    /// How long partitions last (min, max), in milliseconds.
    pub partition_ms: (u64, u64),
    /// How long a crashed node stays down (min, max), in milliseconds.
    pub downtime_ms: (u64, u64),
    /// Probability that a node crashes within one fsync time after accepting a write: aims
    /// crashes at the window between "persist requested" and "persist done".
    pub crash_after_write: f64,
    /// Fault classes the random scenario turned on.
    pub fault_classes: Vec<String>,
}

/// Share of seeds whose workload is a write storm (12–30 writes a simulated minute).
pub const WRITE_STORM_SHARE: f64 = 0.1;

impl Derived {
    /// Derives every option from the run's RNG (the first draws of the seed).
    pub fn derive(options: &Options, rng: &mut impl Rng) -> Derived {
        let regions = options.regions.max(1);
        let nodes = options.regions.max(1) * options.nodes_per_region.max(1);
        let flag_sets = if rng.random_bool(0.3) {
            vec!["production".to_owned(), "staging".to_owned()]
        } else {
            vec!["production".to_owned()]
        };
        #[allow(clippy::needless_range_loop)] // a symmetric matrix reads clearer with indices
        let latency_ms = {
            let mut latency_ms = vec![vec![0u64; regions]; regions];
            for a in 0..regions {
                latency_ms[a][a] = rng.random_range(1..=2);
                for b in a + 1..regions {
                    let l = rng.random_range(30..=200);
                    latency_ms[a][b] = l;
                    latency_ms[b][a] = l;
                }
            }
            latency_ms
        };
        let pick = |p: f64, max: f64, rng: &mut dyn rand::RngCore| {
            if rng.random_bool(p) {
                rng.random_range(0.0..max)
            } else {
                0.0
            }
        };
        let loss = options.rates.loss.unwrap_or_else(|| pick(0.5, 0.2, rng));
        let duplication = options
            .rates
            .duplication
            .unwrap_or_else(|| pick(0.4, 0.1, rng));
        let reorder = options.rates.reorder.unwrap_or_else(|| pick(0.4, 0.2, rng));
        let fsync_min = rng.random_range(1..=10);
        let slow_disk = rng.random_bool(0.2);
        let fsync_max = fsync_min + rng.random_range(0..=if slow_disk { 400 } else { 40 });
        let anti_entropy_ms = rng.random_range(2_000..=10_000);
        let idle_timeout_ms = rng.random_range(1_000..=10_000);
        let reconnect_min = rng.random_range(50..=500);
        let reconnect_ms = (reconnect_min, reconnect_min + rng.random_range(0..=2_000));
        // Most seeds write 1–12 times a simulated minute (60–720 an hour: tens of times what a
        // production flag service sees); one in ten is a write storm of 12–30 a minute. Automerge's
        // cost per change grows with the document's history, so a seed's cost grows faster than
        // its write count: storms in every seed would make sweeps 3× slower for the same faults.
        let writes_per_minute = if rng.random_bool(WRITE_STORM_SHARE) {
            rng.random_range(12.0..30.0)
        } else {
            rng.random_range(1.0..12.0)
        };
        let writes_per_minute = options.rates.writes_per_minute.unwrap_or(writes_per_minute);
        let concurrent_share = rng.random_range(0.05..0.3);
        let upload_share = rng.random_range(0.0..0.1);
        let evaluations_per_minute = rng.random_range(5.0..60.0);
        // A quarter of the seeds compact far more often than a node does, to put crashes and
        // restarts next to fresh snapshots; each compaction saves the whole document.
        let compact_after = if rng.random_bool(0.25) {
            rng.random_range(10..=100)
        } else {
            bunting_store::COMPACT_AFTER_CHANGES
        };
        let clock_skew_ms = (0..nodes)
            .map(|_| rng.random_range(-120_000..=120_000))
            .collect();
        let links_per_region = rng.random_range(1..=2).min(options.nodes_per_region.max(1));
        let flag_keys = rng.random_range(3..=20);

        let (mut partitions_per_hour, mut crashes_per_hour) = match options.scenario {
            Scenario::Random => (0.0, 0.0),
            Scenario::RegionSplit | Scenario::FlappingLink | Scenario::Asymmetric => {
                (rng.random_range(6.0..40.0), 0.0)
            }
            Scenario::RollingCrash => (0.0, rng.random_range(10.0..60.0)),
        };
        let mut fault_classes: Vec<String> = Vec::new();
        if options.scenario == Scenario::Random {
            let classes = [
                "region-split",
                "node-isolation",
                "asymmetric",
                "flapping-link",
                "crash",
            ];
            for class in classes {
                if rng.random_bool(0.5) {
                    fault_classes.push(class.to_owned());
                }
            }
            if fault_classes.is_empty() {
                let i = rng.random_range(0..classes.len());
                fault_classes.push(classes[i].to_owned());
            }
            if fault_classes.iter().any(|c| c != "crash") {
                partitions_per_hour = rng.random_range(6.0..40.0);
            }
            if fault_classes.iter().any(|c| c == "crash") {
                crashes_per_hour = rng.random_range(5.0..40.0);
            }
        } else {
            fault_classes.push(options.scenario.name().to_owned());
        }
        if let Some(p) = options.rates.partitions_per_hour {
            partitions_per_hour = p;
        }
        if let Some(c) = options.rates.crashes_per_hour {
            crashes_per_hour = c;
        }
        let partition_min = rng.random_range(1_000..=30_000);
        let partition_ms = (partition_min, partition_min + rng.random_range(0..=300_000));
        let downtime_min = rng.random_range(100..=5_000);
        let downtime_ms = (downtime_min, downtime_min + rng.random_range(0..=120_000));
        let crash_after_write = if crashes_per_hour > 0.0 {
            rng.random_range(0.02..0.2)
        } else {
            0.0
        };
        Derived {
            crash_after_write,
            flag_sets,
            flag_keys,
            links_per_region,
            latency_ms,
            jitter_percent: rng.random_range(0..=50),
            loss,
            duplication,
            reorder,
            fsync_ms: (fsync_min, fsync_max),
            anti_entropy_ms,
            idle_timeout_ms,
            reconnect_ms,
            writes_per_minute,
            concurrent_share,
            upload_share,
            evaluations_per_minute,
            compact_after,
            clock_skew_ms,
            partitions_per_hour,
            crashes_per_hour,
            partition_ms,
            downtime_ms,
            fault_classes,
        }
    }
}
