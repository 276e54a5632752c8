//! `bunting-sim`: the simulator's command line on its own (`bunting sim` is the same, inside the
//! node binary). Exit codes: 0 pass, 10 crash, 11 safety violation, 12 liveness violation,
//! 2 bad command line.

use std::process::ExitCode;

use bunting_sim::cli::{main_with, SimArgs};
use clap::Parser;

/// Deterministic simulation of a Bunting cluster under partitions, crashes and message loss.
#[derive(Debug, Parser)]
#[command(name = "bunting-sim", version)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

fn main() -> ExitCode {
    main_with(Cli::parse().args)
}
