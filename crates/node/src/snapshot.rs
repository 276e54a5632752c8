//! The compiled flag sets the request path evaluates, swapped atomically on every change.
//!
//! The OFREP hot path does one atomic load of the map of flag sets and one hash lookup: no lock,
//! no storage access, no recompilation. Only the driver swaps in new snapshots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bunting_engine::{CompileOptions, CompiledFlagSet, Resolution};
use bunting_model::FlagSet;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

/// One flag set, compiled, with what the HTTP layer needs to serve it.
pub struct Snapshot {
    pub name: Arc<str>,
    pub compiled: CompiledFlagSet,
    /// The document heads this snapshot was compiled from (hex change hashes).
    pub heads: Vec<String>,
    /// Identifies the flag set's content: the ETag base and the SSE notification's `etag`.
    pub version: String,
    /// Unix seconds when this snapshot was swapped in (SSE `lastModified`).
    pub changed_at: u64,
    /// Per flag: evaluation counters by variant (see [`EvaluationCounters`]).
    counters: HashMap<Box<str>, FlagCounters>,
    /// Counts evaluations of keys that are not in the flag set.
    not_found: Arc<AtomicU64>,
}

struct FlagCounters {
    by_variant: Vec<(Box<str>, Arc<AtomicU64>)>,
    /// Resolutions without a variant (disabled, error, no default), by reason.
    by_reason: Vec<(&'static str, Arc<AtomicU64>)>,
}

impl Snapshot {
    /// Counts one evaluation for the `/metrics` endpoint (lock-free: atomic increments only).
    pub fn count(&self, flag_key: &str, resolution: &Resolution) {
        let Some(c) = self.counters.get(flag_key) else {
            self.not_found.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some(variant) = &resolution.variant {
            if let Some((_, n)) = c.by_variant.iter().find(|(v, _)| **v == **variant) {
                n.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let reason = resolution.reason.as_str();
        if let Some((_, n)) = c.by_reason.iter().find(|(r, _)| *r == reason) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A change the stream endpoint tells clients about.
#[derive(Debug, Clone)]
pub struct ChangeNotice {
    pub flag_set: Arc<str>,
    pub version: String,
    pub changed_at: u64,
    /// Increases with every notice this process sends (SSE event id).
    pub sequence: u64,
}

/// Evaluation counts by (flag set, flag, variant or reason), kept across recompilations so a
/// counter never goes backwards while the process lives.
#[derive(Default)]
pub struct EvaluationCounters {
    /// (flag set, flag, variant, reason): the variant when one was served, else the reason.
    counters: Mutex<HashMap<CounterKey, Arc<AtomicU64>>>,
    not_found: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

type CounterKey = (String, String, String, &'static str);

const NO_VARIANT_REASONS: [&str; 3] = ["DISABLED", "ERROR", "DEFAULT"];

impl EvaluationCounters {
    fn counter(
        &self,
        set: &str,
        flag: &str,
        variant: &str,
        reason: &'static str,
    ) -> Arc<AtomicU64> {
        let mut map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((set.to_owned(), flag.to_owned(), variant.to_owned(), reason))
            .or_default()
            .clone()
    }

    /// Calls `f(flag set, flag, variant, reason, count)` for every counter (for OTLP export).
    pub fn for_each(&self, mut f: impl FnMut(&str, &str, &str, &str, u64)) {
        let map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for ((set, flag, variant, reason), n) in map.iter() {
            f(set, flag, variant, reason, n.load(Ordering::Relaxed));
        }
    }

    /// Renders the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP bunting_evaluations Flag evaluations by flag set, flag and variant (or, when no variant was served, reason).\n# TYPE bunting_evaluations counter\n");
        let map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<_> = map.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        for ((set, flag, variant, reason), n) in rows {
            let _ = writeln!(
                out,
                "bunting_evaluations_total{{flag_set=\"{}\",feature_flag_key=\"{}\",feature_flag_result_variant=\"{}\",feature_flag_result_reason=\"{}\"}} {}",
                escape(set),
                escape(flag),
                escape(variant),
                reason,
                n.load(Ordering::Relaxed)
            );
        }
        drop(map);
        out.push_str("# HELP bunting_evaluations_flag_not_found Evaluations of keys not in the flag set.\n# TYPE bunting_evaluations_flag_not_found counter\n");
        let nf = self.not_found.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<_> = nf.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        for (set, n) in rows {
            let _ = writeln!(
                out,
                "bunting_evaluations_flag_not_found_total{{flag_set=\"{}\"}} {}",
                escape(set),
                n.load(Ordering::Relaxed)
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every flag set this node serves, by name.
pub struct Snapshots {
    sets: ArcSwap<HashMap<Arc<str>, Arc<Snapshot>>>,
    changes: broadcast::Sender<ChangeNotice>,
    counters: EvaluationCounters,
    sequence: AtomicU64,
    options: CompileOptions,
}

impl Default for Snapshots {
    fn default() -> Self {
        Snapshots {
            sets: ArcSwap::from_pointee(HashMap::new()),
            changes: broadcast::channel(256).0,
            counters: EvaluationCounters::default(),
            sequence: AtomicU64::new(0),
            options: CompileOptions::default(),
        }
    }
}

impl Snapshots {
    /// The current snapshot of a flag set.
    pub fn get(&self, name: &str) -> Option<Arc<Snapshot>> {
        self.sets.load().get(name).cloned()
    }

    /// Names of every served flag set, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.sets.load().keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ChangeNotice> {
        self.changes.subscribe()
    }

    pub fn counters(&self) -> &EvaluationCounters {
        &self.counters
    }

    /// Compiles `set` and swaps it in as the flag set `name`, then tells stream subscribers.
    /// Called by the driver only, so swaps of one flag set never race each other.
    pub fn publish(&self, name: &str, set: &FlagSet, heads: Vec<String>, now_secs: u64) {
        let compiled = CompiledFlagSet::compile(set, &self.options);
        let name: Arc<str> = Arc::from(name);
        let mut counters = HashMap::with_capacity(set.flags.len());
        for (key, flag) in &set.flags {
            counters.insert(
                Box::from(key.as_str()),
                FlagCounters {
                    by_variant: flag
                        .variants
                        .keys()
                        .map(|v| {
                            (
                                Box::from(v.as_str()),
                                self.counters.counter(&name, key, v, ""),
                            )
                        })
                        .collect(),
                    by_reason: NO_VARIANT_REASONS
                        .iter()
                        .map(|r| (*r, self.counters.counter(&name, key, "", r)))
                        .collect(),
                },
            );
        }
        let not_found = self
            .counters
            .not_found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let version = version_of(&heads);
        let snapshot = Arc::new(Snapshot {
            name: name.clone(),
            compiled,
            heads,
            version: version.clone(),
            changed_at: now_secs,
            counters,
            not_found,
        });
        let mut map = HashMap::clone(&self.sets.load());
        map.insert(name.clone(), snapshot);
        self.sets.store(Arc::new(map));
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        // No subscribers is fine: nobody is streaming.
        let _ = self.changes.send(ChangeNotice {
            flag_set: name,
            version,
            changed_at: now_secs,
            sequence,
        });
    }
}

/// A short, stable name for a set of heads.
pub fn version_of(heads: &[String]) -> String {
    let mut sorted: Vec<&str> = heads.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for head in sorted {
        h.update(head.as_bytes());
        h.update(b"\n");
    }
    hex::encode(&h.finalize()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bunting_engine::EvaluationContext;

    fn set(json: &str) -> FlagSet {
        FlagSet::from_json_str(json).unwrap()
    }

    #[test]
    fn publish_swaps_the_snapshot_and_notifies_subscribers() {
        let snapshots = Snapshots::default();
        let mut rx = snapshots.subscribe();
        snapshots.publish(
            "prod",
            &set(r#"{"flags":{"a":{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on"}}}"#),
            vec!["h1".into()],
            10,
        );
        let first = snapshots.get("prod").unwrap();
        assert!(first.compiled.contains("a"));
        snapshots.publish("prod", &set(r#"{"flags":{}}"#), vec!["h2".into()], 11);
        let second = snapshots.get("prod").unwrap();
        assert!(!second.compiled.contains("a"));
        assert_ne!(first.version, second.version);
        let n1 = rx.try_recv().unwrap();
        let n2 = rx.try_recv().unwrap();
        assert_eq!((n1.sequence, n2.sequence), (1, 2));
        assert_eq!(n2.version, second.version);
    }

    #[test]
    fn evaluation_counts_survive_recompilation_and_render_per_variant() {
        let snapshots = Snapshots::default();
        let doc = r#"{"flags":{"a":{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on"}}}"#;
        snapshots.publish("prod", &set(doc), vec!["h1".into()], 0);
        let ctx = EvaluationContext::new(0);
        let s = snapshots.get("prod").unwrap();
        let r = s.compiled.evaluate("a", &ctx);
        s.count("a", &r);
        snapshots.publish("prod", &set(doc), vec!["h2".into()], 0);
        let s = snapshots.get("prod").unwrap();
        s.count("a", &r);
        s.count("zzz", &s.compiled.evaluate("zzz", &ctx));
        let mut text = String::new();
        snapshots.counters().render(&mut text);
        assert!(text.contains("bunting_evaluations_total{flag_set=\"prod\",feature_flag_key=\"a\",feature_flag_result_variant=\"on\",feature_flag_result_reason=\"\"} 2"), "{text}");
        assert!(
            text.contains("bunting_evaluations_flag_not_found_total{flag_set=\"prod\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn version_ignores_head_order() {
        assert_eq!(
            version_of(&["a".into(), "b".into()]),
            version_of(&["b".into(), "a".into()])
        );
        assert_ne!(version_of(&["a".into()]), version_of(&["b".into()]));
    }
}
