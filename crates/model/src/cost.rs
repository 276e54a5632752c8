//! The worst-case cost of evaluating a targeting rule, for contexts up to
//! [`MAX_CONTEXT_BYTES`]: validation refuses a rule that could exceed the evaluation budget.
//!
//! The model follows what the engine charges at run time ([`crate::limits`]): per element an
//! iterating operation visits (its body's node count plus one), per element `merge` copies or
//! `in` scans, per byte `cat` and `substr` build, per value copied out of the context. Sizes are
//! counted in units of at least one per byte of text and two per array element, so a value read
//! from the context is at most [`MAX_CONTEXT_BYTES`] units, and an array of `n` units has at most
//! `n / 2` elements. Inside an iterating operation a `var` reads one element; the elements
//! together are no bigger than the array, so each counts as two units (amortised), and the
//! body's cost times the element count bounds the whole. Nested iterations over context data
//! therefore multiply, and a single one with a small body does not.
//!
//! Not modelled (the run-time budget still bounds them, with an ERROR for that request): text
//! made of an array or object by a comparison or arithmetic, and scans of long strings by
//! comparisons. A reduce body is costed with an accumulator as large as the data and the initial
//! value together.

use std::collections::HashSet;

use indexmap::IndexMap;
use serde_json::Value;

use crate::limits::{
    BUDGET_BYTES_PER_STEP as BPS, BUDGET_VALUE_BYTES as VB, MAX_CONTEXT_BYTES,
    MAX_EVALUATION_BYTES, MAX_EVALUATION_STEPS,
};
use crate::problem::{pointer, Problem};

/// Units of the largest value a context can hold.
const C: u64 = MAX_CONTEXT_BYTES as u64;

/// Copying the whole context (`{"var": ""}`): a value per two bytes, and the text.
const CONTEXT_COPY_BYTES: u64 = C / 2 * VB + C;

/// Refuses `rule` (at `at`) when its worst case is over the evaluation budget, naming the
/// innermost operation that alone is.
pub(crate) fn check_cost(
    rule: &Value,
    at: &str,
    evaluators: &IndexMap<String, Value>,
    problems: &mut Vec<Problem>,
) {
    let mut w = CostWalker {
        evaluators,
        visiting: HashSet::new(),
        path: Vec::new(),
        culprit: None,
    };
    let est = w.est(rule, Scope::Root);
    if !est.over_budget() {
        return;
    }
    let (here, est) = w.culprit.unwrap_or((String::new(), est));
    let what = if est.steps > MAX_EVALUATION_STEPS {
        format!(
            "could take {} steps for a context of {MAX_CONTEXT_BYTES} bytes; the budget is \
             {MAX_EVALUATION_STEPS} (MAX_EVALUATION_STEPS)",
            shown(est.steps)
        )
    } else {
        format!(
            "could allocate {} bytes for a context of {MAX_CONTEXT_BYTES} bytes; the budget is \
             {MAX_EVALUATION_BYTES} (MAX_EVALUATION_BYTES)",
            shown(est.bytes)
        )
    };
    problems.push(Problem::new(
        format!("{at}{here}"),
        format!(
            "evaluating this {what}: iterate over context data at most once, with a smaller \
             body, or copy less of it"
        ),
    ));
}

fn shown(n: u64) -> String {
    if n == u64::MAX {
        "unboundedly many".into()
    } else {
        format!("up to {n}")
    }
}

/// What a `var` reads.
#[derive(Clone, Copy)]
enum Scope {
    /// The context.
    Root,
    /// One element of an iterated array.
    Item,
    /// `current` and `accumulator` of a reduce, the accumulator at most this many units.
    Reduce(u64),
}

/// Upper bounds for one expression: the size of its value in units, the steps and bytes it
/// charges, and its node count (as validation counts nodes: what one element costs an iterating
/// operation whose body it is).
#[derive(Debug, Clone, Copy, Default)]
struct Est {
    size: u64,
    steps: u64,
    bytes: u64,
    nodes: u64,
}

impl Est {
    fn over_budget(&self) -> bool {
        self.steps > MAX_EVALUATION_STEPS || self.bytes > MAX_EVALUATION_BYTES
    }

    fn add_costs(&mut self, other: &Est) {
        self.steps = self.steps.saturating_add(other.steps);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.nodes = self.nodes.saturating_add(other.nodes);
    }
}

/// Elements in a value of `size` units (one at least: a scalar costs a step where an array would).
fn elems(size: u64) -> u64 {
    (size / 2).max(1)
}

