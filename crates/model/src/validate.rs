//! Semantic validation of a flag set: every problem at once, each with its JSON Pointer.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use serde_json::Value;

use crate::flagset::{json_depth, DefaultVariant, Flag, FlagSet};
use crate::limits::*;
use crate::problem::{pointer, Problem, Problems};
use crate::OPERATORS;

/// The type shared by all variants of a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VariantType {
    Boolean,
    String,
    Number,
    /// JSON objects and arrays (OpenFeature's "object" / structure type).
    Object,
}

impl VariantType {
    /// The type of one variant value; `None` for `null`, which no flag may use as a variant value.
    pub fn of(value: &Value) -> Option<VariantType> {
        match value {
            Value::Bool(_) => Some(VariantType::Boolean),
            Value::String(_) => Some(VariantType::String),
            Value::Number(_) => Some(VariantType::Number),
            Value::Object(_) | Value::Array(_) => Some(VariantType::Object),
            Value::Null => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VariantType::Boolean => "boolean",
            VariantType::String => "string",
            VariantType::Number => "number",
            VariantType::Object => "object",
        }
    }
}

/// Flag keys: 1–256 bytes of ASCII letters, digits, `_`, `-`, `.` and `:`, starting with a letter or
/// digit. Keys appear in URLs and metric labels, so anything that needs escaping is refused.
pub fn is_valid_flag_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_FLAG_KEY_BYTES
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Validates a whole flag set.
pub(crate) fn validate(set: &FlagSet) -> Problems {
    let mut problems = Vec::new();
    if set.flags.len() > MAX_FLAGS {
        problems.push(Problem::new(
            "/flags",
            format!("{} flags; the limit is {MAX_FLAGS}", set.flags.len()),
        ));
    }
    if set.evaluators.len() > MAX_EVALUATORS {
        problems.push(Problem::new(
            "/$evaluators",
            format!(
                "{} evaluators; the limit is {MAX_EVALUATORS}",
                set.evaluators.len()
            ),
        ));
    }
    check_metadata(&set.metadata, "/metadata", &mut problems);
    // Rule nodes the set may still expand to: once its rules pass the limit, no further rule is
    // expanded, so validating a set costs bounded work however its evaluators expand.
    let mut set_left = MAX_EXPANDED_SET_NODES;
    for (name, rule) in &set.evaluators {
        let at = pointer(["$evaluators", name.as_str()]);
        // An evaluator is not compiled on its own: what checking it costs is the nodes walked
        // (each evaluator it uses once), not its expanded size, which counts where flags use it.
        let size = check_rule(rule, &at, &set.evaluators, usize::MAX, &mut problems);
        if !spend_set_nodes(&mut set_left, size.walked, &at, &mut problems) {
            break;
        }
    }
    for (i, (key, flag)) in set.flags.iter().enumerate() {
        let at = match set.flags_form {
            crate::FlagsForm::Map => pointer(["flags", key.as_str()]),
            crate::FlagsForm::Array => pointer(["flags".to_owned(), i.to_string()]),
        };
        if set_left == 0 {
            // Past the set's limit: everything but the rule is still checked.
            let without_rule = Flag {
                targeting: None,
                ..flag.clone()
            };
            let found = validate_flag_at(key, &without_rule, &set.evaluators, &at, 0, Cost::Check);
            problems.extend(found.0);
            continue;
        }
        let (found, nodes) =
            validate_flag_at(key, flag, &set.evaluators, &at, set_left, Cost::Check);
        problems.extend(found);
        spend_set_nodes(
            &mut set_left,
            nodes,
            &format!("{at}/targeting"),
            &mut problems,
        );
    }
    Problems(problems)
}

/// Takes `nodes` from what the flag set may still expand to; past the limit reports it at `at`
/// (the rule that passed it) and answers `false`.
fn spend_set_nodes(
    set_left: &mut usize,
    nodes: usize,
    at: &str,
    problems: &mut Vec<Problem>,
) -> bool {
    if nodes <= *set_left {
        *set_left -= nodes;
        return true;
    }
    if *set_left > 0 {
        problems.push(Problem::new(
            at,
            format!(
                "the flag set's rules expand to more than {MAX_EXPANDED_SET_NODES} operations and \
                 values after $ref expansion (MAX_EXPANDED_SET_NODES), passed at this rule; rules \
                 after it were not checked"
            ),
        ));
    }
    *set_left = 0;
    false
}

