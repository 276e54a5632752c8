//! Bunting's flag model: the flagd flag-definition document.
//!
//! Owns: the types of a flag set ([`FlagSet`], [`Flag`]), parsing them from flagd JSON (the map form
//! and the array form of `flags`), serialising them back without loss, and validation that reports
//! every problem at once, each with a JSON Pointer ([`Problem`]). Also owns the size and depth
//! [`limits`] every other layer enforces, and the list of targeting [`OPERATORS`].
//!
//! Never does: I/O, clock reads, evaluation (that is `bunting-engine`), or replication.

mod cost;
mod flagset;
pub mod json;
pub mod limits;
mod problem;
mod validate;

pub use flagset::{DefaultVariant, Flag, FlagSet, FlagState, FlagsForm};
pub use problem::{pointer, Problem, Problems};
pub use validate::{
    is_valid_flag_key, rule_depth, validate_flag, validate_flag_within,
    validate_stored_flag_within, VariantType,
};

/// Every targeting operation the engine implements: JsonLogic's and flagd's custom ones.
///
/// Validation rejects a rule that uses any other operator, so a typo is reported when the flag is
/// written rather than as an ERROR resolution later.
pub const OPERATORS: &[&str] = &[
    // data access
    "var",
    "missing",
    "missing_some",
    // logic
    "if",
    "?:",
    "==",
    "===",
    "!=",
    "!==",
    "!",
    "!!",
    "or",
    "and",
    // comparison
    "<",
    "<=",
    ">",
    ">=",
    // arithmetic
    "+",
    "-",
    "*",
    "/",
    "%",
    "min",
    "max",
    // strings and arrays
    "in",
    "cat",
    "substr",
    "merge",
    "map",
    "filter",
    "reduce",
    "all",
    "none",
    "some",
    // flagd
    "fractional",
    "sem_ver",
    "starts_with",
    "ends_with",
];