struct CostWalker<'a> {
    evaluators: &'a IndexMap<String, Value>,
    visiting: HashSet<&'a str>,
    /// Pointer segments of the node being estimated.
    path: Vec<String>,
    /// The innermost operation over budget on its own, with its estimate.
    culprit: Option<(String, Est)>,
}

impl<'a> CostWalker<'a> {
    fn est_at(&mut self, segment: impl ToString, v: &'a Value, scope: Scope) -> Est {
        self.path.push(segment.to_string());
        let e = self.est(v, scope);
        self.path.pop();
        e
    }

    fn est(&mut self, v: &'a Value, scope: Scope) -> Est {
        match v {
            Value::Array(items) => {
                let mut e = Est {
                    size: 1,
                    nodes: 1,
                    ..Est::default()
                };
                let mut logic = false;
                for (i, item) in items.iter().enumerate() {
                    let c = self.est_at(i, item, scope);
                    logic |= is_op(item);
                    e.size = e.size.saturating_add(c.size.saturating_add(1));
                    e.add_costs(&c);
                }
                if logic {
                    // Evaluated element by element into a new list.
                    e.bytes = e
                        .bytes
                        .saturating_add((items.len() as u64).saturating_mul(VB));
                }
                e
            }
            Value::Object(obj) if obj.len() == 1 => {
                let Some((op, args)) = obj.iter().next() else {
                    return Est::default();
                };
                if op == "$ref" {
                    return self.expand(args, scope);
                }
                self.path.push(op.clone());
                let e = self.op(op, args, scope);
                if e.over_budget() && self.culprit.is_none() {
                    self.culprit = Some((pointer(self.path.iter()), e));
                }
                self.path.pop();
                e
            }
            // Literal objects: "[object Object]" as text; their members count as nodes.
            Value::Object(obj) => Est {
                size: 15,
                nodes: 1 + obj.values().map(count_nodes).sum::<u64>(),
                ..Est::default()
            },
            Value::String(s) => Est {
                size: (s.len() as u64).max(1),
                nodes: 1,
                ..Est::default()
            },
            _ => Est {
                size: 1,
                nodes: 1,
                ..Est::default()
            },
        }
    }

    fn expand(&mut self, name: &'a Value, scope: Scope) -> Est {
        let Some((name, target)) = name.as_str().and_then(|n| self.evaluators.get_key_value(n))
        else {
            return Est::default();
        };
        if !self.visiting.insert(name.as_str()) {
            return Est::default();
        }
        self.path.push("$ref".into());
        let e = self.est(target, scope);
        self.path.pop();
        self.visiting.remove(name.as_str());
        e
    }