/// Validates one flag against the flag set's `$evaluators`; pointers start at `/flags/{key}`.
pub fn validate_flag(key: &str, flag: &Flag, evaluators: &IndexMap<String, Value>) -> Vec<Problem> {
    validate_flag_within(key, flag, evaluators, MAX_EXPANDED_SET_NODES).0
}

/// [`validate_flag`] for a flag whose rule may expand to at most `set_nodes_left` nodes (what its
/// flag set has left of [`MAX_EXPANDED_SET_NODES`]); also returns how many it expanded to, more
/// than `set_nodes_left` when it passed that (expansion stops there).
pub fn validate_flag_within(
    key: &str,
    flag: &Flag,
    evaluators: &IndexMap<String, Value>,
    set_nodes_left: usize,
) -> (Vec<Problem>, usize) {
    let at = pointer(["flags", key]);
    validate_flag_at(key, flag, evaluators, &at, set_nodes_left, Cost::Check)
}

/// [`validate_flag_within`] without the evaluation-cost check: what a stored flag needs to be
/// compiled. A rule stored before the check existed, or merged from concurrent writes, still
/// evaluates; the engine's run-time budget bounds each evaluation of it.
pub fn validate_stored_flag_within(
    key: &str,
    flag: &Flag,
    evaluators: &IndexMap<String, Value>,
    set_nodes_left: usize,
) -> (Vec<Problem>, usize) {
    let at = pointer(["flags", key]);
    validate_flag_at(key, flag, evaluators, &at, set_nodes_left, Cost::Skip)
}

/// Whether validation checks a rule's worst-case evaluation cost.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cost {
    Check,
    Skip,
}

fn validate_flag_at(
    key: &str,
    flag: &Flag,
    evaluators: &IndexMap<String, Value>,
    at: &str,
    set_nodes_left: usize,
    cost: Cost,
) -> (Vec<Problem>, usize) {
    let mut problems = Vec::new();
    if !is_valid_flag_key(key) {
        problems.push(Problem::new(
            at,
            format!(
                "flag key {key:?} is not valid: use 1-{MAX_FLAG_KEY_BYTES} letters, digits, '_', \
                 '-', '.' or ':', starting with a letter or digit"
            ),
        ));
    }
    let variants_at = format!("{at}/variants");
    if flag.variants.is_empty() {
        problems.push(Problem::new(
            &variants_at,
            "a flag needs at least one variant",
        ));
    }
    if flag.variants.len() > MAX_VARIANTS {
        problems.push(Problem::new(
            &variants_at,
            format!(
                "{} variants; the limit is {MAX_VARIANTS}",
                flag.variants.len()
            ),
        ));
    }
    let mut first_type: Option<(VariantType, &str)> = None;
    for (name, value) in &flag.variants {
        let here = format!("{variants_at}{}", pointer([name.as_str()]));
        if json_depth(value) > MAX_JSON_DEPTH {
            problems.push(Problem::new(
                &here,
                format!("variant value nests deeper than the limit of {MAX_JSON_DEPTH}"),
            ));
        }
        match VariantType::of(value) {
            None => problems.push(Problem::new(here, "a variant value cannot be null")),
            Some(t) => match first_type {
                None => first_type = Some((t, name)),
                Some((first, first_name)) if first != t => problems.push(Problem::new(
                    here,
                    format!(
                        "variant is a {} but variant {first_name:?} is a {}; all variants of a \
                         flag must have one type",
                        t.as_str(),
                        first.as_str()
                    ),
                )),
                Some(_) => {}
            },
        }
    }
    if let DefaultVariant::Key(default) = &flag.default_variant {
        if !flag.variants.contains_key(default) {
            problems.push(Problem::new(
                format!("{at}/defaultVariant"),
                format!("defaultVariant {default:?} is not one of the variants"),
            ));
        }
    }
    let mut nodes = 0;
    if let Some(rule) = &flag.targeting {
        let rule_at = format!("{at}/targeting");
        let before = problems.len();
        nodes = check_rule(rule, &rule_at, evaluators, set_nodes_left, &mut problems).expanded;
        if cost == Cost::Check && problems.len() == before && nodes <= set_nodes_left {
            // Only a rule that expands within its limits is walked again, for its cost.
            crate::cost::check_cost(rule, &rule_at, evaluators, &mut problems);
        }
    }
    check_metadata(&flag.metadata, &format!("{at}/metadata"), &mut problems);
    (problems, nodes)
}

