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
