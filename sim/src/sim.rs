//! The simulation: a cluster of real [`Replica`]s driven by one event queue on one thread.
//!
//! Every source of nondeterminism is inside: the clock is the queue's current time, every random
//! choice comes from one ChaCha RNG seeded by the run's seed, and events at the same instant run
//! in the order they were scheduled. The driver code here plays the role the node binary plays in
//! production (persist, then confirm; reconnect after a partition; restart from the store), and
//! the checkers compare the nodes against the simulator's own record of acknowledged writes.

use std::cmp::{Ordering, Reverse};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use bunting_engine::{CompileOptions, CompiledFlagSet, EvaluationContext, Resolution};
use bunting_model::Flag;
use bunting_replica::{
    ChangeHash, Error as ReplicaError, Event, FlagSetDoc, PeerId, PersistRequest, Replica,
    ReplicaConfig, StoredFlagSet, Timestamp, WriteCommand, WriteId, WriteMeta,
};
use bunting_store::{MemoryStore, Store, StoreError};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::options::{Derived, Options, Scenario};
use crate::report::{Heal, Invariant, Outcome, Report, Timeline, Violation};
use crate::workload::{self, PlannedWrite};

/// Wall-clock time (ms since the Unix epoch) the simulated clock's zero stands for; only written
/// into change metadata.
const WALL_CLOCK_BASE_MS: u64 = 1_750_000_000_000;

/// A write accepted this long ago and still not acknowledged (its node alive) is unavailable.
const ACK_BOUND_MS: u64 = 30_000;

/// (flag set, heads, probe index).
type ProbeKey = (String, Vec<ChangeHash>, usize);
/// One probe's resolution of every flag, by key.
type Answers = Vec<(String, Resolution)>;

/// Keep at most this many (flag set, heads, probe) answers for the continuous agreement check.
const AGREEMENT_CACHE: usize = 4_096;