fn check_metadata(
    metadata: &serde_json::Map<String, Value>,
    at: &str,
    problems: &mut Vec<Problem>,
) {
    if metadata.len() > MAX_METADATA_ENTRIES {
        problems.push(Problem::new(
            at,
            format!(
                "{} metadata entries; the limit is {MAX_METADATA_ENTRIES}",
                metadata.len()
            ),
        ));
    }
    for (k, v) in metadata {
        if !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            problems.push(Problem::new(
                format!("{at}{}", pointer([k.as_str()])),
                "metadata values must be strings, numbers or booleans",
            ));
        }
    }
}

/// Checks a targeting rule: known operators, known `$ref`s, no `$ref` cycles, and depth and size
/// after expansion. Returns the nodes it expands to; expansion stops once past `set_nodes_left`
/// or the rule limit (the answer is then more than that).
fn check_rule(
    rule: &Value,
    at: &str,
    evaluators: &IndexMap<String, Value>,
    set_nodes_left: usize,
    problems: &mut Vec<Problem>,
) -> RuleSize {
    let mut walker = RuleWalker {
        evaluators,
        expansions: HashMap::new(),
        visiting: HashSet::new(),
        problems,
        budget: set_nodes_left.min(MAX_EXPANDED_RULE_NODES),
        expanded: 0,
        walked: 0,
    };
    let shape = walker.walk(rule, at);
    let nodes = walker.expanded.max(shape.nodes);
    let size = RuleSize {
        expanded: nodes,
        walked: walker.walked,
    };
    if walker.expanded > walker.budget && walker.budget < MAX_EXPANDED_RULE_NODES {
        // Past what the flag set has left: the caller reports the set's limit.
        return size;
    }
    if shape.depth > MAX_RULE_DEPTH {
        walker.problems.push(Problem::new(
            at,
            format!("rule nests deeper than the limit of {MAX_RULE_DEPTH} (after $ref expansion)"),
        ));
    }
    if nodes > MAX_EXPANDED_RULE_NODES {
        walker.problems.push(Problem::new(
            at,
            format!(
                "rule has more than {MAX_EXPANDED_RULE_NODES} operations and values after $ref \
                 expansion"
            ),
        ));
    }
    size
}

/// How big a rule is, and what checking it cost.
struct RuleSize {
    /// Nodes after `$ref` expansion (past the walk's budget when it stopped there).
    expanded: usize,
    /// Nodes the walk visited: each evaluator once, however often it is used.
    walked: usize,
}

/// Depth and size of a rule with its `$ref`s expanded.
#[derive(Debug, Clone, Copy)]
struct Shape {
    depth: usize,
    /// Saturating: a few evaluators that reference each other many times expand exponentially.
    nodes: usize,
}

/// Walks a rule once, remembering each evaluator's expanded shape, so a document whose evaluators
/// reference each other many times costs time linear in its size, not in its expansion.
struct RuleWalker<'a, 'p> {
    evaluators: &'a IndexMap<String, Value>,
    expansions: HashMap<&'a str, Shape>,
    visiting: HashSet<&'a str>,
    problems: &'p mut Vec<Problem>,
    /// Nodes the rule may expand to; the walk stops once past it.
    budget: usize,
    /// Nodes expanded so far, counting each use of an evaluator at its full expanded size.
    expanded: usize,
    /// Nodes visited so far.
    walked: usize,
}

