//! A flag set compiled for evaluation: immutable, shared between threads, cheap to query.

use std::borrow::Cow;
use std::collections::HashMap;

use foldhash::fast::FixedState;
use std::sync::Arc;

use bunting_model::limits::MAX_EXPANDED_SET_NODES;
use bunting_model::{
    validate_flag, validate_stored_flag_within, Flag, FlagSet, FlagState, Problem,
};
use serde_json::{Map, Value};

use crate::budget::{exhausted_details, Exhausted};
use crate::context::EvaluationContext;
use crate::resolution::{ErrorCode, Reason, Resolution, SharedValue, TypedResolution};
use crate::rule::{Env, Outcome, Rule, Val};

/// How `fractional` maps a hash to a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FractionalBucketing {
    /// Current flagd: `(u64(murmur3_x86_32(s, 0)) * total_weight) >> 32`, exact integer arithmetic.
    #[default]
    V2,
    /// flagd before the high-precision change: `|i32(hash)| / i32::MAX` scaled to a percentage
    /// bucket 0–99, walked against each variant's percentage of the total weight. For flag sets
    /// migrated from providers that still bucket this way.
    V1,
}

/// Options fixed when a flag set is compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// The bucketing algorithm of `fractional`.
    pub fractional: FractionalBucketing,
}

/// A flag that failed validation or whose rule did not compile; it evaluates to an ERROR.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokenFlag {
    pub key: String,
    /// Every problem found, with JSON Pointers into the flag set document.
    pub problems: Vec<Problem>,
}

/// One variant of a compiled flag, with the resolution that serves it prepared in advance.
#[derive(Debug)]
struct CompiledVariant {
    key: Arc<str>,
    /// Served when targeting returns this variant's key.
    matched: Resolution,
}

// One per flag, read on every evaluation: kept inline rather than boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Body {
    /// Validated and compiled.
    Ready {
        variants: Vec<CompiledVariant>,
        /// Variant key → index, only for flags with many variants (a scan is faster for few).
        index: Option<HashMap<Box<str>, usize, FixedState>>,
        /// Served without targeting, or when it returns null.
        when_static: Resolution,
        when_default: Resolution,
        targeting: Option<Rule>,
    },
    /// Disabled: served as is, whatever the context.
    Fixed(Resolution),
}

#[derive(Debug)]
struct CompiledFlag {
    key: Arc<str>,
    body: Body,
    metadata: Arc<Map<String, Value>>,
}

/// A flag set compiled into an immutable evaluator. `Send + Sync`: share it behind an `Arc` and
/// swap the `Arc` when the flag set changes.
#[derive(Debug)]
pub struct CompiledFlagSet {
    /// Sorted by key, so bulk evaluation answers in key order.
    flags: Vec<CompiledFlag>,
    /// Key → index into `flags`, found by the key's 64-bit hash and confirmed by comparing keys
    /// (a fixed-seed fast hasher: keys come from admins, and the index is rebuilt on every change).
    by_key: KeyIndex,
    broken: Vec<BrokenFlag>,
    /// Served with FLAG_NOT_FOUND.
    set_metadata: Arc<Map<String, Value>>,
    options: CompileOptions,
}

const SMALL_VARIANT_COUNT: usize = 16;

/// Flag key → position: an open-addressed table of key hashes, at most half full, probed
/// linearly; a hash match is confirmed by comparing the key, so keys whose hashes collide still
/// each find their own position.
#[derive(Debug)]
struct KeyIndex {
    /// `(hash, position + 1)`; 0 marks an empty slot. The length is a power of two.
    slots: Box<[(u64, u32)]>,
}