    fn op(&mut self, op: &str, args: &'a Value, scope: Scope) -> Est {
        // JsonLogic passes a lone non-array argument as a one-element list.
        let (items, listed): (Vec<&'a Value>, bool) = match args {
            Value::Array(items) => (items.iter().collect(), true),
            other => (vec![other], false),
        };
        let mut e = Est {
            nodes: 1 + u64::from(listed),
            ..Est::default()
        };
        let iterating = matches!(op, "map" | "filter" | "all" | "none" | "some" | "reduce");
        if iterating {
            return self.iteration(op, &items, listed, e, scope);
        }
        let mut parts = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let c = if listed {
                self.est_at(i, item, scope)
            } else {
                self.est(item, scope)
            };
            e.add_costs(&c);
            parts.push(c);
        }
        let sizes = || parts.iter().map(|p| p.size);
        let sum = sizes().fold(0u64, u64::saturating_add);
        let max = sizes().max().unwrap_or(1);
        match op {
            "var" => {
                let (size, copies) = var_size(items.first().copied(), scope);
                e.size = size.max(parts.get(1).map_or(0, |d| d.size));
                if copies > 0 {
                    e.steps = e.steps.saturating_add(copies / BPS + 1);
                    e.bytes = e.bytes.saturating_add(copies);
                }
            }
            "missing" | "missing_some" => {
                let keys = sum;
                e.size = keys;
                e.steps = e.steps.saturating_add(keys.saturating_add(1));
                e.bytes = e.bytes.saturating_add(keys.saturating_mul(2 * VB + 1));
                // A key that may be empty reads (copies) the whole data.
                if items.iter().any(|k| may_be_empty_key(k)) {
                    let per_key = var_size(None, scope).1;
                    e.steps = e
                        .steps
                        .saturating_add(elems(keys).saturating_mul(per_key / BPS + 1));
                    e.bytes = e.bytes.saturating_add(elems(keys).saturating_mul(per_key));
                }
            }
            "in" => {
                e.size = 1;
                let literal_strings = matches!(items.get(1), Some(Value::Array(list))
                    if list.iter().all(Value::is_string));
                if !literal_strings {
                    let hay = parts.get(1).map_or(1, |p| p.size);
                    let needle = parts.first().map_or(1, |p| p.size);
                    e.steps = e
                        .steps
                        .saturating_add(hay.saturating_add(needle / BPS).saturating_add(2));
                    // Arrays are searched in place; a needle that is not text is made text.
                    e.bytes = e.bytes.saturating_add(needle);
                }
            }
            "cat" => {
                e.size = sum;
                e.steps = e
                    .steps
                    .saturating_add(sum / BPS)
                    .saturating_add(items.len() as u64);
                e.bytes = e.bytes.saturating_add(sum);
            }
            "substr" => {
                let source = parts.first().map_or(1, |p| p.size);
                e.size = source;
                e.steps = e.steps.saturating_add(source / BPS + 1);
                e.bytes = e.bytes.saturating_add(source.saturating_mul(6));
            }
            "merge" => {
                let copied = sizes().map(elems).fold(0u64, u64::saturating_add);
                e.size = sum.saturating_add(items.len() as u64);
                e.steps = e.steps.saturating_add(copied);
                e.bytes = e.bytes.saturating_add(copied.saturating_mul(VB));
            }
            "if" | "?:" | "and" | "or" | "fractional" => e.size = max,
            _ => e.size = 1,
        }
        e
    }

    /// `map`, `filter`, `all`, `none`, `some` and `reduce`: the data once, the body per element.
    fn iteration(
        &mut self,
        op: &str,
        items: &[&'a Value],
        listed: bool,
        mut e: Est,
        scope: Scope,
    ) -> Est {
        let at = |w: &mut Self, i: usize, scope: Scope| match items.get(i) {
            Some(v) if listed => w.est_at(i, v, scope),
            Some(v) => w.est(v, scope),
            None => Est {
                size: 1,
                ..Est::default()
            },
        };
        let data = at(self, 0, scope);
        e.add_costs(&data);
        let initial = if op == "reduce" {
            let initial = at(self, 2, scope);
            e.add_costs(&initial);
            initial.size
        } else {
            0
        };
        let body_scope = if op == "reduce" {
            Scope::Reduce(data.size.saturating_add(initial))
        } else {
            Scope::Item
        };
        let body = at(self, 1, body_scope);
        e.nodes = e.nodes.saturating_add(body.nodes);
        let n = elems(data.size);
        let lists: u64 = if matches!(op, "map" | "filter") { 2 } else { 1 };
        let per_element = body.nodes.saturating_add(1).saturating_add(body.steps);
        e.steps = e
            .steps
            .saturating_add(1)
            .saturating_add(n.saturating_mul(per_element));
        e.bytes = e
            .bytes
            .saturating_add(n.saturating_mul(lists * VB))
            .saturating_add(n.saturating_mul(body.bytes));
        e.size = match op {
            "map" => n.saturating_mul(body.size.saturating_add(2)),
            "filter" => data.size,
            "reduce" => data.size.saturating_add(initial).max(body.size),
            _ => 1,
        };
        e
    }
}

/// The size of what a `var` with first argument `path` reads in `scope`, and the bytes it copies
/// (reading all of the data copies it).
fn var_size(path: Option<&Value>, scope: Scope) -> (u64, u64) {
    let text = match path {
        None | Some(Value::Null) => Some(String::new()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        // Computed: it may name anything, all of the data included.
        Some(_) => None,
    };
    let whole = text.as_deref().is_none_or(str::is_empty);
    match scope {
        Scope::Root => (C, if whole { CONTEXT_COPY_BYTES } else { 0 }),
        Scope::Item => (2, 0),
        Scope::Reduce(acc) => {
            let reads_acc = text.as_deref().is_none_or(|t| !t.starts_with("current"));
            let size = if reads_acc { acc.saturating_add(2) } else { 2 };
            let copies = if whole { size.saturating_mul(VB) } else { 0 };
            (size, copies)
        }
    }
}

/// Whether a `missing` key may be the empty path (which reads the whole data).
fn may_be_empty_key(key: &Value) -> bool {
    match key {
        Value::String(s) => s.is_empty(),
        Value::Null => true,
        Value::Array(list) => list.iter().any(may_be_empty_key),
        Value::Object(_) => true,
        _ => false,
    }
}

fn is_op(v: &Value) -> bool {
    matches!(v, Value::Object(o) if o.len() == 1)
}

/// Nodes of a literal, as validation counts them.
fn count_nodes(v: &Value) -> u64 {
    match v {
        Value::Array(items) => 1 + items.iter().map(count_nodes).sum::<u64>(),
        Value::Object(obj) => 1 + obj.values().map(count_nodes).sum::<u64>(),
        _ => 1,
    }
}