impl<'a> RuleWalker<'a, '_> {
    /// Counts `nodes` more expanded nodes; `false` once past the budget.
    fn spend(&mut self, nodes: usize) -> bool {
        self.expanded = self.expanded.saturating_add(nodes);
        self.expanded <= self.budget
    }

    fn walk(&mut self, rule: &'a Value, at: &str) -> Shape {
        if self.expanded > self.budget {
            return Shape { depth: 0, nodes: 0 };
        }
        self.walked += 1;
        if !matches!(rule, Value::Object(o) if o.len() == 1 && o.contains_key("$ref")) {
            self.spend(1);
        }
        match rule {
            Value::Array(items) => {
                let mut shape = Shape { depth: 1, nodes: 1 };
                for (i, item) in items.iter().enumerate() {
                    shape = shape.with_child(self.walk(item, &format!("{at}/{i}")));
                }
                shape
            }
            Value::Object(obj) if obj.len() == 1 => {
                let Some((op, args)) = obj.iter().next() else {
                    return Shape { depth: 1, nodes: 1 };
                };
                let here = format!("{at}{}", pointer([op.as_str()]));
                if op == "$ref" {
                    return self.expand(args, &here);
                }
                if !OPERATORS.contains(&op.as_str()) {
                    self.problems
                        .push(Problem::new(&here, format!("unknown operator {op:?}")));
                }
                Shape { depth: 1, nodes: 1 }.with_child(self.walk(args, &here))
            }
            // Objects with other than one key are JsonLogic literals.
            Value::Object(obj) => {
                let mut shape = Shape { depth: 1, nodes: 1 };
                for (k, v) in obj {
                    shape =
                        shape.with_child(self.walk(v, &format!("{at}{}", pointer([k.as_str()]))));
                }
                shape
            }
            _ => Shape { depth: 0, nodes: 1 },
        }
    }

    /// A `$ref` object is replaced by its target, so it adds no level of its own.
    fn expand(&mut self, name: &'a Value, here: &str) -> Shape {
        let leaf = Shape { depth: 1, nodes: 1 };
        let Some(name) = name.as_str() else {
            self.problems
                .push(Problem::new(here, "$ref must name an evaluator"));
            return leaf;
        };
        let Some((name, target)) = self.evaluators.get_key_value(name) else {
            self.problems.push(Problem::new(
                here,
                format!("$ref {name:?} names no entry of $evaluators"),
            ));
            return leaf;
        };
        if let Some(shape) = self.expansions.get(name.as_str()).copied() {
            // The walk counted this evaluator's nodes once already; each further use adds them.
            self.spend(shape.nodes);
            return shape;
        }
        if !self.visiting.insert(name.as_str()) {
            self.problems.push(Problem::new(
                here,
                format!("$ref {name:?} refers back to itself"),
            ));
            return leaf;
        }
        let shape = self.walk(target, here);
        self.visiting.remove(name.as_str());
        self.expansions.insert(name.as_str(), shape);
        shape
    }
}

impl Shape {
    fn with_child(self, child: Shape) -> Shape {
        Shape {
            depth: self.depth.max(child.depth.saturating_add(1)),
            nodes: self.nodes.saturating_add(child.nodes),
        }
    }
}

