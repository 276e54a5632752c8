//! The admin workload and the probe contexts: random writes an operator could make, built from what
//! the accepting node sees, so they are valid there (a refusal is then a finding, not noise).

use bunting_engine::EvaluationContext;
use bunting_model::{DefaultVariant, Flag, FlagSet, FlagState};
use bunting_replica::{FlagSetDoc, WriteCommand};
use indexmap::IndexMap;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::{json, Map, Value};

/// `$flagd.timestamp` of every probe evaluation: fixed, so resolutions compare across nodes.
pub const PROBE_TIMESTAMP: i64 = 1_750_000_000;

/// The fixed probe contexts every evaluation check uses.
pub fn probe_contexts() -> Vec<EvaluationContext> {
    let users = [
        ("user-1", "ada@example.com", "1.2.3", "de"),
        ("user-2", "bob@bunting.dev", "2.0.0", "us"),
        ("user-3", "cy@example.org", "0.9.1", "jp"),
        ("user-4", "dee@bunting.dev", "2.1.0-beta.1", "br"),
        ("user-5", "eve@example.com", "10.0.0", "us"),
    ];
    let mut out: Vec<EvaluationContext> = users
        .iter()
        .map(|(key, email, version, country)| {
            EvaluationContext::new(PROBE_TIMESTAMP)
                .with_targeting_key(*key)
                .with_attribute("email", json!(email))
                .with_attribute("version", json!(version))
                .with_attribute("country", json!(country))
        })
        .collect();
    // No targeting key at all: fractional rules must answer the same everywhere too.
    out.push(EvaluationContext::new(PROBE_TIMESTAMP).with_attribute("country", json!("us")));
    out
}

/// The flag key pool.
pub fn flag_key(i: usize) -> String {
    format!("flag-{i}")
}

/// A write the workload made, described for the simulator's own record.
#[derive(Debug, Clone)]
pub struct PlannedWrite {
    pub command: WriteCommand,
    /// What it writes, for reports: the field's pointer and the value.
    pub summary: String,
}

/// A variant value of one of the workload's types.
fn variant_value(kind: u8, rng: &mut impl Rng) -> Value {
    match kind {
        0 => json!(rng.random_bool(0.5)),
        1 => json!(["red", "blue", "green", "amber"]
            .choose(rng)
            .copied()
            .unwrap_or("red")),
        _ => json!(rng.random_range(0..100)),
    }
}

fn kind_of(value: &Value) -> u8 {
    match value {
        Value::Bool(_) => 0,
        Value::String(_) => 1,
        _ => 2,
    }
}

/// A targeting rule over the probe attributes that returns one of `variants`.
pub fn random_rule(variants: &[String], rng: &mut impl Rng) -> Value {
    let pick = |rng: &mut dyn rand::RngCore| -> Value {
        json!(variants.choose(rng).cloned().unwrap_or_default())
    };
    match rng.random_range(0..5) {
        0 => {
            json!({"if": [{"ends_with": [{"var": "email"}, "@bunting.dev"]}, pick(rng), pick(rng)]})
        }
        1 => {
            json!({"if": [{"sem_ver": [{"var": "version"}, ">=", "2.0.0"]}, pick(rng), pick(rng)]})
        }
        2 => json!({"if": [{"in": [{"var": "country"}, ["us", "de"]]}, pick(rng), null]}),
        3 => {
            let buckets: Vec<Value> = variants
                .iter()
                .map(|v| json!([v, rng.random_range(1..=50)]))
                .collect();
            json!({"fractional": buckets})
        }
        _ => {
            json!({"if": [{"starts_with": [{"var": "targetingKey"}, "user-"]}, pick(rng), pick(rng)]})
        }
    }
}

/// A fresh, valid flag.
pub fn random_flag(rng: &mut impl Rng) -> Flag {
    let kind = rng.random_range(0..3u8);
    let mut variants = IndexMap::new();
    let names = ["on", "off", "v2", "v3"];
    let count = rng.random_range(2..=names.len());
    for name in &names[..count] {
        variants.insert((*name).to_owned(), variant_value(kind, rng));
    }
    let keys: Vec<String> = variants.keys().cloned().collect();
    let default_variant = match rng.random_range(0..8) {
        0 => DefaultVariant::Absent,
        _ => DefaultVariant::Key(keys.choose(rng).cloned().unwrap_or_default()),
    };
    let targeting = rng.random_bool(0.5).then(|| random_rule(&keys, rng));
    let mut metadata = Map::new();
    if rng.random_bool(0.3) {
        metadata.insert(
            "owner".into(),
            json!(format!("team-{}", rng.random_range(0..4))),
        );
    }
    Flag {
        state: if rng.random_bool(0.85) {
            FlagState::Enabled
        } else {
            FlagState::Disabled
        },
        variants,
        default_variant,
        targeting,
        metadata,
        extra: Map::new(),
    }
}

