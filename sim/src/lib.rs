//! Bunting's deterministic simulator: whole clusters of the real [`bunting_replica::Replica`] on
//! one thread, with a simulated clock, network and disks, and checkers that sit outside the system
//! under test.
//!
//! Owns: the event loop ([`Simulation`]), the seeded derivation of every option and fault
//! ([`Options`], [`Derived`]), the network model (latency per region pair, loss, duplication,
//! reordering, partitions that open and heal, connection timeouts and reconnects), simulated
//! disks ([`bunting_store::MemoryStore`] through the `Store` trait, with fsync delays; a crash
//! loses what was not yet persisted), the admin workload and probe evaluations, the invariant
//! checks ([`Invariant`]) and the reports, sweeps and SVG timelines built from them.
//!
//! Never does: read the wall clock, use randomness not derived from the seed, open sockets or
//! files (except the CLI writing the report and plot it was asked for), or reach into a replica's
//! internals — it sees nodes only through the replica's public API, as a node binary would.
//!
//! A seed is a run: `Simulation::new(Options::new(seed)).run()` yields the same [`Report`] and
//! trace hash every time, and a failing report carries the command that replays it.

pub mod cli;
mod options;
mod plot;
mod report;
mod sim;
mod sweep;
mod workload;

pub use options::{Derived, FaultRates, Options, PlantedBug, Scenario};
pub use plot::timeline_svg;
pub use report::{percentile, Heal, Invariant, Outcome, Report, Timeline, Violation};
pub use sim::{stored_flag_sets, Simulation};
pub use sweep::{run_seed, SweepSummary};
pub use workload::{probe_contexts, PROBE_TIMESTAMP};

/// Everything that can go wrong in the simulator's own plumbing (not in the system under test:
/// those findings are [`Violation`]s in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value that cannot be used.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// Writing the report or the plot failed.
    #[error("could not write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
