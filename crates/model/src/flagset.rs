//! The flagd flag-definition document as Rust types, parsed from and serialised to JSON without loss.
//!
//! Parsing is path-aware: a wrongly typed field is reported with its JSON Pointer, and parsing goes on
//! so that one upload reports every problem at once.

use indexmap::IndexMap;
use serde_json::{Map, Value};

use crate::limits::{MAX_DOCUMENT_BYTES, MAX_JSON_DEPTH};
use crate::problem::{pointer, Problem, Problems};
use crate::validate;

/// A whole flag set: the flagd flag-definition document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlagSet {
    /// `$schema`, kept so a downloaded file still points editors at flagd's schema.
    pub schema: Option<String>,
    /// The flags by key, in document order.
    pub flags: IndexMap<String, Flag>,
    /// Whether `flags` was written as a map or as an array of objects with `key`; kept for round trips.
    pub flags_form: FlagsForm,
    /// Shared rule fragments, referenced from targeting as `{"$ref": name}`.
    pub evaluators: IndexMap<String, Value>,
    /// Flag-set metadata, merged under each flag's own metadata in resolutions.
    pub metadata: Map<String, Value>,
    /// Top-level keys flagd does not define, kept so nothing a user uploaded is silently dropped.
    pub extra: Map<String, Value>,
}

/// How the `flags` member was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlagsForm {
    /// `"flags": {"key": {...}}` — flagd's usual form.
    #[default]
    Map,
    /// `"flags": [{"key": "key", ...}]` — accepted by flagd-schemas as well.
    Array,
}

/// A flag's `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlagState {
    Enabled,
    Disabled,
}

impl FlagState {
    pub fn as_str(self) -> &'static str {
        match self {
            FlagState::Enabled => "ENABLED",
            FlagState::Disabled => "DISABLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ENABLED" => Some(FlagState::Enabled),
            "DISABLED" => Some(FlagState::Disabled),
            _ => None,
        }
    }
}

/// A flag's `defaultVariant`: flagd allows a variant key, `null`, or leaving it out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DefaultVariant {
    /// Not written: without targeting the flag resolves with no value (the SDK's default is used).
    #[default]
    Absent,
    /// Written as `null`: same meaning as absent, kept apart so a round trip is exact.
    Null,
    /// A variant key.
    Key(String),
}

impl DefaultVariant {
    pub fn key(&self) -> Option<&str> {
        match self {
            DefaultVariant::Key(k) => Some(k),
            _ => None,
        }
    }
}

/// One flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    pub state: FlagState,
    /// Variant key → value; all values of one flag share a type.
    pub variants: IndexMap<String, Value>,
    pub default_variant: DefaultVariant,
    /// The JsonLogic rule, as written (with `$ref`s unexpanded). `None` when absent; `{}` is kept as
    /// written and means "no targeting" too.
    pub targeting: Option<Value>,
    /// Flag metadata: strings, numbers and booleans.
    pub metadata: Map<String, Value>,
    /// Members flagd does not define, kept for round trips.
    pub extra: Map<String, Value>,
}

impl Default for Flag {
    fn default() -> Self {
        Flag {
            state: FlagState::Enabled,
            variants: IndexMap::new(),
            default_variant: DefaultVariant::Absent,
            targeting: None,
            metadata: Map::new(),
            extra: Map::new(),
        }
    }
}

impl Flag {
    /// The targeting rule when it is one to evaluate: absent and `{}` both mean no targeting.
    pub fn effective_targeting(&self) -> Option<&Value> {
        match &self.targeting {
            Some(Value::Object(m)) if m.is_empty() => None,
            Some(Value::Null) | None => None,
            Some(rule) => Some(rule),
        }
    }

    /// Parses one flag from its JSON object; `at` is the pointer of that object, for problem paths.
    /// Structural problems only: call [`crate::validate_flag`] for the semantic checks.
    pub fn from_value(value: &Value, at: &str) -> Result<Flag, Problems> {
        let mut problems = Vec::new();
        let flag = parse_flag(value, at, &mut problems, false);
        Problems(problems).into_result()?;
        flag.ok_or_else(|| Problems(vec![Problem::new(at, "flag could not be read")]))
    }

