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
    for (name, rule) in &set.evaluators {
        let at = pointer(["$evaluators", name.as_str()]);
        check_rule(rule, &at, &set.evaluators, &mut problems);
    }
    for (i, (key, flag)) in set.flags.iter().enumerate() {
        let at = match set.flags_form {
            crate::FlagsForm::Map => pointer(["flags", key.as_str()]),
            crate::FlagsForm::Array => pointer(["flags".to_owned(), i.to_string()]),
        };
        problems.extend(validate_flag_at(key, flag, &set.evaluators, &at));
    }
    Problems(problems)
}

/// Validates one flag against the flag set's `$evaluators`; pointers start at `/flags/{key}`.
pub fn validate_flag(key: &str, flag: &Flag, evaluators: &IndexMap<String, Value>) -> Vec<Problem> {
    validate_flag_at(key, flag, evaluators, &pointer(["flags", key]))
}

fn validate_flag_at(
    key: &str,
    flag: &Flag,
    evaluators: &IndexMap<String, Value>,
    at: &str,
) -> Vec<Problem> {
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
    if let Some(rule) = &flag.targeting {
        check_rule(rule, &format!("{at}/targeting"), evaluators, &mut problems);
    }
    check_metadata(&flag.metadata, &format!("{at}/metadata"), &mut problems);
    problems
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
/// after expansion.
fn check_rule(
    rule: &Value,
    at: &str,
    evaluators: &IndexMap<String, Value>,
    problems: &mut Vec<Problem>,
) {
    let mut walker = RuleWalker {
        evaluators,
        expansions: HashMap::new(),
        visiting: HashSet::new(),
        problems,
    };
    let shape = walker.walk(rule, at);
    if shape.depth > MAX_RULE_DEPTH {
        walker.problems.push(Problem::new(
            at,
            format!("rule nests deeper than the limit of {MAX_RULE_DEPTH} (after $ref expansion)"),
        ));
    }
    if shape.nodes > MAX_EXPANDED_RULE_NODES {
        walker.problems.push(Problem::new(
            at,
            format!(
                "rule has more than {MAX_EXPANDED_RULE_NODES} operations and values after $ref \
                 expansion"
            ),
        ));
    }
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
}

impl<'a> RuleWalker<'a, '_> {
    fn walk(&mut self, rule: &'a Value, at: &str) -> Shape {
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
        if let Some(shape) = self.expansions.get(name.as_str()) {
            return *shape;
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
