//! Bunting's evaluation engine.
//!
//! Owns: compiling a flag set ([`bunting_model::FlagSet`]) into an immutable, `Send + Sync`
//! [`CompiledFlagSet`], and evaluating its flags against an [`EvaluationContext`] with flagd's
//! exact semantics — JsonLogic plus flagd's `fractional`, `sem_ver`, `starts_with` and `ends_with`,
//! the `$flagd` context enrichment, and OpenFeature [`Resolution`]s (value, variant, reason, error
//! code, metadata). Fractional bucketing is bit-identical to flagd's, so a user lands in the same
//! bucket on Bunting as on flagd.
//!
//! Never does: I/O, clock reads (the caller passes the timestamp `$flagd.timestamp` shows),
//! threads, randomness, or panics on any flag set or context. An invalid flag compiles into an
//! ERROR resolution instead of failing the whole set.

mod budget;
mod compiled;
mod context;
mod error;
mod fractional;
#[cfg(test)]
mod proptests;
mod resolution;
mod rule;
mod semver;
mod val;

pub use compiled::{BrokenFlag, CompileOptions, CompiledFlagSet, FractionalBucketing};
pub use context::EvaluationContext;
pub use error::EngineError;
pub use resolution::{ErrorCode, Reason, Resolution, SharedValue, TypedResolution};