/// A whole flag set for an upload.
pub fn random_set(keys: usize, rng: &mut impl Rng) -> FlagSet {
    let mut set = FlagSet::default();
    for _ in 0..rng.random_range(1..=4) {
        set.flags
            .insert(flag_key(rng.random_range(0..keys)), random_flag(rng));
    }
    if rng.random_bool(0.5) {
        set.metadata
            .insert("version".into(), json!(rng.random_range(0..1000)));
    }
    set
}

/// One random write against the node's view `doc` (which may not exist yet).
pub fn random_write(doc: Option<&FlagSetDoc>, keys: usize, rng: &mut impl Rng) -> PlannedWrite {
    let existing: Vec<(String, Flag)> = doc
        .map(|d| d.to_flagd().flags.into_iter().collect())
        .unwrap_or_default();
    let roll = rng.random_range(0..100);
    if existing.is_empty() || roll < 15 {
        let key = flag_key(rng.random_range(0..keys));
        let flag = random_flag(rng);
        let summary = format!("put /flags/{key} = {}", flag.to_value());
        return PlannedWrite {
            command: WriteCommand::PutFlag { key, flag },
            summary,
        };
    }
    let Some((key, flag)) = existing.choose(rng).cloned() else {
        return set_metadata(rng);
    };
    if roll < 22 {
        return PlannedWrite {
            summary: format!("delete /flags/{key}"),
            command: WriteCommand::DeleteFlag { key },
        };
    }
    if roll < 27 {
        return set_metadata(rng);
    }
    let which = rng.random_range(0..5);
    field_patch(&key, &flag, which, rng)
}

fn set_metadata(rng: &mut impl Rng) -> PlannedWrite {
    let name = format!("m{}", rng.random_range(0..3));
    let value = rng
        .random_bool(0.8)
        .then(|| json!(rng.random_range(0..1000)));
    PlannedWrite {
        summary: format!("set /metadata/{name} = {value:?}"),
        command: WriteCommand::SetSetMetadata { name, value },
    }
}

/// A write of one field of an existing flag; also what concurrent bursts use, so several regions
/// write the same field at once.
pub fn field_patch(key: &str, flag: &Flag, which: u8, rng: &mut impl Rng) -> PlannedWrite {
    let key = key.to_owned();
    let variants: Vec<String> = flag.variants.keys().cloned().collect();
    match which {
        0 => {
            let state = if rng.random_bool(0.5) {
                FlagState::Enabled
            } else {
                FlagState::Disabled
            };
            PlannedWrite {
                summary: format!("set /flags/{key}/state = {}", state.as_str()),
                command: WriteCommand::SetState { key, state },
            }
        }
        1 if !variants.is_empty() => {
            let v = variants.choose(rng).cloned().unwrap_or_default();
            PlannedWrite {
                summary: format!("set /flags/{key}/defaultVariant = {v}"),
                command: WriteCommand::SetDefaultVariant {
                    key,
                    default_variant: DefaultVariant::Key(v),
                },
            }
        }
        2 if !variants.is_empty() => {
            let rule = rng.random_bool(0.85).then(|| random_rule(&variants, rng));
            PlannedWrite {
                summary: format!("set /flags/{key}/targeting = {rule:?}"),
                command: WriteCommand::SetTargeting {
                    key,
                    targeting: rule,
                },
            }
        }
        3 if !variants.is_empty() => {
            let kind = flag.variants.values().next().map(kind_of).unwrap_or(0);
            let v = variants.choose(rng).cloned().unwrap_or_default();
            let value = variant_value(kind, rng);
            PlannedWrite {
                summary: format!("set /flags/{key}/variants/{v} = {value}"),
                command: WriteCommand::SetVariant {
                    key,
                    variant: v,
                    value: Some(value),
                },
            }
        }
        _ => {
            let name = format!("note{}", rng.random_range(0..2));
            let value = json!(format!("n{}", rng.random_range(0..100)));
            PlannedWrite {
                summary: format!("set /flags/{key}/metadata/{name} = {value}"),
                command: WriteCommand::SetFlagMetadata {
                    key,
                    name,
                    value: Some(value),
                },
            }
        }
    }
}