impl KeyIndex {
    fn new<'k>(keys: impl Iterator<Item = &'k str>) -> KeyIndex {
        Self::with_hash(keys, Self::hash)
    }

    /// The table with keys hashed by `hash` (tests use it to force collisions).
    fn with_hash<'k>(keys: impl Iterator<Item = &'k str>, hash: fn(&str) -> u64) -> KeyIndex {
        let keys: Vec<&str> = keys.collect();
        let len = (keys.len() * 2).next_power_of_two().max(2);
        let mut slots = vec![(0u64, 0u32); len].into_boxed_slice();
        let mask = len - 1;
        // A flag set holds far fewer than u32::MAX flags (the model's limit).
        for (i, key) in keys.iter().enumerate().take(u32::MAX as usize - 1) {
            let h = hash(key);
            let mut at = h as usize & mask;
            while slots[at].1 != 0 {
                at = (at + 1) & mask;
            }
            slots[at] = (h, i as u32 + 1);
        }
        KeyIndex { slots }
    }

    #[inline]
    fn hash(key: &str) -> u64 {
        use std::hash::BuildHasher;
        FixedState::default().hash_one(key)
    }

    /// The position of `key`; `key_at` gives the key stored at a position, to confirm a match.
    #[inline]
    fn get<'s>(&self, key: &str, key_at: impl Fn(usize) -> &'s str) -> Option<usize> {
        self.get_hashed(Self::hash(key), key, key_at)
    }

    /// [`KeyIndex::get`] for a key whose hash (as the table was built with) is `h`.
    #[inline]
    fn get_hashed<'s>(
        &self,
        h: u64,
        key: &str,
        key_at: impl Fn(usize) -> &'s str,
    ) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut at = h as usize & mask;
        // The table is at most half full, so an empty slot ends every probe.
        loop {
            let &(slot_hash, pos) = self.slots.get(at)?;
            if pos == 0 {
                return None;
            }
            let i = pos as usize - 1;
            if slot_hash == h && crate::val::str_eq(key_at(i), key) {
                return Some(i);
            }
            at = (at + 1) & mask;
        }
    }
}

impl CompiledFlagSet {
    /// Compiles every flag. Never fails: a flag that does not validate, or whose rule does not
    /// compile, becomes a deterministic ERROR resolution and is listed by
    /// [`CompiledFlagSet::broken_flags`].
    pub fn compile(set: &FlagSet, options: &CompileOptions) -> CompiledFlagSet {
        let set_metadata = Arc::new(set.metadata.clone());
        let mut flags = Vec::with_capacity(set.flags.len());
        let mut broken = Vec::new();
        // Rule nodes expanded so far: past the flag set's limit no more rules are expanded, so a
        // set that grew past it (concurrent writes, each within it) costs bounded work.
        let mut set_nodes = 0usize;
        for (key, flag) in &set.flags {
            let mut metadata = set.metadata.clone();
            for (k, v) in &flag.metadata {
                metadata.insert(k.clone(), v.clone());
            }
            let metadata = Arc::new(metadata);
            let left = MAX_EXPANDED_SET_NODES.saturating_sub(set_nodes);
            let problems = if left == 0 && flag.targeting.is_some() {
                set_limit_problems(key, flag, &set.evaluators)
            } else {
                let (problems, nodes) =
                    validate_stored_flag_within(key, flag, &set.evaluators, left);
                set_nodes = set_nodes.saturating_add(nodes);
                if nodes > left {
                    set_limit_problems(key, flag, &set.evaluators)
                } else {
                    problems
                }
            };
            let body = if problems.is_empty() {
                match compile_flag(key, flag, set, options, &metadata) {
                    Ok(body) => body,
                    Err(problem) => {
                        let r = broken_resolution(flag, std::slice::from_ref(&problem), &metadata);
                        broken.push(BrokenFlag {
                            key: key.clone(),
                            problems: vec![problem],
                        });
                        Body::Fixed(r)
                    }
                }
            } else {
                let r = broken_resolution(flag, &problems, &metadata);
                broken.push(BrokenFlag {
                    key: key.clone(),
                    problems,
                });
                Body::Fixed(r)
            };
            flags.push(CompiledFlag {
                key: Arc::from(key.as_str()),
                body,
                metadata,
            });
        }
        flags.sort_by(|a, b| a.key.cmp(&b.key));
        broken.sort_by(|a, b| a.key.cmp(&b.key));
        let by_key = KeyIndex::new(flags.iter().map(|f| &*f.key));
        CompiledFlagSet {
            flags,
            by_key,
            broken,
            set_metadata,
            options: options.clone(),
        }
    }

    /// Flags that evaluate to ERROR because they are invalid, with their problems; sorted by key.
    pub fn broken_flags(&self) -> &[BrokenFlag] {
        &self.broken
    }