    /// The flag as flagd JSON.
    pub fn to_value(&self) -> Value {
        let mut out = Map::new();
        out.insert("state".into(), Value::String(self.state.as_str().into()));
        out.insert(
            "variants".into(),
            Value::Object(
                self.variants
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        );
        match &self.default_variant {
            DefaultVariant::Absent => {}
            DefaultVariant::Null => {
                out.insert("defaultVariant".into(), Value::Null);
            }
            DefaultVariant::Key(k) => {
                out.insert("defaultVariant".into(), Value::String(k.clone()));
            }
        }
        if let Some(t) = &self.targeting {
            out.insert("targeting".into(), t.clone());
        }
        if !self.metadata.is_empty() {
            out.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        for (k, v) in &self.extra {
            out.insert(k.clone(), v.clone());
        }
        Value::Object(out)
    }
}

impl FlagSet {
    /// Parses and validates a flagd document from JSON text, reporting every problem at once.
    pub fn from_json_str(text: &str) -> Result<FlagSet, Problems> {
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(Problems(vec![Problem::new(
                "",
                format!(
                    "document is {} bytes; the limit is {MAX_DOCUMENT_BYTES} bytes",
                    text.len()
                ),
            )]));
        }
        // Strict: duplicate keys and numbers that would change are refused, not silently kept.
        let value: Value = crate::json::parse_strict(text.as_bytes())
            .map_err(crate::json::StrictJsonError::into_problems)?;
        FlagSet::from_value(&value)
    }

    /// Parses and validates a flagd document already read as JSON.
    pub fn from_value(value: &Value) -> Result<FlagSet, Problems> {
        let (set, mut problems) = read_structure(value)?;
        // Semantic checks run on the flags that could be read, so one upload reports everything.
        problems.extend(validate::validate(&set).0);
        Problems(problems).into_result()?;
        Ok(set)
    }

    /// Reads the document's structure (types of members) without the semantic checks; used by the
    /// replica, which must render even a merged document that no longer validates.
    pub fn from_value_unvalidated(value: &Value) -> Result<FlagSet, Problems> {
        let (set, problems) = read_structure(value)?;
        Problems(problems).into_result()?;
        Ok(set)
    }

    /// The document as flagd JSON, in the form it was read in.
    pub fn to_value(&self) -> Value {
        let mut out = Map::new();
        if let Some(s) = &self.schema {
            out.insert("$schema".into(), Value::String(s.clone()));
        }
        let flags = match self.flags_form {
            FlagsForm::Map => Value::Object(
                self.flags
                    .iter()
                    .map(|(k, f)| (k.clone(), f.to_value()))
                    .collect(),
            ),
            FlagsForm::Array => Value::Array(
                self.flags
                    .iter()
                    .map(|(k, f)| {
                        let mut obj = Map::new();
                        obj.insert("key".into(), Value::String(k.clone()));
                        if let Value::Object(m) = f.to_value() {
                            obj.extend(m);
                        }
                        Value::Object(obj)
                    })
                    .collect(),
            ),
        };
        out.insert("flags".into(), flags);
        if !self.evaluators.is_empty() {
            out.insert(
                "$evaluators".into(),
                Value::Object(
                    self.evaluators
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
            );
        }
        if !self.metadata.is_empty() {
            out.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        for (k, v) in &self.extra {
            out.insert(k.clone(), v.clone());
        }
        Value::Object(out)
    }

    /// The document as pretty-printed flagd JSON.
    pub fn to_json_string_pretty(&self) -> String {
        // Serialising a `Value` cannot fail: its keys are strings.
        serde_json::to_string_pretty(&self.to_value()).unwrap_or_default()
    }
}

/// Reads what can be read of a document, with the structural problems found on the way. Fails
/// outright only when the document as a whole is unusable.
fn read_structure(value: &Value) -> Result<(FlagSet, Vec<Problem>), Problems> {
    let mut problems = Vec::new();
    if json_depth(value) > MAX_JSON_DEPTH {
        return Err(Problems(vec![Problem::new(
            "",
            format!("JSON nesting is deeper than the limit of {MAX_JSON_DEPTH}"),
        )]));
    }
    let Some(root) = value.as_object() else {
        return Err(Problems(vec![Problem::new(
            "",
            "a flag set must be a JSON object",
        )]));
    };
    let mut set = FlagSet::default();
    for (key, member) in root {
        let at = pointer([key.as_str()]);
        match key.as_str() {
            "$schema" => match member.as_str() {
                Some(s) => set.schema = Some(s.to_owned()),
                None => problems.push(Problem::new(at, "$schema must be a string")),
            },
            "flags" => parse_flags(member, &mut set, &mut problems),
            "$evaluators" => match member.as_object() {
                Some(evaluators) => {
                    set.evaluators = evaluators
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                }
                None => problems.push(Problem::new(at, "$evaluators must be an object")),
            },
            "metadata" => match member.as_object() {
                Some(m) => set.metadata = m.clone(),
                None => problems.push(Problem::new(at, "metadata must be an object")),
            },
            _ => {
                set.extra.insert(key.clone(), member.clone());
            }
        }
    }
    if !root.contains_key("flags") {
        problems.push(Problem::new(
            "/flags",
            "a flag set must have a flags member",
        ));
    }
    Ok((set, problems))
}

fn parse_flags(member: &Value, set: &mut FlagSet, problems: &mut Vec<Problem>) {
    match member {
        Value::Object(flags) => {
            set.flags_form = FlagsForm::Map;
            for (key, flag) in flags {
                if let Some(f) =
                    parse_flag(flag, &pointer(["flags", key.as_str()]), problems, false)
                {
                    set.flags.insert(key.clone(), f);
                }
            }
        }
        Value::Array(flags) => {
            set.flags_form = FlagsForm::Array;
            for (i, flag) in flags.iter().enumerate() {
                let at = pointer(["flags".to_owned(), i.to_string()]);
                let key = match flag.get("key") {
                    Some(Value::String(k)) => k.clone(),
                    Some(_) => {
                        problems.push(Problem::new(format!("{at}/key"), "key must be a string"));
                        continue;
                    }
                    None => {
                        problems.push(Problem::new(
                            format!("{at}/key"),
                            "a flag in the array form of flags needs a key",
                        ));
                        continue;
                    }
                };
                if set.flags.contains_key(&key) {
                    problems.push(Problem::new(
                        format!("{at}/key"),
                        format!("flag key {key:?} appears more than once"),
                    ));
                    continue;
                }
                if let Some(f) = parse_flag(flag, &at, problems, true) {
                    set.flags.insert(key, f);
                }
            }
        }
        _ => problems.push(Problem::new(
            "/flags",
            "flags must be an object or an array",
        )),
    }
}

fn parse_flag(value: &Value, at: &str, problems: &mut Vec<Problem>, keyed: bool) -> Option<Flag> {
    let Some(obj) = value.as_object() else {
        problems.push(Problem::new(at, "a flag must be a JSON object"));
        return None;
    };
    let before = problems.len();
    let mut flag = Flag::default();
    let mut saw_state = false;
    let mut saw_variants = false;
    for (key, member) in obj {
        let here = format!("{at}{}", pointer([key.as_str()]));
        match key.as_str() {
            "key" if keyed => {}
            "state" => {
                saw_state = true;
                match member.as_str().and_then(FlagState::parse) {
                    Some(s) => flag.state = s,
                    None => problems.push(Problem::new(
                        here,
                        "state must be \"ENABLED\" or \"DISABLED\"",
                    )),
                }
            }
            "variants" => {
                saw_variants = true;
                match member.as_object() {
                    Some(v) => {
                        flag.variants = v.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                    }
                    None => problems.push(Problem::new(here, "variants must be an object")),
                }
            }
            "defaultVariant" => match member {
                Value::Null => flag.default_variant = DefaultVariant::Null,
                Value::String(s) => flag.default_variant = DefaultVariant::Key(s.clone()),
                _ => problems.push(Problem::new(
                    here,
                    "defaultVariant must be a string or null",
                )),
            },
            "targeting" => match member {
                Value::Object(_) => flag.targeting = Some(member.clone()),
                _ => problems.push(Problem::new(here, "targeting must be a JSON object")),
            },
            "metadata" => match member.as_object() {
                Some(m) => flag.metadata = m.clone(),
                None => problems.push(Problem::new(here, "metadata must be an object")),
            },
            _ => {
                flag.extra.insert(key.clone(), member.clone());
            }
        }
    }
    if !saw_state {
        problems.push(Problem::new(format!("{at}/state"), "state is required"));
    }
    if !saw_variants {
        problems.push(Problem::new(
            format!("{at}/variants"),
            "variants is required",
        ));
    }
    (problems.len() == before).then_some(flag)
}

/// Nesting depth of a JSON value: a scalar is 0, `[]` or `{}` is 1.
pub(crate) fn json_depth(value: &Value) -> usize {
    // Iterative, so a hostile value cannot overflow the stack while being measured.
    let mut max = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                max = max.max(d + 1);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            Value::Object(o) => {
                max = max.max(d + 1);
                stack.extend(o.values().map(|c| (c, d + 1)));
            }
            _ => max = max.max(d),
        }
    }
    max
}