/// Nesting depth of a rule as written (without expanding `$ref`s).
pub fn rule_depth(rule: &Value) -> usize {
    json_depth(rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems_of(doc: Value) -> Vec<Problem> {
        match FlagSet::from_value(&doc) {
            Ok(_) => vec![],
            Err(p) => p.0,
        }
    }

    fn pointers(doc: Value) -> Vec<String> {
        problems_of(doc).into_iter().map(|p| p.pointer).collect()
    }

    #[test]
    fn valid_document_has_no_problems() {
        let doc = json!({"flags": {"a": {"state": "ENABLED", "variants": {"on": true, "off": false},
            "defaultVariant": "on", "targeting": {"if": [{"==": [{"var": "x"}, 1]}, "off", null]}}}});
        assert_eq!(problems_of(doc), vec![]);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let doc = json!({
            "flags": {
                "bad key!": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"},
                "mixed": {"state": "ENABLED", "variants": {"a": 1, "b": "x"}, "defaultVariant": "a"},
                "empty": {"state": "ENABLED", "variants": {}, "defaultVariant": null},
                "dangling": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "zzz"},
                "ref": {"state": "ENABLED", "variants": {"a": 1}, "targeting": {"$ref": "nope"}},
                "state": {"state": "ON", "variants": {"a": 1}},
                "op": {"state": "ENABLED", "variants": {"a": 1}, "targeting": {"frobnicate": [1]}}
            }
        });
        let got = pointers(doc);
        for want in [
            "/flags/bad key!",
            "/flags/mixed/variants/b",
            "/flags/empty/variants",
            "/flags/dangling/defaultVariant",
            "/flags/ref/targeting/$ref",
            "/flags/state/state",
            "/flags/op/targeting/frobnicate",
        ] {
            assert!(got.iter().any(|p| p == want), "missing {want} in {got:?}");
        }
    }

    #[test]
    fn refs_are_resolved_and_cycles_reported() {
        let ok = json!({"flags": {"a": {"state": "ENABLED", "variants": {"x": 1},
            "targeting": {"if": [{"$ref": "beta"}, "x", null]}}},
            "$evaluators": {"beta": {"in": ["@x.com", {"var": "email"}]}}});
        assert_eq!(problems_of(ok), vec![]);
        let cyclic = json!({"flags": {}, "$evaluators": {"a": {"$ref": "b"}, "b": {"$ref": "a"}}});
        assert!(problems_of(cyclic)
            .iter()
            .any(|p| p.message.contains("refers back")));
    }

    #[test]
    fn rule_depth_limit_is_enforced_after_ref_expansion() {
        let mut rule = json!({"var": "x"});
        for _ in 0..15 {
            rule = json!({"!": [rule]});
        }
        let doc = json!({"flags": {"a": {"state": "ENABLED", "variants": {"x": 1},
            "targeting": {"and": [{"$ref": "deep"}, {"$ref": "deep"}]}}},
            "$evaluators": {"deep": rule}});
        let problems = problems_of(doc);
        assert!(
            problems
                .iter()
                .any(|p| p.pointer == "/flags/a/targeting" && p.message.contains("limit")),
            "{problems:?}"
        );
    }

    #[test]
    fn mutually_referencing_evaluators_are_refused_quickly() {
        // Each evaluator uses the previous one twice: 2^40 nodes once expanded, a few hundred bytes
        // as written. Validation must neither take exponential time nor accept it.
        let mut evaluators = serde_json::Map::new();
        evaluators.insert("e0".into(), json!({"var": "x"}));
        for i in 1..40 {
            let prev = format!("e{}", i - 1);
            evaluators.insert(format!("e{i}"), json!([{"$ref": prev}, {"$ref": prev}]));
        }
        let doc = json!({"flags": {"a": {"state": "ENABLED", "variants": {"x": 1},
            "targeting": {"if": [{"$ref": "e39"}, "x", null]}}}, "$evaluators": evaluators});
        let problems = problems_of(doc);
        assert!(
            problems
                .iter()
                .any(|p| p.pointer == "/flags/a/targeting" && p.message.contains("operations")),
            "{problems:?}"
        );
    }

    /// A flag set whose flag `f` has `rule` as targeting, and what validation says of it.
    fn rule_problems(rule: Value) -> Vec<Problem> {
        problems_of(json!({"flags": {"f": {"state": "ENABLED",
            "variants": {"on": true, "off": false}, "defaultVariant": "off", "targeting": rule}}}))
    }

    #[test]
    fn rules_that_could_exceed_the_evaluation_budget_are_refused_at_their_operation() {
        let merge: Vec<Value> = (0..1_000).map(|_| json!({"var": "arr"})).collect();
        let cat: Vec<Value> = (0..1_000).map(|_| json!({"var": "s"})).collect();
        let mut terms = vec![json!({"var": "accumulator"})];
        terms.extend((1..2_000).map(|_| json!({"var": "current"})));
        for (rule, at, limit) in [
            (
                json!({"some": [{"merge": merge}, {"==": [{"var": ""}, 2]}]}),
                "/flags/f/targeting/some/0/merge",
                "MAX_EVALUATION_",
            ),
            (
                json!({"if": [{"cat": cat}, "on", "off"]}),
                "/flags/f/targeting/if/0/cat",
                "MAX_EVALUATION_",
            ),
            (
                json!({"reduce": [{"var": "arr"}, {"+": terms}, 0]}),
                "/flags/f/targeting/reduce",
                "MAX_EVALUATION_STEPS",
            ),
            (
                // A body that scans a 100-element list for each element of a context array.
                json!({"some": [{"var": "ids"}, {"in": [{"var": ""}, (0..100).collect::<Vec<u32>>()]}]}),
                "/flags/f/targeting/some",
                "MAX_EVALUATION_STEPS",
            ),
            (
                json!({"reduce": [{"var": "arr"},
                    {"merge": [{"var": "accumulator"}, [{"var": "current"}]]}, []]}),
                "/flags/f/targeting/reduce",
                "MAX_EVALUATION_",
            ),
        ] {
            let problems = rule_problems(rule);
            assert!(
                problems
                    .iter()
                    .any(|p| p.pointer == at && p.message.contains(limit)),
                "want {at} naming {limit}: {problems:?}"
            );
        }
    }

    #[test]
    fn single_passes_over_context_data_are_accepted() {
        for rule in [
            json!({"if": [{"in": [{"var": "email"}, {"var": "allowed"}]}, "on", "off"]}),
            json!({"if": [{"in": ["@example.com", {"var": "email"}]}, "on", "off"]}),
            json!({"if": [{"some": [{"var": "groups"}, {"==": [{"var": ""}, "beta"]}]}, "on",
                "off"]}),
            json!({"if": [{"all": [{"var": "items"}, {"and": [{">=": [{"var": "qty"}, 1]},
                {"in": [{"var": "sku"}, ["a", "b", "c"]]}]}]}, "on", "off"]}),
            json!({"if": [{"in": ["x", {"map": [{"var": "items"}, {"var": "name"}]}]}, "on",
                "off"]}),
            json!({"if": [{">": [{"reduce": [{"var": "cart"},
                {"+": [{"var": "accumulator"}, {"var": "current.price"}]}, 0]}, 100]}, "on",
                "off"]}),
            json!({"if": [{"==": [{"cat": [{"var": "first"}, " ", {"var": "last"}]}, "a b"]},
                "on", "off"]}),
            json!({"if": [{"in": ["x", {"merge": [{"var": "a"}, {"var": "b"}]}]}, "on", "off"]}),
            // Iterations nested over an element's own parts visit the data once in all.
            json!({"if": [{"some": [{"var": "teams"}, {"some": [{"var": "members"},
                {"==": [{"var": "role"}, "admin"]}]}]}, "on", "off"]}),
        ] {
            assert_eq!(rule_problems(rule.clone()), vec![], "{rule}");
        }
    }

    /// Finding 4 of issue 12: 1,000 flags, each using an evaluator that expands to ~40,000 nodes.
    fn doubling_evaluators_used_by_many_flags() -> Value {
        let mut evaluators = serde_json::Map::new();
        evaluators.insert("e0".into(), json!({"==": [{"var": "x"}, 1]}));
        for i in 1..=13 {
            let prev = format!("e{}", i - 1);
            evaluators.insert(
                format!("e{i}"),
                json!({"and": [{"$ref": prev}, {"$ref": prev}]}),
            );
        }
        let mut flags = serde_json::Map::new();
        for i in 0..1_000 {
            flags.insert(
                format!("flag-{i}"),
                json!({"state": "ENABLED", "variants": {"on": true, "off": false},
                    "defaultVariant": "off", "targeting": {"if": [{"$ref": "e13"}, "on", "off"]}}),
            );
        }
        json!({"flags": flags, "$evaluators": evaluators})
    }

    #[test]
    fn expansion_is_bounded_for_the_whole_flag_set() {
        let problems = problems_of(doubling_evaluators_used_by_many_flags());
        let set_limit: Vec<&Problem> = problems
            .iter()
            .filter(|p| p.message.contains("MAX_EXPANDED_SET_NODES"))
            .collect();
        assert_eq!(set_limit.len(), 1, "{problems:?}");
        assert!(set_limit[0].pointer.starts_with("/flags/flag-"));
        // Each rule alone is within the per-rule limit.
        assert!(!problems
            .iter()
            .any(|p| p.message.starts_with("rule has more than")));
    }

    #[test]
    fn a_flag_set_just_within_the_expansion_limit_is_accepted() {
        let mut doc = doubling_evaluators_used_by_many_flags();
        // ~57,000 nodes a flag: 17 flags fit in the set's limit.
        let flags = doc["flags"].as_object_mut().unwrap();
        let keep: Vec<String> = flags.keys().take(17).cloned().collect();
        flags.retain(|k, _| keep.contains(k));
        assert_eq!(problems_of(doc), vec![]);
    }

    #[test]
    fn flag_count_limit_is_enforced() {
        let mut flags = serde_json::Map::new();
        for i in 0..=MAX_FLAGS {
            flags.insert(
                format!("f{i}"),
                json!({"state": "ENABLED", "variants": {"a": true}}),
            );
        }
        let problems = problems_of(json!({ "flags": flags }));
        assert!(problems
            .iter()
            .any(|p| p.pointer == "/flags" && p.message.contains("limit")));
    }

    #[test]
    fn flag_keys() {
        assert!(is_valid_flag_key("new-welcome_banner.v2:x"));
        assert!(!is_valid_flag_key(""));
        assert!(!is_valid_flag_key("-x"));
        assert!(!is_valid_flag_key("a/b"));
        assert!(!is_valid_flag_key(&"a".repeat(MAX_FLAG_KEY_BYTES + 1)));
    }

    #[test]
    fn metadata_values_must_be_scalars() {
        let doc = json!({"flags": {"a": {"state": "ENABLED", "variants": {"x": 1},
            "metadata": {"team": "web", "bad": {"no": 1}}}}});
        assert_eq!(pointers(doc), vec!["/flags/a/metadata/bad".to_owned()]);
    }
}
