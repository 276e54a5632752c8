//! Evaluates one flag of a flagd file and prints the OFREP-shaped resolution as JSON.
//!
//! `cargo run -p bunting-engine --example evaluate -- FILE FLAG ['{"targetingKey":"u1"}'] [UNIX_SECONDS]`
//! The timestamp (for `$flagd.timestamp`) defaults to 0 unless given: the engine never reads the
//! clock, and this example keeps its output reproducible.

use std::process::ExitCode;

use bunting_engine::{CompileOptions, CompiledFlagSet, EvaluationContext};
use bunting_model::FlagSet;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(flag)) = (args.first(), args.get(1)) else {
        eprintln!("usage: evaluate FILE FLAG [CONTEXT_JSON] [UNIX_SECONDS]");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let set = match FlagSet::from_json_str(&text) {
        Ok(s) => s,
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("{path}: {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    let context: serde_json::Value = match args.get(2) {
        Some(c) => match serde_json::from_str(c) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("context is not JSON: {e}");
                return ExitCode::from(2);
            }
        },
        None => serde_json::Value::Null,
    };
    let timestamp = match args.get(3).map(|t| t.parse::<i64>()) {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            eprintln!("timestamp is not an integer: {e}");
            return ExitCode::from(2);
        }
    };
    let ctx = match EvaluationContext::from_value(&context, timestamp) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
    let resolution = compiled.evaluate(flag, &ctx);
    println!(
        "{}",
        serde_json::to_string_pretty(&resolution.to_ofrep_json(flag)).unwrap_or_default()
    );
    ExitCode::SUCCESS
}