    /// Number of flags, broken ones included.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Flag keys in key order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.flags.iter().map(|f| &*f.key)
    }

    pub fn contains(&self, flag_key: &str) -> bool {
        self.by_key.get(flag_key, |i| &self.flags[i].key).is_some()
    }

    /// The flag set's own metadata.
    pub fn metadata(&self) -> &Map<String, Value> {
        &self.set_metadata
    }

    pub fn options(&self) -> &CompileOptions {
        &self.options
    }

    /// Evaluates one flag.
    pub fn evaluate(&self, flag_key: &str, ctx: &EvaluationContext) -> Resolution {
        self.evaluate_ref(flag_key, ctx).into_owned()
    }

    /// Evaluates one flag, borrowing the resolution from the compiled set when it was prepared
    /// at compile time (every success, disabled and invalid flag): the hot path of a server,
    /// which serialises the resolution and drops it, touches no reference count.
    pub fn evaluate_ref(&self, flag_key: &str, ctx: &EvaluationContext) -> Cow<'_, Resolution> {
        match self.by_key.get(flag_key, |i| &self.flags[i].key) {
            Some(i) => self.flags[i].evaluate(ctx),
            None => Cow::Owned(self.not_found(flag_key)),
        }
    }

    /// FLAG_NOT_FOUND for `flag_key`; out of line, so the found path stays short.
    #[cold]
    #[inline(never)]
    fn not_found(&self, flag_key: &str) -> Resolution {
        Resolution::error(
            ErrorCode::FlagNotFound,
            format!("flag {flag_key:?} is not in this flag set"),
            self.set_metadata.clone(),
        )
    }

    /// [`CompiledFlagSet::evaluate`] with the targeting result looked up by name, never by the
    /// variant found at compile time: what the fast path must agree with.
    #[cfg(test)]
    pub(crate) fn evaluate_by_name(&self, flag_key: &str, ctx: &EvaluationContext) -> Resolution {
        match self.by_key.get(flag_key, |i| &self.flags[i].key) {
            Some(i) => self.flags[i].evaluate_by_name(ctx).into_owned(),
            None => self.evaluate(flag_key, ctx),
        }
    }

    /// Evaluates every flag, in key order (OFREP bulk evaluation). Disabled and broken flags are
    /// included, with reason DISABLED and ERROR.
    pub fn evaluate_all(&self, ctx: &EvaluationContext) -> Vec<(&str, Resolution)> {
        self.flags
            .iter()
            .map(|f| (&*f.key, f.evaluate(ctx).into_owned()))
            .collect()
    }

    /// [`CompiledFlagSet::evaluate_all`] with borrowed resolutions, as
    /// [`CompiledFlagSet::evaluate_ref`].
    pub fn evaluate_all_ref(&self, ctx: &EvaluationContext) -> Vec<(&str, Cow<'_, Resolution>)> {
        self.flags
            .iter()
            .map(|f| (&*f.key, f.evaluate(ctx)))
            .collect()
    }

    /// Evaluates a boolean flag; any other type is TYPE_MISMATCH.
    pub fn evaluate_boolean(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> TypedResolution<bool> {
        TypedResolution::from_resolution(self.evaluate(flag_key, ctx), "boolean", Value::as_bool)
    }

    /// Evaluates a string flag; any other type is TYPE_MISMATCH.
    pub fn evaluate_string(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> TypedResolution<String> {
        TypedResolution::from_resolution(self.evaluate(flag_key, ctx), "string", |v| {
            v.as_str().map(str::to_owned)
        })
    }

    /// Evaluates an integer flag: a number without a fractional part that fits an `i64`; any
    /// other value is TYPE_MISMATCH.
    pub fn evaluate_integer(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> TypedResolution<i64> {
        TypedResolution::from_resolution(self.evaluate(flag_key, ctx), "integer", |v| {
            v.as_i64().or_else(|| {
                let f = v.as_f64()?;
                (f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64)
                    .then_some(f as i64)
            })
        })
    }

    /// Evaluates a number flag as a float; any other type is TYPE_MISMATCH.
    pub fn evaluate_float(&self, flag_key: &str, ctx: &EvaluationContext) -> TypedResolution<f64> {
        TypedResolution::from_resolution(self.evaluate(flag_key, ctx), "float", Value::as_f64)
    }

    /// Evaluates an object flag (a JSON object or array); any other type is TYPE_MISMATCH.
    pub fn evaluate_object(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> TypedResolution<SharedValue> {
        let r = self.evaluate(flag_key, ctx);
        let shared = r.value.clone();
        TypedResolution::from_resolution(r, "object", |v| {
            matches!(v, Value::Object(_) | Value::Array(_))
                .then_some(shared)
                .flatten()
        })
    }
}

impl CompiledFlag {
    #[inline]
    fn evaluate(&self, ctx: &EvaluationContext) -> Cow<'_, Resolution> {
        let (variants, index, when_static, when_default, targeting) = match &self.body {
            Body::Fixed(r) => return Cow::Borrowed(r),
            Body::Ready {
                variants,
                index,
                when_static,
                when_default,
                targeting,
                ..
            } => (variants, index, when_static, when_default, targeting),
        };
        let Some(rule) = targeting else {
            return Cow::Borrowed(when_static);
        };
        let env = Env::new(&self.key, ctx);
        match rule.outcome(&env) {
            Outcome::Variant(i) => match variants.get(i) {
                Some(v) => Cow::Borrowed(&v.matched),
                None => Cow::Borrowed(when_default),
            },
            Outcome::Default => Cow::Borrowed(when_default),
            Outcome::Value(v) => self.by_name(&v, variants, index, when_default),
            Outcome::Exhausted(kind, site) => Cow::Owned(self.over_budget(kind, site)),
        }
    }

    /// The ERROR resolution of an evaluation that ran out of budget at `site` (a pointer below
    /// the flag's targeting).
    #[cold]
    #[inline(never)]
    fn over_budget(&self, kind: Exhausted, site: &str) -> Resolution {
        let at = format!(
            "{}{site}",
            bunting_model::pointer(["flags", &*self.key, "targeting"])
        );
        Resolution::error(
            ErrorCode::General,
            exhausted_details(kind, &at),
            self.metadata.clone(),
        )
    }

    /// The resolution for a targeting result that names its variant by value.
    #[inline(never)]
    fn by_name<'s>(
        &'s self,
        result: &Val<'_>,
        variants: &'s [CompiledVariant],
        index: &Option<HashMap<Box<str>, usize, FixedState>>,
        when_default: &'s Resolution,
    ) -> Cow<'s, Resolution> {
        let Some(name) = result.variant_key() else {
            return Cow::Borrowed(when_default);
        };
        let found = match index {
            Some(ix) => ix.get(&*name).map(|&i| &variants[i]),
            None => variants.iter().find(|v| crate::val::str_eq(&v.key, &name)),
        };
        match found {
            Some(v) => Cow::Borrowed(&v.matched),
            None => Cow::Owned(Resolution::error(
                ErrorCode::General,
                format!(
                    "targeting of flag {:?} returned {name:?}, which is not one of its variants",
                    &*self.key
                ),
                self.metadata.clone(),
            )),
        }
    }

    /// [`CompiledFlag::evaluate`] the long way: the rule's value, looked up by name.
    #[cfg(test)]
    fn evaluate_by_name(&self, ctx: &EvaluationContext) -> Cow<'_, Resolution> {
        match &self.body {
            Body::Ready {
                variants,
                index,
                when_default,
                targeting: Some(rule),
                ..
            } => {
                let env = Env::new(&self.key, ctx);
                self.by_name(&rule.evaluate(&env), variants, index, when_default)
            }
            _ => self.evaluate(ctx),
        }
    }
}

