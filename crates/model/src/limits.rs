//! Size and depth limits of a flag set, enforced by validation and by every layer above it.
//!
//! They exist so that one bad or hostile upload cannot exhaust a node's memory or stack, and so that
//! every region agrees on what is acceptable (the limits are part of validation, which is
//! deterministic).

/// Largest flagd document accepted, in bytes of JSON text (4 MiB: 10,000 flags of ~400 bytes).
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// Largest encoded change (one Automerge change, as stored and gossiped) that a valid write can
/// make, in bytes. A change holds at most one flag (a whole-set upload writes one change per
/// flag) or the set-level entries, each within [`MAX_DOCUMENT_BYTES`] of JSON text; the encoding
/// adds keys, the actor, the dependencies and the audit record, far under a quarter more. Every
/// store backend keeps records of this size (`bunting_store::Limits`) and gossip frames are
/// larger, so whatever the API accepts, the store can store and the peers can receive.
pub const MAX_CHANGE_BYTES: usize = MAX_DOCUMENT_BYTES + MAX_DOCUMENT_BYTES / 4;

/// Most flags in one flag set (DESIGN.md §2 plans for 10,000; twice that is allowed).
pub const MAX_FLAGS: usize = 20_000;

/// Most variants in one flag.
pub const MAX_VARIANTS: usize = 1_000;

/// Deepest nesting of a targeting rule, counted in JSON objects and arrays (after `$ref` expansion).
pub const MAX_RULE_DEPTH: usize = 32;

/// Most operations and values in one targeting rule after `$ref` expansion: evaluators that use
/// each other repeatedly expand exponentially, and every rule is compiled on every node.
pub const MAX_EXPANDED_RULE_NODES: usize = 100_000;

/// Deepest nesting of any JSON value accepted from outside (bodies, variant values, contexts).
pub const MAX_JSON_DEPTH: usize = 64;

/// Longest flag key, in bytes.
pub const MAX_FLAG_KEY_BYTES: usize = 256;

/// Most `$evaluators` entries.
pub const MAX_EVALUATORS: usize = 1_000;

/// Most metadata entries on a flag or on the flag set.
pub const MAX_METADATA_ENTRIES: usize = 100;

/// Most rule nodes after `$ref` expansion summed over every rule of one flag set (targeting and
/// `$evaluators`): 1,000,000. Ten times the per-rule limit, and as many as 10,000 flags (the
/// plan, DESIGN.md §2) of 100 operations each. The per-rule limit alone let 1,000 small flags
/// that each reference one exponentially expanding evaluator make a ~300 KB upload cost 40 million
/// nodes (minutes of compiling and gigabytes on every node); validation stops expanding as soon as
/// the running sum passes this limit, and the engine compiles no more than this many nodes a set.
pub const MAX_EXPANDED_SET_NODES: usize = 1_000_000;

/// Largest evaluation context a rule is checked against, in bytes of JSON: 256 KiB, the OFREP
/// request body limit (the node's default `max_evaluation_body_bytes`). Validation refuses a rule
/// whose worst-case cost for a context this large exceeds the evaluation budget; the runtime budget
/// still holds for larger contexts (an operator may raise the body limit).
pub const MAX_CONTEXT_BYTES: usize = 256 * 1024;

/// Steps one evaluation of one flag may take: 4,000,000. A step is about one rule node evaluated,
/// one element copied or scanned, or [`BUDGET_BYTES_PER_STEP`] bytes of text built (a few
/// nanoseconds each), so an evaluation ends within tens of milliseconds at worst (measured:
/// see the engine's README), never seconds. It lets one `map`/`some`/`all` with a body of up to
/// about 30 nodes run over the largest context's array (131,072 elements); an iteration nested
/// in another over context data does not fit, and validation says so.
pub const MAX_EVALUATION_STEPS: u64 = 4_000_000;

/// Bytes one evaluation of one flag may allocate for the values it builds (arrays from `merge`,
/// `map` and `filter`, text from `cat` and `substr`, copies of the context): 16 MiB, a few times
/// the largest context's worth of values. Counted cumulatively, so it bounds both peak memory and
/// allocation work; without it one 200 KB request made a node allocate 3.2 GB and abort.
pub const MAX_EVALUATION_BYTES: u64 = 16 * 1024 * 1024;

/// Cost model shared by validation and the engine: bytes charged for each value an operation
/// builds or copies (the size of an evaluation value).
pub const BUDGET_VALUE_BYTES: u64 = 32;

/// Cost model shared by validation and the engine: bytes of text built or scanned per step.
pub const BUDGET_BYTES_PER_STEP: u64 = 64;