/// Loads everything a node stored, the way a node does on start: every flag set's snapshot and
/// changes, and the sync state for each known peer.
pub fn stored_flag_sets(
    store: &dyn Store,
    peers: &[PeerId],
) -> Result<Vec<StoredFlagSet>, StoreError> {
    let mut out = Vec::new();
    for name in store.flag_sets()? {
        let loaded = store.load(&name)?;
        let mut sync_states = Vec::new();
        for peer in peers {
            if let Some(state) = store.sync_state(&peer.0, &name)? {
                sync_states.push((peer.clone(), state));
            }
        }
        out.push(StoredFlagSet {
            name,
            snapshot: loaded.snapshot.map(|s| s.bytes),
            changes: loaded.changes.into_iter().map(|c| c.bytes).collect(),
            sync_states,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Faults and workload on.
    Safety,
    /// Everything healed, no new faults or writes: the cluster must converge.
    Liveness,
    Done,
}

#[derive(Debug)]
enum Action {
    Deliver {
        from: usize,
        to: usize,
        link_epoch: u64,
        frame: Vec<u8>,
    },
    PersistDone {
        node: usize,
        epoch: u64,
        request: PersistRequest,
    },
    Timer {
        node: usize,
        epoch: u64,
        at: u64,
    },
    IdleCheck {
        link: usize,
    },
    Reconnect {
        link: usize,
    },
    PartitionStart {
        partition: usize,
    },
    PartitionEnd {
        partition: usize,
    },
    Crash {
        node: usize,
        downtime: u64,
    },
    Restart {
        node: usize,
    },
    ClientWrite,
    Evaluate,
    BeginLiveness,
    LivenessDeadline,
}

impl Action {
    fn tag(&self) -> u8 {
        match self {
            Action::Deliver { .. } => 0,
            Action::PersistDone { .. } => 1,
            Action::Timer { .. } => 2,
            Action::IdleCheck { .. } => 3,
            Action::Reconnect { .. } => 4,
            Action::PartitionStart { .. } => 5,
            Action::PartitionEnd { .. } => 6,
            Action::Crash { .. } => 7,
            Action::Restart { .. } => 8,
            Action::ClientWrite => 9,
            Action::Evaluate => 10,
            Action::BeginLiveness => 11,
            Action::LivenessDeadline => 12,
        }
    }
}

#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    action: Action,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One simulated node: the real replica, its disk, and what the driver keeps about it.
struct SimNode {
    name: String,
    peer: PeerId,
    region: usize,
    /// The disk: survives crashes.
    store: MemoryStore,
    /// `None` while crashed.
    replica: Option<Replica>,
    /// Bumped on every crash and restart, so completions and timers of a dead process are ignored.
    epoch: u64,
    /// When the disk finishes what it was already given (fsyncs complete in order).
    disk_free_at: u64,
    timer_at: Option<u64>,
    /// Accepted local writes of this process, by replica write id → index in the write record.
    pending_writes: BTreeMap<WriteId, usize>,
    /// Heads as last seen, per flag set: the causality check looks at what came after.
    last_heads: BTreeMap<String, Vec<ChangeHash>>,
    /// The compiled flag set per flag set, with the heads it was compiled at.
    compiled: BTreeMap<String, (Vec<ChangeHash>, Rc<CompiledFlagSet>)>,
    down_since: Option<u64>,
}

/// A connection between two nodes (full mesh inside a region, a few links across regions).
struct Link {
    ends: [usize; 2],
    /// Whether each end's replica has the other added as a peer.
    added: [bool; 2],
    /// Bumped on every disconnect and reconnect: frames of an old connection are dropped.
    epoch: u64,
    idle_check_pending: bool,
    reconnect_pending: bool,
}

impl Link {
    fn connected(&self) -> bool {
        self.added[0] && self.added[1]
    }
}

struct Partition {
    label: String,
    /// Directed (from, to) pairs whose frames are dropped.
    edges: Vec<(usize, usize)>,
    start: u64,
    end: u64,
    nodes: Vec<usize>,
    active: bool,
}

/// The simulator's own record of one write: the checkers compare nodes against this.
#[derive(Debug, Clone)]
struct WriteRecord {
    node: usize,
    at: u64,
    flag_set: String,
    summary: String,
    acked_at: Option<u64>,
    changes: Vec<ChangeHash>,
    /// The node crashed before acknowledging it: the write may be lost, and that is allowed.
    lost_to_crash: bool,
}

/// Follows one heal until every live node holds everything that existed anywhere at that moment.
struct Tracker {
    heal: usize,
    target: Vec<(String, Vec<ChangeHash>)>,
    converged: Vec<Option<u64>>,
    done: bool,
}

#[derive(Default)]
struct Stats {
    writes_attempted: u64,
    writes_accepted: u64,
    writes_acknowledged: u64,
    writes_refused: u64,
    bursts: u64,
    evaluations: u64,
    messages: u64,
    bytes: u64,
    lost: u64,
    duplicated: u64,
    crashes: u64,
    partitions: u64,
}

/// A whole simulated cluster. Build with [`Simulation::new`], then either [`Simulation::run`] for
/// a seeded random run, or drive it by hand (the scenario tests) and end with
/// [`Simulation::finish`].
pub struct Simulation {
    options: Options,
    derived: Derived,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<SimNode>,
    index: HashMap<String, usize>,
    peers: Vec<PeerId>,
    links: Vec<Link>,
    link_of: HashMap<(usize, usize), usize>,
    blocked: HashMap<(usize, usize), u32>,
    partitions: Vec<Partition>,
    phase: Phase,
    writes: Vec<WriteRecord>,
    heals: Vec<Heal>,
    trackers: Vec<Tracker>,
    violations: Vec<Violation>,
    stats: Stats,
    trace: DefaultHasher,
    timeline: Timeline,
    probes: Vec<EvaluationContext>,
    /// (flag set, heads, probe) → (node, answers): converged nodes must answer alike.
    agreement: HashMap<ProbeKey, (usize, Answers)>,
    liveness_started: u64,
    final_convergence: Option<u64>,
}

impl Simulation {
    /// A cluster of fresh nodes, everything derived from `options.seed`.
    pub fn new(options: Options) -> Simulation {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let derived = Derived::derive(&options, &mut rng);
        let regions = options.regions.max(1);
        let per_region = options.nodes_per_region.max(1);
        let mut nodes = Vec::new();
        for r in 0..regions {
            for i in 0..per_region {
                let name = format!("r{r}n{i}");
                nodes.push(SimNode {
                    peer: PeerId(name.clone()),
                    name,
                    region: r,
                    // Fixed, not random like a real new disk's, so a seed replays exactly;
                    // simulated disks are never lost, so counting from 1 cannot repeat an actor.
                    store: MemoryStore::with_first_incarnation(1),
                    replica: None,
                    epoch: 0,
                    disk_free_at: 0,
                    timer_at: None,
                    pending_writes: BTreeMap::new(),
                    last_heads: BTreeMap::new(),
                    compiled: BTreeMap::new(),
                    down_since: None,
                });
            }
        }
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let peers = nodes.iter().map(|n| n.peer.clone()).collect();
        // Full mesh inside a region; node i of region a links to nodes i..i+k of region b.
        let mut edges = BTreeSet::new();
        for a in 0..nodes.len() {
            for b in 0..nodes.len() {
                if a == b {
                    continue;
                }
                let (ra, rb) = (nodes[a].region, nodes[b].region);
                let ia = a % per_region;
                let ib = b % per_region;
                let linked = ra == rb
                    || (ra < rb
                        && (0..derived.links_per_region).any(|j| (ia + j) % per_region == ib));
                if linked {
                    edges.insert((a.min(b), a.max(b)));
                }
            }
        }
        let links: Vec<Link> = edges
            .into_iter()
            .map(|(a, b)| Link {
                ends: [a, b],
                added: [false, false],
                epoch: 0,
                idle_check_pending: false,
                reconnect_pending: false,
            })
            .collect();
        let link_of = links
            .iter()
            .enumerate()
            .flat_map(|(i, l)| [((l.ends[0], l.ends[1]), i), ((l.ends[1], l.ends[0]), i)])
            .collect();
        let timeline = Timeline {
            nodes: nodes.iter().map(|n| n.name.clone()).collect(),
            regions: nodes.iter().map(|n| n.region).collect(),
            ..Timeline::default()
        };
        let mut sim = Simulation {
            options,
            derived,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            index,
            peers,
            links,
            link_of,
            blocked: HashMap::new(),
            partitions: Vec::new(),
            phase: Phase::Safety,
            writes: Vec::new(),
            heals: Vec::new(),
            trackers: Vec::new(),
            violations: Vec::new(),
            stats: Stats::default(),
            trace: DefaultHasher::new(),
            timeline,
            probes: workload::probe_contexts(),
            agreement: HashMap::new(),
            liveness_started: 0,
            final_convergence: None,
        };
        for n in 0..sim.nodes.len() {
            sim.start_node(n);
        }
        for l in 0..sim.links.len() {
            sim.connect(l);
        }
        if let Some(first) = sim.derived.flag_sets.first().cloned() {
            if let Some(replica) = sim.nodes[0].replica.as_mut() {
                let _ = replica.create_flag_set(&first, Timestamp(0));
            }
            sim.after_node(0);
        }
        sim
    }

    /// The options this run was made with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// What the seed chose.
    pub fn derived(&self) -> &Derived {
        &self.derived
    }

    /// Runs the seeded schedule: faults and workload for `duration`, then the liveness phase.
    pub fn run(mut self) -> Report {
        if !self.options.manual {
            self.plan_faults();
            let first_write = self.exp_delay(self.derived.writes_per_minute);
            self.schedule(first_write, Action::ClientWrite);
            let first_eval = self.exp_delay(self.derived.evaluations_per_minute);
            self.schedule(first_eval, Action::Evaluate);
        }
        self.schedule_at(self.options.duration_ms, Action::BeginLiveness);
        self.process_until(u64::MAX);
        self.report()
    }

    /// Heals everything, stops faults and writes, requires convergence within the bound, runs the
    /// final checks and reports. For scenario tests that drove the cluster by hand.
    pub fn finish(mut self) -> Report {
        self.begin_liveness();
        self.process_until(u64::MAX);
        self.report()
    }

    // ---- the harness for scenario tests ----

    /// Simulated time now, in milliseconds.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of nodes (regions × nodes per region); node `i` is in region `i / nodes_per_region`.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Runs everything scheduled in the next `ms` simulated milliseconds.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now.saturating_add(ms);
        self.process_until(until);
        self.now = self.now.max(until);
    }

    /// An admin write on `node`; returns whether the node accepted it (it is acknowledged later,
    /// after its persist completes).
    pub fn write(&mut self, node: usize, flag_set: &str, command: WriteCommand) -> bool {
        let summary = format!("{command:?}");
        self.do_write(node, flag_set, PlannedWrite { command, summary })
    }

    /// Cuts region `region` off from every other region (both ways); returns the partition.
    pub fn isolate_region(&mut self, region: usize) -> usize {
        let edges = self.region_split_edges(&[region]);
        self.open_partition(format!("region {region} cut off"), edges)
    }

    /// Blocks frames from `from` to `to` only: `to` no longer hears `from`.
    pub fn block_one_way(&mut self, from: usize, to: usize) -> usize {
        self.open_partition(format!("{from} -/-> {to}"), vec![(from, to)])
    }

    /// Heals one partition.
    pub fn heal(&mut self, partition: usize) {
        self.end_partition(partition);
    }

    /// Crashes a node now (what it had not persisted is lost).
    pub fn crash(&mut self, node: usize) {
        self.crash_node(node);
    }

    /// Restarts a crashed node from its disk.
    pub fn restart(&mut self, node: usize) {
        self.restart_node(node);
    }

    /// Whether every node is up and all hold identical heads for every flag set.
    pub fn converged(&self) -> bool {
        self.divergence().is_none()
    }

    /// A flag as `node` sees it.
    pub fn flag(&self, node: usize, flag_set: &str, key: &str) -> Option<Flag> {
        self.nodes[node]
            .replica
            .as_ref()?
            .flag_set(flag_set)?
            .flag(key)
    }

    /// Writes acknowledged so far.
    pub fn acknowledged_writes(&self) -> u64 {
        self.stats.writes_acknowledged
    }

    /// Violations found so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    // ---- the event loop ----

    fn schedule(&mut self, delay: u64, action: Action) {
        self.schedule_at(self.now.saturating_add(delay), action);
    }

    fn schedule_at(&mut self, at: u64, action: Action) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            action,
        }));
    }

    fn process_until(&mut self, until: u64) {
        while self.phase != Phase::Done {
            match self.queue.peek() {
                Some(Reverse(s)) if s.at <= until => {}
                _ => break,
            }
            let Some(Reverse(next)) = self.queue.pop() else {
                break;
            };
            self.now = self.now.max(next.at);
            (self.now, next.action.tag()).hash(&mut self.trace);
            self.handle(next.action);
            // In the liveness phase every step may be the one that completes convergence (a
            // restart or reconnect changes no document but can end a divergence).
            if self.phase == Phase::Liveness && self.converged() {
                self.final_convergence = Some(self.now - self.liveness_started);
                self.final_checks();
                self.phase = Phase::Done;
            }
        }
    }

    fn handle(&mut self, action: Action) {
        match action {
            Action::Deliver {
                from,
                to,
                link_epoch,
                frame,
            } => self.deliver(from, to, link_epoch, &frame),
            Action::PersistDone {
                node,
                epoch,
                request,
            } => self.persist_done(node, epoch, request),
            Action::Timer { node, epoch, at } => {
                let n = &mut self.nodes[node];
                if n.epoch == epoch && n.timer_at == Some(at) {
                    n.timer_at = None;
                    if let Some(r) = n.replica.as_mut() {
                        r.handle_timeout(Timestamp(self.now));
                    }
                    self.after_node(node);
                }
            }
            Action::IdleCheck { link } => self.idle_check(link),
            Action::Reconnect { link } => {
                self.links[link].reconnect_pending = false;
                self.connect(link);
            }
            Action::PartitionStart { partition } => {
                if self.phase == Phase::Safety {
                    self.start_partition(partition);
                }
            }
            Action::PartitionEnd { partition } => self.end_partition(partition),
            Action::Crash { node, downtime } => {
                if self.phase == Phase::Safety && self.nodes[node].replica.is_some() {
                    self.crash_node(node);
                    self.schedule(downtime, Action::Restart { node });
                }
            }
            Action::Restart { node } => self.restart_node(node),
            Action::ClientWrite => self.client_write(),
            Action::Evaluate => self.evaluate(),
            Action::BeginLiveness => self.begin_liveness(),
            Action::LivenessDeadline => {
                if self.phase == Phase::Liveness {
                    if let Some(why) = self.divergence() {
                        self.violation(
                            Invariant::Convergence,
                            format!(
                                "not converged {} ms after the final heal: {why}",
                                self.options.liveness_bound_ms
                            ),
                        );
                    }
                    self.final_checks();
                    self.phase = Phase::Done;
                }
            }
        }
    }

    fn violation(&mut self, invariant: Invariant, detail: String) {
        // One violation of a kind is enough to fail; keep the report readable.
        if self
            .violations
            .iter()
            .filter(|v| v.invariant == invariant)
            .count()
            >= 5
        {
            return;
        }
        self.violations.push(Violation {
            invariant,
            at_ms: self.now,
            detail,
        });
    }

    fn exp_delay(&mut self, per_minute: f64) -> u64 {
        let u: f64 = self.rng.random_range(0.0..1.0);
        let mean_ms = 60_000.0 / per_minute.max(1e-6);
        (-(1.0 - u).ln() * mean_ms).max(1.0) as u64
    }

    // ---- nodes ----

    fn replica_config(&self, n: usize, incarnation: u64) -> ReplicaConfig {
        let node = &self.nodes[n];
        let mut config = ReplicaConfig::new(
            node.name.clone(),
            format!("region-{}", node.region),
            incarnation,
        );
        config.anti_entropy_interval_ms = self.derived.anti_entropy_ms;
        config.faults = self.options.faults();
        config
    }

    /// Starts (or restarts) node `n` from its disk, through the store trait, as the node does.
    fn start_node(&mut self, n: usize) {
        let store = &self.nodes[n].store;
        let loaded = store
            .next_incarnation()
            .and_then(|inc| Ok((inc, stored_flag_sets(store, &self.peers)?)));
        let (incarnation, stored) = match loaded {
            Ok(x) => x,
            Err(e) => {
                self.violation(
                    Invariant::Durability,
                    format!("{} could not read its disk: {e}", self.nodes[n].name),
                );
                return;
            }
        };
        let config = self.replica_config(n, incarnation);
        let replica = match Replica::restore(config, stored, Timestamp(self.now)) {
            Ok(r) => r,
            Err(e) => {
                self.violation(
                    Invariant::Durability,
                    format!("{} could not load what it stored: {e}", self.nodes[n].name),
                );
                return;
            }
        };
        let node = &mut self.nodes[n];
        node.last_heads = replica
            .flag_set_names()
            .into_iter()
            .filter_map(|name| {
                let heads = replica.flag_set(&name)?.heads();
                Some((name, heads))
            })
            .collect();
        node.replica = Some(replica);
        node.epoch += 1;
        node.timer_at = None;
        node.compiled.clear();
        node.down_since = None;
        // Every acknowledged write of this node must have survived (persist before ack).
        let lost: Vec<String> = self
            .writes
            .iter()
            .filter(|w| w.node == n && w.acked_at.is_some() && !self.node_has(n, w))
            .map(|w| w.summary.clone())
            .collect();
        if let Some(first) = lost.first() {
            let detail = format!(
                "{} lost {} acknowledged write(s) in a crash, e.g. {first}",
                self.nodes[n].name,
                lost.len()
            );
            self.violation(Invariant::Durability, detail);
        }
        self.after_node(n);
    }

    fn node_has(&self, n: usize, w: &WriteRecord) -> bool {
        let Some(doc) = self.nodes[n]
            .replica
            .as_ref()
            .and_then(|r| r.flag_set(&w.flag_set))
        else {
            return w.changes.is_empty();
        };
        w.changes
            .iter()
            .all(|h| doc.automerge().get_change_meta_by_hash(h).is_some())
    }

    /// Moves a node's events and frames out after it was called, and keeps its timer scheduled.
    fn after_node(&mut self, n: usize) {
        let mut events = Vec::new();
        let mut frames = Vec::new();
        let timeout;
        {
            let Some(replica) = self.nodes[n].replica.as_mut() else {
                return;
            };
            while let Some(e) = replica.poll_event() {
                events.push(e);
            }
            while let Some(t) = replica.poll_transmit() {
                frames.push(t);
            }
            timeout = replica.poll_timeout();
        }
        for event in events {
            self.on_event(n, event);
        }
        for (peer, frame) in frames {
            self.send(n, &peer, frame);
        }
        if let Some(Timestamp(at)) = timeout {
            let node = &mut self.nodes[n];
            if node.timer_at != Some(at) {
                node.timer_at = Some(at);
                let epoch = node.epoch;
                self.schedule_at(at.max(self.now), Action::Timer { node: n, epoch, at });
            }
        }
    }

    fn on_event(&mut self, n: usize, event: Event) {
        match event {
            Event::PersistRequest(request) => {
                let (lo, hi) = self.derived.fsync_ms;
                let fsync = self.rng.random_range(lo..=hi.max(lo));
                let node = &mut self.nodes[n];
                let done = node.disk_free_at.max(self.now) + fsync;
                node.disk_free_at = done;
                let epoch = node.epoch;
                self.schedule_at(
                    done,
                    Action::PersistDone {
                        node: n,
                        epoch,
                        request,
                    },
                );
            }
            Event::WriteAcknowledged { id, changes, .. } => {
                if let Some(w) = self.nodes[n].pending_writes.remove(&id) {
                    changes.len().hash(&mut self.trace);
                    let record = &mut self.writes[w];
                    record.acked_at = Some(self.now);
                    record.changes = changes;
                    self.stats.writes_acknowledged += 1;
                    self.timeline.writes.push((n, record.at, true));
                }
            }
            Event::FlagSetChanged { flag_set, heads } => self.on_doc_changed(n, &flag_set, heads),
            Event::PeerSynced { .. } => {}
            // Only after `persist_failed`, which simulated disks do not call yet: the write was
            // refused, so it is no longer waiting for an acknowledgement.
            Event::WriteRefused { id, .. } => {
                self.nodes[n].pending_writes.remove(&id);
            }
            Event::ProtocolError { peer, error } => {
                let detail = format!(
                    "{} refused a frame from {}: {error}",
                    self.nodes[n].name, peer.0
                );
                self.violation(Invariant::Protocol, detail);
            }
        }
    }

    fn on_doc_changed(&mut self, n: usize, flag_set: &str, heads: Vec<ChangeHash>) {
        heads.hash(&mut self.trace);
        let node = &self.nodes[n];
        let Some(doc) = node.replica.as_ref().and_then(|r| r.flag_set(flag_set)) else {
            return;
        };
        // Causality: every change that arrived must find its dependencies already applied.
        let before = node.last_heads.get(flag_set).cloned().unwrap_or_default();
        let am = doc.automerge();
        let mut missing = None;
        for meta in am.get_changes_meta(&before) {
            for dep in &meta.deps {
                if am.get_change_meta_by_hash(dep).is_none() {
                    missing = Some((meta.hash, *dep));
                }
            }
        }
        if let Some((change, dep)) = missing {
            let detail = format!(
                "{} holds change {change} without its dependency {dep}",
                node.name
            );
            self.violation(Invariant::Causality, detail);
        }
        self.nodes[n].last_heads.insert(flag_set.to_owned(), heads);
        self.check_trackers(n);
    }

    fn crash_node(&mut self, n: usize) {
        if self.nodes[n].replica.is_none() {
            return;
        }
        self.stats.crashes += 1;
        let node = &mut self.nodes[n];
        node.replica = None;
        node.epoch += 1;
        node.timer_at = None;
        node.down_since = Some(self.now);
        node.disk_free_at = self.now;
        for w in std::mem::take(&mut node.pending_writes).into_values() {
            self.writes[w].lost_to_crash = true;
        }
        for l in self.links_of(n) {
            let side = self.side(l, n);
            let link = &mut self.links[l];
            link.added[side] = false;
            link.epoch += 1;
            if link.added[1 - side] {
                self.schedule_idle_check(l);
            }
        }
        // The remaining live nodes may now be all a heal was waiting for.
        for i in 0..self.nodes.len() {
            if self.nodes[i].replica.is_some() {
                self.check_trackers(i);
                break;
            }
        }
    }

    fn restart_node(&mut self, n: usize) {
        if self.nodes[n].replica.is_some() {
            return;
        }
        let down = self.nodes[n].down_since.unwrap_or(self.now);
        self.timeline.crashes.push((n, down, self.now));
        self.start_node(n);
        if self.nodes[n].replica.is_none() {
            return;
        }
        for l in self.links_of(n) {
            self.links[l].epoch += 1;
            let side = self.side(l, n);
            self.links[l].added[side] = false;
            self.schedule_reconnect(l);
        }
        let name = self.nodes[n].name.clone();
        self.open_tracker(format!("{name} restarted"));
    }

    fn links_of(&self, n: usize) -> Vec<usize> {
        (0..self.links.len())
            .filter(|&l| self.links[l].ends.contains(&n))
            .collect()
    }

    fn side(&self, l: usize, n: usize) -> usize {
        usize::from(self.links[l].ends[1] == n)
    }

    // ---- disks ----

    fn persist_done(&mut self, n: usize, epoch: u64, request: PersistRequest) {
        if self.nodes[n].epoch != epoch || self.nodes[n].replica.is_none() {
            return; // the process that asked crashed: this fsync never happened
        }
        let store = &self.nodes[n].store;
        let mut result: Result<Option<u64>, StoreError> = Ok(None);
        if !request.changes.is_empty() {
            let changes: Vec<&[u8]> = request.changes.iter().map(Vec::as_slice).collect();
            result = store
                .append_changes(&request.flag_set, &changes)
                .map(|r| Some(r.changes_since_snapshot));
        }
        for (peer, state) in &request.sync_states {
            if result.is_ok() {
                if let Err(e) = store.put_sync_state(&peer.0, &request.flag_set, state) {
                    result = Err(e);
                }
            }
        }
        let since_snapshot = match result {
            Ok(s) => s,
            Err(e) => {
                let detail = format!("{} could not persist: {e}", self.nodes[n].name);
                self.violation(Invariant::Availability, detail);
                return;
            }
        };
        let now = Timestamp(self.now);
        let Some(replica) = self.nodes[n].replica.as_mut() else {
            return;
        };
        if let Err(e) = replica.persisted(request.id, now) {
            let detail = format!("{} refused a persist confirmation: {e}", self.nodes[n].name);
            self.violation(Invariant::Availability, detail);
        }
        // Compact as the node does, but only when the document holds nothing unstored, so the
        // snapshot never makes an unpersisted change durable by accident.
        if let (Some(count), Some(replica)) = (since_snapshot, self.nodes[n].replica.as_ref()) {
            if count >= self.derived.compact_after && replica.pending_persists() == 0 {
                if let Some(doc) = replica.flag_set(&request.flag_set) {
                    let store = &self.nodes[n].store;
                    let compacted = store.load(&request.flag_set).and_then(|loaded| {
                        store.compact(&request.flag_set, &doc.save(), loaded.last_seq())
                    });
                    if let Err(e) = compacted {
                        let detail = format!("{} could not compact: {e}", self.nodes[n].name);
                        self.violation(Invariant::Availability, detail);
                    }
                }
            }
        }
        self.after_node(n);
    }

    // ---- network ----

    fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.get(&(from, to)).copied().unwrap_or(0) > 0
    }

    /// Whether frames can go from `from` to `to` now.
    fn reachable(&self, from: usize, to: usize) -> bool {
        self.nodes[from].replica.is_some()
            && self.nodes[to].replica.is_some()
            && !self.is_blocked(from, to)
    }

    fn send(&mut self, from: usize, peer: &PeerId, frame: Vec<u8>) {
        let Some(&to) = self.index.get(&peer.0) else {
            return;
        };
        let Some(&l) = self.link_of.get(&(from, to)) else {
            return;
        };
        self.stats.messages += 1;
        self.stats.bytes += frame.len() as u64;
        (from, to, frame.len()).hash(&mut self.trace);
        let faults_on = self.phase == Phase::Safety && !self.options.manual;
        if self.is_blocked(from, to)
            || (faults_on && self.derived.loss > 0.0 && self.rng.random_bool(self.derived.loss))
        {
            self.stats.lost += 1;
            return;
        }
        let link_epoch = self.links[l].epoch;
        let copies = if faults_on
            && self.derived.duplication > 0.0
            && self.rng.random_bool(self.derived.duplication)
        {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut frame = Some(frame);
        for copy in 0..copies {
            let delay = self.latency(from, to, faults_on);
            let frame = if copy + 1 == copies {
                frame.take().unwrap_or_default()
            } else {
                frame.clone().unwrap_or_default()
            };
            self.schedule(
                delay,
                Action::Deliver {
                    from,
                    to,
                    link_epoch,
                    frame,
                },
            );
        }
    }

    fn latency(&mut self, from: usize, to: usize, faults_on: bool) -> u64 {
        let base = self.derived.latency_ms[self.nodes[from].region][self.nodes[to].region];
        let jitter = (base * self.derived.jitter_percent / 100).max(1);
        let mut delay = base + self.rng.random_range(0..=jitter);
        if faults_on && self.derived.reorder > 0.0 && self.rng.random_bool(self.derived.reorder) {
            // Held back long enough to overtake later frames.
            delay += self.rng.random_range(1..=base * 3 + 5);
        }
        delay
    }

    fn deliver(&mut self, from: usize, to: usize, link_epoch: u64, frame: &[u8]) {
        let Some(&l) = self.link_of.get(&(from, to)) else {
            return;
        };
        if self.links[l].epoch != link_epoch || !self.reachable(from, to) {
            self.stats.lost += 1;
            return;
        }
        let peer = self.nodes[from].peer.clone();
        let now = Timestamp(self.now);
        if let Some(r) = self.nodes[to].replica.as_mut() {
            r.handle_message(&peer, frame, now);
        }
        self.after_node(to);
    }

    fn schedule_idle_check(&mut self, l: usize) {
        if !self.links[l].idle_check_pending {
            self.links[l].idle_check_pending = true;
            self.schedule(self.derived.idle_timeout_ms, Action::IdleCheck { link: l });
        }
    }

    fn schedule_reconnect(&mut self, l: usize) {
        if !self.links[l].reconnect_pending {
            self.links[l].reconnect_pending = true;
            let (lo, hi) = self.derived.reconnect_ms;
            let delay = self.rng.random_range(lo..=hi.max(lo));
            self.schedule(delay, Action::Reconnect { link: l });
        }
    }

    fn link_works(&self, l: usize) -> bool {
        let [a, b] = self.links[l].ends;
        self.reachable(a, b) && self.reachable(b, a)
    }

    /// A link silent one way for the idle timeout is dropped by both ends (as QUIC's idle timeout
    /// would), and redialled once it works again.
    fn idle_check(&mut self, l: usize) {
        self.links[l].idle_check_pending = false;
        if self.link_works(l) && self.links[l].connected() {
            return;
        }
        let ends = self.links[l].ends;
        let mut touched = Vec::new();
        for side in 0..2 {
            let (me, other) = (ends[side], ends[1 - side]);
            if self.links[l].added[side] {
                let peer = self.nodes[other].peer.clone();
                if let Some(r) = self.nodes[me].replica.as_mut() {
                    r.remove_peer(&peer);
                    touched.push(me);
                }
                self.links[l].added[side] = false;
            }
        }
        self.links[l].epoch += 1;
        for n in touched {
            self.after_node(n);
        }
        if self.link_works(l) {
            self.schedule_reconnect(l);
        }
    }

    fn connect(&mut self, l: usize) {
        if self.links[l].connected() || !self.link_works(l) {
            return;
        }
        let ends = self.links[l].ends;
        self.links[l].epoch += 1;
        let now = Timestamp(self.now);
        for side in 0..2 {
            let (me, other) = (ends[side], ends[1 - side]);
            let peer = self.nodes[other].peer.clone();
            if let Some(r) = self.nodes[me].replica.as_mut() {
                r.add_peer(peer, now);
            }
            self.links[l].added[side] = true;
        }
        self.after_node(ends[0]);
        self.after_node(ends[1]);
    }

    // ---- partitions ----

    fn region_split_edges(&self, side: &[usize]) -> Vec<(usize, usize)> {
        let mut edges = Vec::new();
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                let ina = side.contains(&self.nodes[a].region);
                let inb = side.contains(&self.nodes[b].region);
                if ina != inb {
                    edges.push((a, b));
                }
            }
        }
        edges
    }

    fn node_edges(&self, n: usize) -> Vec<(usize, usize)> {
        (0..self.nodes.len())
            .filter(|&x| x != n)
            .flat_map(|x| [(n, x), (x, n)])
            .collect()
    }

    fn add_partition(&mut self, label: String, edges: Vec<(usize, usize)>, start: u64, end: u64) {
        let nodes: BTreeSet<usize> = edges.iter().flat_map(|&(a, b)| [a, b]).collect();
        let id = self.partitions.len();
        self.partitions.push(Partition {
            label,
            edges,
            start,
            end,
            nodes: nodes.into_iter().collect(),
            active: false,
        });
        self.schedule_at(start, Action::PartitionStart { partition: id });
        self.schedule_at(end, Action::PartitionEnd { partition: id });
    }

    fn open_partition(&mut self, label: String, edges: Vec<(usize, usize)>) -> usize {
        let nodes: BTreeSet<usize> = edges.iter().flat_map(|&(a, b)| [a, b]).collect();
        let id = self.partitions.len();
        self.partitions.push(Partition {
            label,
            edges,
            start: self.now,
            end: u64::MAX,
            nodes: nodes.into_iter().collect(),
            active: false,
        });
        self.start_partition(id);
        id
    }

    fn start_partition(&mut self, p: usize) {
        if self.partitions[p].active {
            return;
        }
        self.stats.partitions += 1;
        self.partitions[p].active = true;
        self.partitions[p].start = self.now;
        let edges = self.partitions[p].edges.clone();
        let mut links = BTreeSet::new();
        for e in edges {
            *self.blocked.entry(e).or_default() += 1;
            if let Some(&l) = self.link_of.get(&e) {
                links.insert(l);
            }
        }
        for l in links {
            self.schedule_idle_check(l);
        }
    }

    fn end_partition(&mut self, p: usize) {
        let Some(partition) = self.partitions.get_mut(p) else {
            return;
        };
        if !partition.active {
            return;
        }
        partition.active = false;
        partition.end = self.now;
        let edges = partition.edges.clone();
        let label = partition.label.clone();
        self.timeline.partitions.push((
            label.clone(),
            partition.start,
            self.now,
            partition.nodes.clone(),
        ));
        let mut links = BTreeSet::new();
        for e in edges {
            if let Some(c) = self.blocked.get_mut(&e) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.blocked.remove(&e);
                }
            }
            if let Some(&l) = self.link_of.get(&e) {
                links.insert(l);
            }
        }
        for l in links {
            if !self.links[l].connected() && self.link_works(l) {
                self.schedule_reconnect(l);
            }
        }
        self.open_tracker(format!("healed: {label}"));
    }

    /// The fault schedule of the safety phase, drawn from the seed.
    fn plan_faults(&mut self) {
        let d = self.options.duration_ms;
        let scenario = self.options.scenario;
        let classes = self.derived.fault_classes.clone();
        let partition_classes: Vec<String> = match scenario {
            Scenario::Random => classes.iter().filter(|c| *c != "crash").cloned().collect(),
            Scenario::RollingCrash => Vec::new(),
            other => vec![other.name().to_owned()],
        };
        if !partition_classes.is_empty() && self.derived.partitions_per_hour > 0.0 {
            let per_minute = self.derived.partitions_per_hour / 60.0;
            let mut t = self.exp_delay(per_minute);
            while t < d {
                let class = partition_classes
                    .choose(&mut self.rng)
                    .cloned()
                    .unwrap_or_default();
                let (lo, hi) = self.derived.partition_ms;
                let len = self.rng.random_range(lo..=hi.max(lo));
                self.plan_partition(&class, t, len);
                t += self.exp_delay(per_minute);
            }
        }
        let crashes = match scenario {
            Scenario::RollingCrash => true,
            Scenario::Random => classes.iter().any(|c| c == "crash"),
            _ => false,
        };
        if crashes && self.derived.crashes_per_hour > 0.0 {
            let per_minute = self.derived.crashes_per_hour / 60.0;
            let mut t = self.exp_delay(per_minute);
            let mut next = self.rng.random_range(0..self.nodes.len());
            while t < d {
                let node = if scenario == Scenario::RollingCrash {
                    next = (next + 1) % self.nodes.len();
                    next
                } else {
                    self.rng.random_range(0..self.nodes.len())
                };
                let (lo, hi) = self.derived.downtime_ms;
                let downtime = self.rng.random_range(lo..=hi.max(lo));
                self.schedule_at(t, Action::Crash { node, downtime });
                t += self.exp_delay(per_minute);
                if scenario == Scenario::RollingCrash {
                    t += downtime;
                }
            }
        }
    }

    fn plan_partition(&mut self, class: &str, start: u64, len: u64) {
        let regions = self.options.regions.max(1);
        let n = self.nodes.len();
        match class {
            "region-split" => {
                let mut rs: Vec<usize> = (0..regions).collect();
                rs.shuffle(&mut self.rng);
                let k = self.rng.random_range(1..=regions.div_ceil(2).max(1));
                let side: Vec<usize> = rs[..k].to_vec();
                let edges = self.region_split_edges(&side);
                self.add_partition(
                    format!("regions {side:?} cut off"),
                    edges,
                    start,
                    start + len,
                );
            }
            "node-isolation" => {
                let node = self.rng.random_range(0..n);
                let edges = self.node_edges(node);
                let label = format!("{} isolated", self.nodes[node].name);
                self.add_partition(label, edges, start, start + len);
            }
            "asymmetric" => {
                // A hears B, B does not hear A: frames from A to B are dropped.
                let (edges, label) = if self.rng.random_bool(0.5) && regions > 1 {
                    let a = self.rng.random_range(0..regions);
                    let b = (a + self.rng.random_range(1..regions)) % regions;
                    let edges = (0..n)
                        .flat_map(|x| (0..n).map(move |y| (x, y)))
                        .filter(|&(x, y)| self.nodes[x].region == a && self.nodes[y].region == b)
                        .collect();
                    (edges, format!("region {a} -/-> region {b}"))
                } else {
                    let Some(l) = (0..self.links.len())
                        .collect::<Vec<_>>()
                        .choose(&mut self.rng)
                        .copied()
                    else {
                        return;
                    };
                    let [a, b] = self.links[l].ends;
                    let (a, b) = if self.rng.random_bool(0.5) {
                        (a, b)
                    } else {
                        (b, a)
                    };
                    let label = format!("{} -/-> {}", self.nodes[a].name, self.nodes[b].name);
                    (vec![(a, b)], label)
                };
                self.add_partition(label, edges, start, start + len);
            }
            _ => {
                // Flapping link: one link goes down and up many times within the window.
                let Some(l) = (0..self.links.len())
                    .collect::<Vec<_>>()
                    .choose(&mut self.rng)
                    .copied()
                else {
                    return;
                };
                let [a, b] = self.links[l].ends;
                let one_way = self.rng.random_bool(0.3);
                let label = format!("{}~{} flapping", self.nodes[a].name, self.nodes[b].name);
                let mut t = start;
                let end = start + len.min(600_000);
                while t < end {
                    let down = self.rng.random_range(100..=5_000);
                    let up = self.rng.random_range(100..=5_000);
                    let edges = if one_way {
                        vec![(a, b)]
                    } else {
                        vec![(a, b), (b, a)]
                    };
                    self.add_partition(label.clone(), edges, t, t + down);
                    t += down + up;
                }
            }
        }
    }

    // ---- workload ----

    fn live_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&n| self.nodes[n].replica.is_some())
            .collect()
    }

    fn client_write(&mut self) {
        if self.phase != Phase::Safety {
            return;
        }
        let next = self.exp_delay(self.derived.writes_per_minute);
        self.schedule(next, Action::ClientWrite);
        let live = self.live_nodes();
        let Some(&node) = live.choose(&mut self.rng) else {
            return;
        };
        let Some(set) = self.derived.flag_sets.choose(&mut self.rng).cloned() else {
            return;
        };
        let roll: f64 = self.rng.random_range(0.0..1.0);
        if roll < self.derived.concurrent_share {
            self.concurrent_burst(&set, &live);
            return;
        }
        let keys = self.derived.flag_keys;
        let planned = if roll < self.derived.concurrent_share + self.derived.upload_share {
            let set = workload::random_set(keys, &mut self.rng);
            PlannedWrite {
                summary: format!("upload {}", set.to_value()),
                command: WriteCommand::ReplaceSet { set },
            }
        } else {
            let doc = self.nodes[node]
                .replica
                .as_ref()
                .and_then(|r| r.flag_set(&set));
            workload::random_write(doc, keys, &mut self.rng)
        };
        self.do_write(node, &set, planned);
    }

    /// Two or three nodes in different regions write the same field of one flag at one instant.
    fn concurrent_burst(&mut self, set: &str, live: &[usize]) {
        self.stats.bursts += 1;
        let mut by_region: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &n in live {
            by_region.entry(self.nodes[n].region).or_default().push(n);
        }
        let mut writers: Vec<usize> = by_region
            .values()
            .filter_map(|ns| ns.choose(&mut self.rng).copied())
            .collect();
        writers.shuffle(&mut self.rng);
        writers.truncate(self.rng.random_range(2..=3));
        let key = workload::flag_key(self.rng.random_range(0..self.derived.flag_keys));
        let which = self.rng.random_range(0..5u8);
        for n in writers {
            let flag = self.flag(n, set, &key);
            let planned = match flag {
                Some(flag) => workload::field_patch(&key, &flag, which, &mut self.rng),
                None => {
                    let flag = workload::random_flag(&mut self.rng);
                    PlannedWrite {
                        summary: format!("put /flags/{key} = {}", flag.to_value()),
                        command: WriteCommand::PutFlag {
                            key: key.clone(),
                            flag,
                        },
                    }
                }
            };
            self.do_write(n, set, planned);
        }
    }

    fn do_write(&mut self, n: usize, flag_set: &str, planned: PlannedWrite) -> bool {
        self.stats.writes_attempted += 1;
        planned.summary.hash(&mut self.trace);
        let skew = self.derived.clock_skew_ms.get(n).copied().unwrap_or(0);
        let meta = WriteMeta {
            token_id: format!("admin-region-{}", self.nodes[n].region),
            wall_time_ms: (WALL_CLOCK_BASE_MS + self.now).saturating_add_signed(skew),
            message: planned.summary.clone(),
        };
        let now = Timestamp(self.now);
        let Some(replica) = self.nodes[n].replica.as_mut() else {
            return false;
        };
        let result = replica.handle_local_write(flag_set, planned.command.into(), meta, now);
        let accepted = match result {
            Ok(id) => {
                self.stats.writes_accepted += 1;
                let record = self.writes.len();
                self.writes.push(WriteRecord {
                    node: n,
                    at: self.now,
                    flag_set: flag_set.to_owned(),
                    summary: planned.summary,
                    acked_at: None,
                    changes: Vec::new(),
                    lost_to_crash: false,
                });
                self.nodes[n].pending_writes.insert(id, record);
                if self.phase == Phase::Safety
                    && !self.options.manual
                    && self.derived.crash_after_write > 0.0
                    && self.rng.random_bool(self.derived.crash_after_write)
                {
                    let at = self.rng.random_range(0..=self.derived.fsync_ms.1);
                    let (lo, hi) = self.derived.downtime_ms;
                    let downtime = self.rng.random_range(lo..=hi.max(lo));
                    self.schedule(at, Action::Crash { node: n, downtime });
                }
                true
            }
            Err(
                ReplicaError::Invalid(_)
                | ReplicaError::FlagNotFound(_)
                | ReplicaError::Stale { .. },
            ) => {
                // Refused on its merits (e.g. a flag a concurrent merge broke): not unavailability.
                self.stats.writes_refused += 1;
                false
            }
            Err(e) => {
                let detail = format!(
                    "{} refused a write ({}): {e}",
                    self.nodes[n].name, planned.summary
                );
                self.violation(Invariant::Availability, detail);
                false
            }
        };
        accepted.hash(&mut self.trace);
        self.after_node(n);
        accepted
    }

    /// The compiled flag set of `node`, compiled anew when its heads moved (as the node swaps its
    /// snapshot on every change).
    fn compiled(&mut self, n: usize, set: &str) -> Option<(Vec<ChangeHash>, Rc<CompiledFlagSet>)> {
        let doc: &FlagSetDoc = self.nodes[n].replica.as_ref()?.flag_set(set)?;
        let heads = doc.heads();
        if let Some((h, c)) = self.nodes[n].compiled.get(set) {
            if *h == heads {
                return Some((heads, Rc::clone(c)));
            }
        }
        let compiled = Rc::new(CompiledFlagSet::compile(
            &doc.to_flagd(),
            &CompileOptions::default(),
        ));
        self.nodes[n]
            .compiled
            .insert(set.to_owned(), (heads.clone(), Rc::clone(&compiled)));
        Some((heads, compiled))
    }

    fn answers(compiled: &CompiledFlagSet, ctx: &EvaluationContext) -> Vec<(String, Resolution)> {
        compiled
            .keys()
            .map(|k| (k.to_owned(), compiled.evaluate(k, ctx)))
            .collect()
    }

    /// A random probe evaluation on a random live node; answers are compared with any other node
    /// that evaluated the same probe at the same heads.
    fn evaluate(&mut self) {
        if self.phase != Phase::Safety {
            return;
        }
        let next = self.exp_delay(self.derived.evaluations_per_minute);
        self.schedule(next, Action::Evaluate);
        let live = self.live_nodes();
        let Some(&n) = live.choose(&mut self.rng) else {
            return;
        };
        let Some(set) = self.derived.flag_sets.choose(&mut self.rng).cloned() else {
            return;
        };
        let probe = self.rng.random_range(0..self.probes.len());
        let Some((heads, compiled)) = self.compiled(n, &set) else {
            return;
        };
        let answers = Self::answers(&compiled, &self.probes[probe]);
        self.stats.evaluations += answers.len() as u64;
        self.agree(n, &set, heads, probe, answers);
    }

    fn agree(
        &mut self,
        n: usize,
        set: &str,
        heads: Vec<ChangeHash>,
        probe: usize,
        answers: Vec<(String, Resolution)>,
    ) {
        let key = (set.to_owned(), heads, probe);
        match self.agreement.get(&key) {
            Some((other, theirs)) if *theirs != answers => {
                let differing = answers
                    .iter()
                    .zip(theirs)
                    .find(|(a, b)| a != b)
                    .map(|(a, _)| a.0.clone())
                    .unwrap_or_else(|| "the flag list".to_owned());
                let detail = format!(
                    "{} and {} hold identical heads of {set} but answer probe {probe} differently ({differing})",
                    self.nodes[n].name, self.nodes[*other].name
                );
                self.violation(Invariant::EvaluationAgreement, detail);
            }
            Some(_) => {}
            None => {
                if self.agreement.len() >= AGREEMENT_CACHE {
                    self.agreement.clear();
                }
                self.agreement.insert(key, (n, answers));
            }
        }
    }

    // ---- heals and convergence ----

    fn open_tracker(&mut self, what: String) {
        let mut target: BTreeMap<String, BTreeSet<ChangeHash>> = BTreeMap::new();
        for node in &self.nodes {
            let Some(r) = node.replica.as_ref() else {
                continue;
            };
            for name in r.flag_set_names() {
                if let Some(doc) = r.flag_set(&name) {
                    target.entry(name).or_default().extend(doc.heads());
                }
            }
        }
        let heal = self.heals.len();
        self.heals.push(Heal {
            at_ms: self.now,
            what,
            converged_after_ms: None,
        });
        self.trackers.push(Tracker {
            heal,
            target: target
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect(),
            converged: vec![None; self.nodes.len()],
            done: false,
        });
        let t = self.trackers.len() - 1;
        for n in 0..self.nodes.len() {
            self.check_tracker(t, n);
        }
        self.complete_tracker(t);
    }

    fn check_trackers(&mut self, n: usize) {
        for t in 0..self.trackers.len() {
            if !self.trackers[t].done {
                self.check_tracker(t, n);
                self.complete_tracker(t);
            }
        }
    }

    fn check_tracker(&mut self, t: usize, n: usize) {
        if self.trackers[t].converged[n].is_some() {
            return;
        }
        let Some(r) = self.nodes[n].replica.as_ref() else {
            return;
        };
        let has_all = self.trackers[t].target.iter().all(|(set, hashes)| {
            r.flag_set(set).is_some_and(|doc| {
                hashes
                    .iter()
                    .all(|h| doc.automerge().get_change_meta_by_hash(h).is_some())
            })
        });
        if has_all {
            self.trackers[t].converged[n] = Some(self.now);
            let heal = self.trackers[t].heal;
            self.timeline.converged.push((n, heal, self.now));
        }
    }

    fn complete_tracker(&mut self, t: usize) {
        if self.trackers[t].done {
            return;
        }
        let live = self.live_nodes();
        if live.is_empty()
            || live
                .iter()
                .any(|&n| self.trackers[t].converged[n].is_none())
        {
            return;
        }
        let heal = self.trackers[t].heal;
        self.trackers[t].done = true;
        let at = self.heals[heal].at_ms;
        self.heals[heal].converged_after_ms = Some(self.now - at);
    }

    /// Why the cluster has not converged, or `None` when every node is up and all heads agree.
    fn divergence(&self) -> Option<String> {
        let mut names = BTreeSet::new();
        for node in &self.nodes {
            let Some(r) = node.replica.as_ref() else {
                return Some(format!("{} is down", node.name));
            };
            names.extend(r.flag_set_names());
        }
        for name in names {
            let mut seen: Option<(usize, Vec<ChangeHash>)> = None;
            for (i, node) in self.nodes.iter().enumerate() {
                let heads = node
                    .replica
                    .as_ref()
                    .and_then(|r| r.flag_set(&name))
                    .map(FlagSetDoc::heads)
                    .unwrap_or_default();
                match &seen {
                    None => seen = Some((i, heads)),
                    Some((j, h)) if *h != heads => {
                        return Some(format!(
                            "{} and {} hold different heads of {name}",
                            self.nodes[*j].name, node.name
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        None
    }

    fn begin_liveness(&mut self) {
        if self.phase != Phase::Safety {
            return;
        }
        self.phase = Phase::Liveness;
        self.liveness_started = self.now;
        self.timeline.liveness_at = self.now;
        // Writes accepted long ago and never acknowledged while their node stayed up.
        let stuck = self
            .writes
            .iter()
            .filter(|w| {
                w.acked_at.is_none()
                    && !w.lost_to_crash
                    && self.now.saturating_sub(w.at) > ACK_BOUND_MS
            })
            .count();
        if stuck > 0 {
            let detail =
                format!("{stuck} accepted write(s) were not acknowledged within {ACK_BOUND_MS} ms");
            self.violation(Invariant::Availability, detail);
        }
        for p in 0..self.partitions.len() {
            self.end_partition(p);
        }
        for n in 0..self.nodes.len() {
            if self.nodes[n].replica.is_none() {
                let delay = self.rng.random_range(0..=1_000);
                self.schedule(delay, Action::Restart { node: n });
            }
        }
        for l in 0..self.links.len() {
            if !self.links[l].connected() {
                if self.link_works(l) {
                    self.schedule_reconnect(l);
                } else {
                    self.schedule_idle_check(l);
                }
            }
        }
        self.open_tracker("final heal".to_owned());
        self.schedule(self.options.liveness_bound_ms, Action::LivenessDeadline);
    }

    // ---- final checks ----

    fn final_checks(&mut self) {
        let mut all_changes: Vec<HashMap<String, HashSet<ChangeHash>>> = Vec::new();
        // Sequence numbers count per document: key by (flag set, actor, seq).
        let mut actors: HashMap<(String, Vec<u8>, u64), ChangeHash> = HashMap::new();
        let mut reuse = None;
        for node in &self.nodes {
            let mut sets = HashMap::new();
            if let Some(r) = node.replica.as_ref() {
                for name in r.flag_set_names() {
                    let Some(doc) = r.flag_set(&name) else {
                        continue;
                    };
                    let mut hashes = HashSet::new();
                    for meta in doc.automerge().get_changes_meta(&[]) {
                        let key = (name.clone(), meta.actor.to_bytes().to_vec(), meta.seq);
                        match actors.get(&key) {
                            Some(h) if *h != meta.hash => {
                                reuse = Some((node.name.clone(), meta.seq))
                            }
                            Some(_) => {}
                            None => {
                                actors.insert(key, meta.hash);
                            }
                        }
                        hashes.insert(meta.hash);
                    }
                    sets.insert(name, hashes);
                }
            }
            all_changes.push(sets);
        }
        if let Some((node, seq)) = reuse {
            self.violation(
                Invariant::ActorReuse,
                format!("one actor made two different changes with sequence number {seq} (seen on {node})"),
            );
        }
        // Durability: every acknowledged write is on every node once converged. Without
        // convergence (a liveness failure, reported as such) it must at least not be lost: some
        // node still holds it.
        let converged = self.divergence().is_none();
        let mut lost = Vec::new();
        for w in &self.writes {
            if w.acked_at.is_none() || w.changes.is_empty() {
                continue;
            }
            let holds = |sets: &HashMap<String, HashSet<ChangeHash>>| {
                sets.get(&w.flag_set)
                    .is_some_and(|hs| w.changes.iter().all(|h| hs.contains(h)))
            };
            if converged {
                for (n, sets) in all_changes.iter().enumerate() {
                    if !holds(sets) {
                        lost.push(format!(
                            "{} (acknowledged by {} at {} ms) is missing on {}",
                            w.summary, self.nodes[w.node].name, w.at, self.nodes[n].name
                        ));
                    }
                }
            } else if !all_changes.iter().any(holds) {
                lost.push(format!(
                    "{} (acknowledged by {} at {} ms) is on no node",
                    w.summary, self.nodes[w.node].name, w.at
                ));
            }
        }
        if let Some(first) = lost.first() {
            let detail = format!("{} acknowledged write(s) missing, e.g. {first}", lost.len());
            self.violation(Invariant::Durability, detail);
        }
        // Evaluation agreement on the whole probe set among nodes with identical heads.
        for set in self.derived.flag_sets.clone() {
            for n in 0..self.nodes.len() {
                let Some((heads, compiled)) = self.compiled(n, &set) else {
                    continue;
                };
                for p in 0..self.probes.len() {
                    let answers = Self::answers(&compiled, &self.probes[p]);
                    self.stats.evaluations += answers.len() as u64;
                    self.agree(n, &set, heads.clone(), p, answers);
                }
            }
        }
        for node in &self.nodes {
            let heads: Vec<Vec<ChangeHash>> = node
                .replica
                .as_ref()
                .map(|r| {
                    r.flag_set_names()
                        .iter()
                        .filter_map(|s| r.flag_set(s).map(FlagSetDoc::heads))
                        .collect()
                })
                .unwrap_or_default();
            heads.hash(&mut self.trace);
        }
    }

    fn report(mut self) -> Report {
        if self.phase != Phase::Done {
            // Ran out of events (only with a manual run that never began liveness).
            self.final_checks();
        }
        let conflicts = self.nodes[0]
            .replica
            .as_ref()
            .map(|r| {
                r.flag_set_names()
                    .iter()
                    .filter_map(|s| r.flag_set(s))
                    .map(|d| d.conflicts().len() as u64)
                    .sum()
            })
            .unwrap_or(0);
        for w in &self.writes {
            if w.acked_at.is_none() {
                self.timeline.writes.push((w.node, w.at, false));
            }
        }
        self.timeline.end_at = self.now;
        let outcome = if self.violations.iter().any(|v| !v.invariant.is_liveness()) {
            Outcome::SafetyViolation
        } else if self.violations.is_empty() {
            Outcome::Pass
        } else {
            Outcome::LivenessViolation
        };
        Report {
            replay: self.options.replay_command(),
            options: self.options,
            derived: self.derived,
            outcome,
            violations: self.violations,
            writes_attempted: self.stats.writes_attempted,
            writes_accepted: self.stats.writes_accepted,
            writes_acknowledged: self.stats.writes_acknowledged,
            writes_refused: self.stats.writes_refused,
            concurrent_bursts: self.stats.bursts,
            conflicts,
            evaluations: self.stats.evaluations,
            messages: self.stats.messages,
            bytes: self.stats.bytes,
            messages_lost: self.stats.lost,
            messages_duplicated: self.stats.duplicated,
            crashes: self.stats.crashes,
            partitions: self.stats.partitions,
            heals: self.heals,
            final_convergence_ms: self.final_convergence,
            simulated_ms: self.now,
            trace_hash: format!("{:016x}", self.trace.finish()),
            timeline: self.timeline,
        }
    }
}