/// flagd's answer for a disabled flag: success with reason DISABLED, no value, no variant.
fn disabled_resolution(metadata: &Arc<Map<String, Value>>) -> Resolution {
    Resolution {
        value: None,
        variant: None,
        reason: Reason::Disabled,
        error_code: None,
        error_details: None,
        metadata: metadata.clone(),
    }
}

/// The problems of a flag whose rule comes after its flag set's rules passed
/// [`MAX_EXPANDED_SET_NODES`]: the rule is neither expanded nor compiled.
fn set_limit_problems(
    key: &str,
    flag: &Flag,
    evaluators: &indexmap::IndexMap<String, Value>,
) -> Vec<Problem> {
    let without_rule = Flag {
        targeting: None,
        ..flag.clone()
    };
    let mut problems = validate_flag(key, &without_rule, evaluators);
    problems.push(Problem::new(
        bunting_model::pointer(["flags", key, "targeting"]),
        format!(
            "the flag set's rules expand to more than {MAX_EXPANDED_SET_NODES} nodes \
             (MAX_EXPANDED_SET_NODES); this rule was not compiled"
        ),
    ));
    problems
}

fn compile_flag(
    key: &str,
    flag: &Flag,
    set: &FlagSet,
    options: &CompileOptions,
    metadata: &Arc<Map<String, Value>>,
) -> Result<Body, Problem> {
    if flag.state == FlagState::Disabled {
        return Ok(Body::Fixed(disabled_resolution(metadata)));
    }
    let variants: Vec<CompiledVariant> = flag
        .variants
        .iter()
        .map(|(k, v)| {
            let key: Arc<str> = Arc::from(k.as_str());
            CompiledVariant {
                matched: Resolution {
                    value: Some(SharedValue::new(v.clone())),
                    variant: Some(key.clone()),
                    reason: Reason::TargetingMatch,
                    error_code: None,
                    error_details: None,
                    metadata: metadata.clone(),
                },
                key,
            }
        })
        .collect();
    let default = flag
        .default_variant
        .key()
        .and_then(|d| variants.iter().find(|v| &*v.key == d));
    let with_reason = |reason| match default {
        Some(v) => Resolution {
            reason,
            ..v.matched.clone()
        },
        None => Resolution {
            value: None,
            variant: None,
            reason: Reason::Default,
            error_code: None,
            error_details: None,
            metadata: metadata.clone(),
        },
    };
    let when_static = with_reason(Reason::Static);
    let when_default = with_reason(Reason::Default);
    let variant_keys: Vec<&str> = variants.iter().map(|v| &*v.key).collect();
    let targeting = match flag.effective_targeting() {
        None => None,
        Some(rule) => Some(
            Rule::compile_for_flag(rule, &set.evaluators, options, &variant_keys).map_err(
                |message| {
                    Problem::new(bunting_model::pointer(["flags", key, "targeting"]), message)
                },
            )?,
        ),
    };
    let index = (variants.len() > SMALL_VARIANT_COUNT).then(|| {
        variants
            .iter()
            .enumerate()
            .map(|(i, v)| (Box::from(&*v.key), i))
            .collect()
    });
    Ok(Body::Ready {
        variants,
        index,
        when_static,
        when_default,
        targeting,
    })
}

/// The resolution of an invalid flag: PARSE_ERROR when its targeting is at fault, else GENERAL.
/// A disabled flag stays DISABLED however broken it is: a kill switch must hold even when a
/// concurrent edit elsewhere broke the flag (it is still listed as broken).
fn broken_resolution(
    flag: &Flag,
    problems: &[Problem],
    metadata: &Arc<Map<String, Value>>,
) -> Resolution {
    if flag.state == FlagState::Disabled {
        return disabled_resolution(metadata);
    }
    let code = if problems
        .iter()
        .all(|p| p.pointer.contains("/targeting") || p.pointer.contains("/$evaluators"))
    {
        ErrorCode::ParseError
    } else {
        ErrorCode::General
    };
    let details = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Resolution::error(code, format!("invalid flag: {details}"), metadata.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_index_finds_every_key_even_when_hashes_collide() {
        let keys: Vec<String> = (0..50).map(|i| format!("flag-{i}")).collect();
        let normal = KeyIndex::new(keys.iter().map(String::as_str));
        // Every key hashes alike, or every other key does: the collision path must still work.
        let all_same = KeyIndex::with_hash(keys.iter().map(String::as_str), |_| 7);
        let some_same =
            KeyIndex::with_hash(keys.iter().map(String::as_str), |k| (k.len() % 2) as u64);
        let hashes: [fn(&str) -> u64; 3] = [KeyIndex::hash, |_| 7, |k| (k.len() % 2) as u64];
        for (index, hash) in [normal, all_same, some_same].iter().zip(hashes) {
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(index.get_hashed(hash(k), k, |j| &keys[j]), Some(i), "{k}");
            }
            for absent in ["flag-50", ""] {
                assert_eq!(index.get_hashed(hash(absent), absent, |j| &keys[j]), None);
            }
        }
    }
}
