//! One flag set as one Automerge document.
//!
//! Layout (DESIGN.md §5), every leaf a JSON text string so that it is replaced whole, never spliced:
//!
//! ```text
//! ROOT
//! ├─ "flags": map
//! │   └─ KEY: map
//! │       ├─ "state": "\"ENABLED\""
//! │       ├─ "defaultVariant": "\"on\"" | "null"          (absent when not written)
//! │       ├─ "targeting": "{...whole JsonLogic rule...}"  (absent when not written)
//! │       ├─ "variants": map  NAME → "<json value>"
//! │       ├─ "metadata": map  NAME → "<json value>"
//! │       └─ "extra":    map  MEMBER → "<json value>"     (members flagd does not define)
//! ├─ "$evaluators": map NAME → "<json rule>"
//! ├─ "metadata": map NAME → "<json value>"
//! ├─ "extra": map MEMBER → "<json value>"
//! ├─ "$schema": "<json string>"
//! └─ "flagsForm": "\"map\"" | "\"array\""
//! ```
//!
//! The four root maps are made by a genesis change that every replica builds identically (fixed
//! actor, time and content, hence the same hash), so two replicas that start empty never create
//! competing `flags` maps whose contents would hide each other.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    ActorId, Automerge, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, ScalarValueRef, ValueRef,
    ROOT,
};
use bunting_engine::{CompileOptions, CompiledFlagSet};
use bunting_model::limits::MAX_FLAGS;
use bunting_model::{pointer, DefaultVariant, Flag, FlagSet, FlagsForm, Problem};
use indexmap::IndexMap;
use serde_json::{json, Map, Value};

use crate::command::{Write, WriteCommand, WriteMeta};
use crate::Error;

/// Actor of the genesis change; never used for anything else.
const GENESIS_ACTOR: &[u8] = b"bunting-genesis";
const ROOT_MAPS: [&str; 4] = ["flags", "$evaluators", "metadata", "extra"];

/// Who this replica is: recorded in every change it makes and used for its Automerge actor id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Stable id of the node (unique in the cluster).
    pub node: String,
    /// Region the node runs in.
    pub region: String,
    /// Differs on every process start, so a crash never makes one actor reuse a sequence number.
    pub incarnation: u64,
}

impl Identity {
    /// The Automerge actor id: the node id's bytes, then the incarnation (big-endian).
    pub fn actor_id(&self) -> ActorId {
        let mut bytes = self.node.as_bytes().to_vec();
        bytes.extend_from_slice(&self.incarnation.to_be_bytes());
        ActorId::from(bytes)
    }
}

/// One field of a flag set that a write can touch: the unit of conflicts and of optimistic
/// concurrency checks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// The flag's map itself (its existence).
    Flag(String),
    State(String),
    DefaultVariant(String),
    Targeting(String),
    Variant(String, String),
    FlagMetadata(String, String),
    FlagExtra(String, String),
    Evaluator(String),
    SetMetadata(String),
    SetExtra(String),
    Schema,
    FlagsForm,
}

impl Field {
    /// The field's JSON Pointer in the flagd document.
    pub fn pointer(&self) -> String {
        match self {
            Field::Flag(k) => pointer(["flags", k]),
            Field::State(k) => pointer(["flags", k, "state"]),
            Field::DefaultVariant(k) => pointer(["flags", k, "defaultVariant"]),
            Field::Targeting(k) => pointer(["flags", k, "targeting"]),
            Field::Variant(k, v) => pointer(["flags", k, "variants", v]),
            Field::FlagMetadata(k, n) => pointer(["flags", k, "metadata", n]),
            Field::FlagExtra(k, n) => pointer(["flags", k, n]),
            Field::Evaluator(n) => pointer(["$evaluators", n]),
            Field::SetMetadata(n) => pointer(["metadata", n]),
            Field::SetExtra(n) => pointer([n]),
            Field::Schema => "/$schema".into(),
            Field::FlagsForm => "/flags".into(),
        }
    }
}

/// A field's value as it is now, returned when an optimistic write is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldValue {
    /// JSON Pointer of the field.
    pub pointer: String,
    /// Its current value; `None` when absent.
    pub value: Option<Value>,
}

/// Who made a change, read back from the change itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    pub token_id: String,
    pub region: String,
    pub node: String,
    pub wall_time_ms: u64,
    /// Hash of the change (hex), to find it in the audit log.
    pub change: String,
}

/// One entry of the audit log: one Automerge change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub author: Author,
    pub message: String,
    /// The flag the change touched; `None` for set-wide changes.
    pub flag: Option<String>,
    /// `create`, `update`, `delete`, `set` (set-wide) or `confirm-delete`.
    pub operation: String,
}

/// Which audit entries to return.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryQuery {
    /// Only changes that touched this flag.
    pub flag: Option<String>,
    /// Entries to skip (newest first).
    pub offset: usize,
    /// Most entries to return; 0 means 100.
    pub limit: usize,
}

/// The kind of a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    /// Concurrent writes to one key: every value is kept, one wins deterministically everywhere.
    ConcurrentValues,
    /// A flag was deleted while another node edited it; the deletion won.
    DeletedWhileEdited,
}

/// One value of a conflicted key.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictValue {
    /// The value (the whole flag for a flag-level conflict); `None` for a deletion.
    pub value: Option<Value>,
    /// Who wrote it; `None` when the change carries no readable metadata.
    pub author: Option<Author>,
    /// Whether this is the value every replica shows.
    pub winner: bool,
}

/// A key that holds concurrent values until a later write resolves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// JSON Pointer of the key.
    pub pointer: String,
    pub kind: ConflictKind,
    pub values: Vec<ConflictValue>,
}

/// A flag that does not validate after a merge; it evaluates to an ERROR resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenFlag {
    pub key: String,
    pub problems: Vec<Problem>,
}

/// One flag set as an Automerge document, with typed, validated writes.
#[derive(Debug, Clone)]
pub struct FlagSetDoc {
    doc: Automerge,
    identity: Identity,
}

/// One edit of one flag (one Automerge change), or of set-wide fields.
#[derive(Debug, Clone, PartialEq)]
enum Edit {
    /// Make the flag's map afresh with every field (a new flag, or resolving a flag-level conflict).
    Create(String, Box<Flag>),
    Delete(String),
    /// Confirms a deletion that raced an edit: an empty change touching the flag.
    ConfirmDelete(String),
    /// Field writes inside one flag.
    Fields(String, Vec<(Field, Option<Value>)>),
    /// Set-wide field writes.
    Set(Vec<(Field, Option<Value>)>),
}

impl FlagSetDoc {
    /// An empty flag set (just the genesis change).
    pub fn new(identity: Identity) -> Self {
        let mut doc = genesis();
        doc.set_actor(identity.actor_id());
        FlagSetDoc { doc, identity }
    }

    /// Loads a saved document (`save()`), then applies stored changes after it. Anything that does
    /// not decode completely is refused: a torn or corrupt record is reported, never half-used.
    pub fn load(
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
        identity: Identity,
    ) -> Result<Self, Error> {
        let mut doc = match snapshot {
            Some(bytes) => Automerge::load_with_options(
                bytes,
                automerge::LoadOptions::new()
                    .on_partial_load(automerge::OnPartialLoad::Error)
                    .verification_mode(automerge::VerificationMode::Check),
            )
            .map_err(|e| Error::Load(e.to_string()))?,
            None => genesis(),
        };
        let mut parsed = Vec::with_capacity(changes.len());
        for bytes in changes {
            parsed.push(
                automerge::Change::from_bytes(bytes.clone())
                    .map_err(|e| Error::Load(e.to_string()))?,
            );
        }
        doc.apply_changes(parsed)
            .map_err(|e| Error::Load(e.to_string()))?;
        // Automerge parks changes whose dependencies are missing; for stored data that means a
        // record was lost, which must be reported rather than silently skipped.
        let missing = doc.get_missing_deps(&[]);
        if !missing.is_empty() {
            return Err(Error::Load(format!(
                "{} stored change(s) depend on changes that are not stored",
                missing.len()
            )));
        }
        if doc.get_heads().is_empty() {
            doc = genesis();
        } else if doc.get_change_by_hash(&genesis_hash()).is_none() {
            // A snapshot from elsewhere: make sure the root maps exist the same way.
            let g = genesis();
            doc.apply_changes(g.get_changes(&[]))
                .map_err(|e| Error::Load(e.to_string()))?;
        }
        doc.set_actor(identity.actor_id());
        Ok(FlagSetDoc { doc, identity })
    }

    /// The whole document, compacted: the changes applied, never changes Automerge holds back
    /// for a missing dependency (a snapshot with such an orphan would not load, and the orphan is
    /// stored with a persist request once it applies).
    pub fn save(&self) -> Vec<u8> {
        self.doc.save_with_options(automerge::SaveOptions {
            deflate: true,
            retain_orphans: false,
        })
    }

    /// The current heads: equal heads mean equal documents.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The identity this replica writes as.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The underlying Automerge document (read-only).
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    pub(crate) fn automerge_mut(&mut self) -> &mut Automerge {
        &mut self.doc
    }

    /// Encoded changes made after `heads` (what a persist request carries).
    pub fn changes_since(&self, heads: &[ChangeHash]) -> Vec<Vec<u8>> {
        self.doc
            .get_changes(heads)
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// Number of changes in the document, the genesis change included.
    pub fn change_count(&self) -> usize {
        self.doc.get_changes_meta(&[]).len()
    }

    /// Validates and applies one write. On success returns the hashes of the changes made (one
    /// per flag touched; empty when the write changes nothing). On error nothing was changed.
    pub fn apply(&mut self, write: &Write, meta: &WriteMeta) -> Result<Vec<ChangeHash>, Error> {
        let edits = self.plan(&write.command)?;
        if let Some(base) = &write.based_on {
            self.check_not_stale(base, &edits)?;
        }
        let mut hashes = Vec::with_capacity(edits.len());
        for edit in &edits {
            if let Some(h) = self.commit_edit(edit, meta)? {
                hashes.push(h);
            }
        }
        Ok(hashes)
    }

    /// The document rendered as a flagd flag set. Never fails: a field that does not decode (only
    /// a faulty peer could write one) is left out, and the flag is then reported by
    /// [`Self::broken_flags`].
    pub fn to_flagd(&self) -> FlagSet {
        let mut value = self.render(None);
        match FlagSet::from_value_unvalidated(&value) {
            Ok(set) => set,
            Err(problems) => {
                // Only a faulty peer can store a wrongly typed field: leave those flags out rather
                // than the whole set (broken_flags reports them).
                let unreadable: HashSet<String> = problems
                    .0
                    .iter()
                    .filter_map(|p| flag_key_of_pointer(&p.pointer))
                    .collect();
                if let Some(Value::Object(flags)) = value.get_mut("flags") {
                    flags.retain(|k, _| !unreadable.contains(k));
                }
                FlagSet::from_value_unvalidated(&value).unwrap_or_default()
            }
        }
    }

    /// The flag set compiled for evaluation. A flag that no longer validates after a merge compiles
    /// to a deterministic ERROR resolution, so converged replicas answer alike.
    pub fn compile(&self, options: &CompileOptions) -> CompiledFlagSet {
        CompiledFlagSet::compile(&self.to_flagd(), options)
    }

    /// One flag as stored now (the winning values), if present.
    pub fn flag(&self, key: &str) -> Option<Flag> {
        let obj = self.flag_obj(key, None)?;
        let value = self.render_flag(&obj, None);
        Flag::from_value(&value, &pointer(["flags", key])).ok()
    }

    /// Flags that do not validate after a merge, each with every problem; sorted by key.
    /// Problems not about one flag (set metadata, evaluators) are listed under the key `""`.
    pub fn broken_flags(&self) -> Vec<BrokenFlag> {
        let mut value = self.render(None);
        // Validate in map form so problem pointers name flag keys.
        if let Some(obj) = value.as_object_mut() {
            obj.remove("flagsForm");
        }
        let problems = match FlagSet::from_value(&strip_array_form(value)) {
            Ok(_) => return Vec::new(),
            Err(p) => p.0,
        };
        let mut by_key: BTreeMap<String, Vec<Problem>> = BTreeMap::new();
        for p in problems {
            let key = flag_key_of_pointer(&p.pointer).unwrap_or_default();
            by_key.entry(key).or_default().push(p);
        }
        by_key
            .into_iter()
            .map(|(key, mut problems)| {
                problems.sort();
                problems.dedup();
                BrokenFlag { key, problems }
            })
            .collect()
    }

    /// Every key that holds concurrent values, with each value and its author, plus flags whose
    /// deletion raced an edit. Sorted by pointer.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut out = Vec::new();
        for field in self.conflicted_fields() {
            match &field {
                Field::Flag(key) => self.push_flag_conflict(key, &mut out),
                _ => self.push_field_conflict(&field, &mut out),
            }
        }
        out.extend(self.delete_conflicts());
        out.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        out
    }

    /// Fields holding concurrent values, found in one pass over the document.
    fn conflicted_fields(&self) -> Vec<Field> {
        let mut tree = self.tree(None);
        let mut entries = |o: &ObjId| tree.remove(o).unwrap_or_default();
        let mut fields = Vec::new();
        for root in entries(&ROOT) {
            match (root.key.as_str(), &root.node) {
                ("flags", Node::Map(flags)) => {
                    for flag in entries(flags) {
                        if flag.conflict {
                            fields.push(Field::Flag(flag.key.clone()));
                        }
                        if let Node::Map(obj) = &flag.node {
                            flag_conflicts(&flag.key, obj, &mut entries, &mut fields);
                        }
                    }
                }
                ("$evaluators" | "metadata" | "extra", Node::Map(m)) => {
                    for e in entries(m) {
                        if e.conflict {
                            fields.push(match root.key.as_str() {
                                "$evaluators" => Field::Evaluator(e.key),
                                "metadata" => Field::SetMetadata(e.key),
                                _ => Field::SetExtra(e.key),
                            });
                        }
                    }
                }
                ("$schema", _) if root.conflict => fields.push(Field::Schema),
                ("flagsForm", _) if root.conflict => fields.push(Field::FlagsForm),
                _ => {}
            }
        }
        fields
    }
}

/// Conflicted fields inside one flag's map.
fn flag_conflicts(
    key: &str,
    flag: &ObjId,
    entries: &mut dyn FnMut(&ObjId) -> Vec<Entry>,
    fields: &mut Vec<Field>,
) {
    let k = || key.to_owned();
    for entry in entries(flag) {
        match (entry.key.as_str(), &entry.node) {
            ("variants" | "metadata" | "extra", Node::Map(sub)) => {
                for e in entries(sub) {
                    if e.conflict {
                        fields.push(match entry.key.as_str() {
                            "variants" => Field::Variant(k(), e.key),
                            "metadata" => Field::FlagMetadata(k(), e.key),
                            _ => Field::FlagExtra(k(), e.key),
                        });
                    }
                }
            }
            ("state", _) if entry.conflict => fields.push(Field::State(k())),
            ("defaultVariant", _) if entry.conflict => fields.push(Field::DefaultVariant(k())),
            ("targeting", _) if entry.conflict => fields.push(Field::Targeting(k())),
            _ => {}
        }
    }
}

impl FlagSetDoc {
    fn push_flag_conflict(&self, key: &str, out: &mut Vec<Conflict>) {
        let Some(flags) = self.root_map("flags", None) else {
            return;
        };
        let all = self.doc.get_all(&flags, key).unwrap_or_default();
        if all.len() < 2 {
            return;
        }
        let winner = self.flag_obj(key, None);
        let values = all
            .iter()
            .map(|(v, id)| ConflictValue {
                value: match v {
                    automerge::Value::Object(ObjType::Map) => Some(self.render_flag(id, None)),
                    _ => None,
                },
                author: self.author_of_op(id),
                winner: winner.as_ref() == Some(id),
            })
            .collect();
        out.push(Conflict {
            pointer: Field::Flag(key.to_owned()).pointer(),
            kind: ConflictKind::ConcurrentValues,
            values,
        });
    }

    /// The flags that changes made after `since` touched, so a caller can recompile only those.
    /// `None` when one of them was a set-wide change (evaluators, set metadata, a whole-set
    /// upload's set part) or carries no readable record: then everything may have changed.
    pub fn touched_flags(&self, since: &[ChangeHash]) -> Option<BTreeSet<String>> {
        let mut keys = BTreeSet::new();
        for m in self.doc.get_changes_meta(since) {
            let record = ChangeRecord::parse(m.message.as_deref()?)?;
            keys.insert(record.flag?);
        }
        Some(keys)
    }

    /// The audit log: newest first (by wall time, then change hash), optionally for one flag.
    pub fn history(&self, query: &HistoryQuery) -> Vec<AuditEntry> {
        let limit = if query.limit == 0 { 100 } else { query.limit };
        let mut entries: Vec<AuditEntry> = self
            .doc
            .get_changes_meta(&[])
            .iter()
            .filter_map(|m| {
                let hash = m.hash.to_string();
                let record = ChangeRecord::parse(m.message.as_deref()?)?;
                Some(record.into_entry(hash))
            })
            .filter(|e| match &query.flag {
                Some(k) => e.flag.as_deref() == Some(k.as_str()),
                None => true,
            })
            .collect();
        entries.sort_by(|a, b| {
            b.author
                .wall_time_ms
                .cmp(&a.author.wall_time_ms)
                .then_with(|| b.author.change.cmp(&a.author.change))
        });
        entries.into_iter().skip(query.offset).take(limit).collect()
    }

    // ---- planning: command -> validated edits ----

    fn plan(&self, command: &WriteCommand) -> Result<Vec<Edit>, Error> {
        let evaluators = self.evaluators(None);
        match command {
            WriteCommand::PutFlag { key, flag } => {
                validate_one(key, flag, &evaluators)?;
                self.check_room_for(key)?;
                Ok(self.plan_flag(key, flag).into_iter().collect())
            }
            WriteCommand::SetState { key, .. }
            | WriteCommand::SetDefaultVariant { key, .. }
            | WriteCommand::SetTargeting { key, .. }
            | WriteCommand::SetVariant { key, .. }
            | WriteCommand::SetFlagMetadata { key, .. } => {
                let mut flag = self
                    .flag(key)
                    .ok_or_else(|| Error::FlagNotFound(key.clone()))?;
                let write = patch_flag(&mut flag, command);
                validate_one(key, &flag, &evaluators)?;
                Ok(write
                    .map(|w| Edit::Fields(key.clone(), vec![w]))
                    .into_iter()
                    .collect())
            }
            WriteCommand::DeleteFlag { key } => {
                if self.flag_obj(key, None).is_some() {
                    Ok(vec![Edit::Delete(key.clone())])
                } else if self.delete_conflict_of(key).is_some() {
                    Ok(vec![Edit::ConfirmDelete(key.clone())])
                } else {
                    Err(Error::FlagNotFound(key.clone()))
                }
            }
            WriteCommand::ReplaceSet { set } => {
                let mut as_map = set.clone();
                as_map.flags_form = FlagsForm::Map;
                FlagSet::from_value(&as_map.to_value()).map_err(Error::Invalid)?;
                Ok(self.plan_set(set))
            }
            WriteCommand::SetEvaluator { name, rule } => {
                let current = self.to_flagd();
                let mut set = current.clone();
                match rule {
                    Some(r) => {
                        set.evaluators.insert(name.clone(), r.clone());
                    }
                    None => {
                        set.evaluators.shift_remove(name);
                    }
                }
                validate_set_wide(&current, &set)?;
                Ok(vec![Edit::Set(vec![(
                    Field::Evaluator(name.clone()),
                    rule.clone(),
                )])])
            }
            WriteCommand::SetSetMetadata { name, value } => {
                let current = self.to_flagd();
                let mut set = current.clone();
                match value {
                    Some(v) => {
                        set.metadata.insert(name.clone(), v.clone());
                    }
                    None => {
                        set.metadata.shift_remove(name);
                    }
                }
                validate_set_wide(&current, &set)?;
                Ok(vec![Edit::Set(vec![(
                    Field::SetMetadata(name.clone()),
                    value.clone(),
                )])])
            }
        }
    }

    /// The edit that makes flag `key` equal to `flag`, or `None` when it already is (and nothing
    /// about it is in conflict).
    fn plan_flag(&self, key: &str, flag: &Flag) -> Option<Edit> {
        let flags = self.root_map("flags", None)?;
        let candidates = self.doc.get_all(&flags, key).unwrap_or_default();
        let Some(obj) = self.flag_obj(key, None).filter(|_| candidates.len() == 1) else {
            return Some(Edit::Create(key.to_owned(), Box::new(flag.clone())));
        };
        let current = self.render_flag(&obj, None);
        let target = flag.to_value();
        let mut writes = Vec::new();
        let conflicted: HashSet<Field> = self
            .fields_of_flag(key, &obj)
            .into_iter()
            .filter(|f| self.field_op_ids(f, None).len() > 1)
            .collect();
        for (field, new) in flag_fields(key, &target) {
            let old = field_in(&current, &field);
            if old != new || conflicted.contains(&field) {
                writes.push((field, new));
            }
        }
        // Fields present now but absent from the target are removed.
        for (field, _) in flag_fields(key, &current) {
            if field_in(&target, &field).is_none() && !writes.iter().any(|(f, _)| f == &field) {
                writes.push((field, None));
            }
        }
        (!writes.is_empty()).then(|| Edit::Fields(key.to_owned(), writes))
    }

    fn plan_set(&self, set: &FlagSet) -> Vec<Edit> {
        let mut edits = Vec::new();
        let current_keys: BTreeSet<String> = self
            .root_map("flags", None)
            .map(|f| self.doc.keys(&f).collect())
            .unwrap_or_default();
        for (key, flag) in &set.flags {
            if let Some(edit) = self.plan_flag(key, flag) {
                edits.push(edit);
            }
        }
        for key in current_keys {
            if !set.flags.contains_key(&key) {
                edits.push(Edit::Delete(key));
            }
        }
        let current = self.render(None);
        let target = set.to_value();
        let mut writes = Vec::new();
        let current_fields = set_fields_of_value(&current);
        let target_fields = set_fields_of_value(&target);
        let conflicted: HashSet<Field> = self
            .set_fields(None)
            .into_iter()
            .filter(|f| self.field_op_ids(f, None).len() > 1)
            .collect();
        for (field, new) in &target_fields {
            let old = current_fields.get(field);
            if old != Some(new) || conflicted.contains(field) {
                writes.push((field.clone(), Some(new.clone())));
            }
        }
        for field in current_fields.keys() {
            if !target_fields.contains_key(field) {
                writes.push((field.clone(), None));
            }
        }
        if !writes.is_empty() {
            edits.push(Edit::Set(writes));
        }
        edits
    }

    // ---- optimistic concurrency ----

    fn check_not_stale(&self, base: &[ChangeHash], edits: &[Edit]) -> Result<(), Error> {
        let unknown: Vec<ChangeHash> = base
            .iter()
            .filter(|h| self.doc.get_change_by_hash(h).is_none())
            .copied()
            .collect();
        if !unknown.is_empty() {
            return Err(Error::UnknownHeads(
                unknown.iter().map(ToString::to_string).collect(),
            ));
        }
        let mut touched: BTreeSet<Field> = BTreeSet::new();
        for edit in edits {
            match edit {
                Edit::Create(key, _) | Edit::Delete(key) | Edit::ConfirmDelete(key) => {
                    touched.insert(Field::Flag(key.clone()));
                    for at in [Some(base), None] {
                        if let Some(obj) = self.flag_obj(key, at) {
                            touched.extend(self.fields_of_flag_at(key, &obj, at));
                        }
                    }
                }
                Edit::Fields(key, writes) => {
                    touched.insert(Field::Flag(key.clone()));
                    touched.extend(writes.iter().map(|(f, _)| f.clone()));
                }
                Edit::Set(writes) => touched.extend(writes.iter().map(|(f, _)| f.clone())),
            }
        }
        let changed: Vec<FieldValue> = touched
            .into_iter()
            .filter(|f| self.field_op_ids(f, Some(base)) != self.field_op_ids(f, None))
            .map(|f| FieldValue {
                pointer: f.pointer(),
                value: self.field_value(&f),
            })
            .collect();
        if changed.is_empty() {
            Ok(())
        } else {
            Err(Error::Stale { current: changed })
        }
    }

    /// Ids of the operations holding a field's value(s): they differ exactly when the field was
    /// written since.
    fn field_op_ids(&self, field: &Field, at: Option<&[ChangeHash]>) -> Vec<ObjId> {
        let (obj, prop) = match self.field_location(field, at) {
            Some(loc) => loc,
            None => return Vec::new(),
        };
        let all = match at {
            Some(h) => self.doc.get_all_at(&obj, prop.as_str(), h),
            None => self.doc.get_all(&obj, prop.as_str()),
        };
        let mut ids: Vec<ObjId> = all
            .unwrap_or_default()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        if !matches!(field, Field::Flag(_)) {
            // A field of a re-created flag lives in a new map: count the map's id too.
            if let Some(flag_key) = field_flag_key(field) {
                if let Some(flag) = self.flag_obj(flag_key, at) {
                    ids.push(flag);
                }
            }
        }
        ids
    }

    /// The map and key holding a field.
    fn field_location(&self, field: &Field, at: Option<&[ChangeHash]>) -> Option<(ObjId, String)> {
        Some(match field {
            Field::Flag(k) => (self.root_map("flags", at)?, k.clone()),
            Field::State(k) => (self.flag_obj(k, at)?, "state".into()),
            Field::DefaultVariant(k) => (self.flag_obj(k, at)?, "defaultVariant".into()),
            Field::Targeting(k) => (self.flag_obj(k, at)?, "targeting".into()),
            Field::Variant(k, v) => (
                self.sub_map(&self.flag_obj(k, at)?, "variants", at)?,
                v.clone(),
            ),
            Field::FlagMetadata(k, n) => (
                self.sub_map(&self.flag_obj(k, at)?, "metadata", at)?,
                n.clone(),
            ),
            Field::FlagExtra(k, n) => (
                self.sub_map(&self.flag_obj(k, at)?, "extra", at)?,
                n.clone(),
            ),
            Field::Evaluator(n) => (self.root_map("$evaluators", at)?, n.clone()),
            Field::SetMetadata(n) => (self.root_map("metadata", at)?, n.clone()),
            Field::SetExtra(n) => (self.root_map("extra", at)?, n.clone()),
            Field::Schema => (ROOT, "$schema".into()),
            Field::FlagsForm => (ROOT, "flagsForm".into()),
        })
    }

    /// A field's current (winning) value as JSON.
    fn field_value(&self, field: &Field) -> Option<Value> {
        if let Field::Flag(k) = field {
            return self.flag_obj(k, None).map(|o| self.render_flag(&o, None));
        }
        let (obj, prop) = self.field_location(field, None)?;
        let (value, _) = self.doc.get(&obj, prop.as_str()).ok()??;
        decode_leaf(&value)
    }

    // ---- committing ----

    fn commit_edit(&mut self, edit: &Edit, meta: &WriteMeta) -> Result<Option<ChangeHash>, Error> {
        let (flag, operation) = match edit {
            Edit::Create(k, _) => (Some(k.clone()), "create"),
            Edit::Delete(k) => (Some(k.clone()), "delete"),
            Edit::ConfirmDelete(k) => (Some(k.clone()), "confirm-delete"),
            Edit::Fields(k, _) => (Some(k.clone()), "update"),
            Edit::Set(_) => (None, "set"),
        };
        let record = ChangeRecord {
            token_id: meta.token_id.clone(),
            region: self.identity.region.clone(),
            node: self.identity.node.clone(),
            wall_time_ms: meta.wall_time_ms,
            message: meta.message.clone(),
            flag,
            operation: operation.into(),
        };
        let options = CommitOptions::default()
            .with_message(record.to_json())
            .with_time(i64::try_from(meta.wall_time_ms / 1000).unwrap_or(i64::MAX));
        if let Edit::ConfirmDelete(_) = edit {
            return Ok(Some(self.doc.empty_commit(options)));
        }
        let flags = self.root_map("flags", None);
        let locations: Vec<Option<(ObjId, String)>> = match edit {
            Edit::Fields(_, writes) | Edit::Set(writes) => writes
                .iter()
                .map(|(f, _)| self.field_location(f, None))
                .collect(),
            _ => Vec::new(),
        };
        let mut tx = self.doc.transaction();
        let result = write_edit(&mut tx, edit, flags, &locations);
        match result {
            Ok(()) => Ok(tx.commit_with(options).0),
            Err(e) => {
                tx.rollback();
                Err(Error::Automerge(e.to_string()))
            }
        }
    }

    // ---- reading ----

    fn root_map(&self, name: &str, at: Option<&[ChangeHash]>) -> Option<ObjId> {
        self.sub_map(&ROOT, name, at)
    }

    fn sub_map(&self, obj: &ObjId, name: &str, at: Option<&[ChangeHash]>) -> Option<ObjId> {
        let got = match at {
            Some(h) => self.doc.get_at(obj, name, h),
            None => self.doc.get(obj, name),
        };
        match got.ok()? {
            Some((automerge::Value::Object(ObjType::Map), id)) => Some(id),
            _ => None,
        }
    }

    /// A new flag one write at a time is held to the same [`MAX_FLAGS`] as a whole-set upload.
    fn check_room_for(&self, key: &str) -> Result<(), Error> {
        let Some(flags) = self.root_map("flags", None) else {
            return Ok(());
        };
        if self.sub_map(&flags, key, None).is_some() || self.doc.length(&flags) < MAX_FLAGS {
            return Ok(());
        }
        Err(Error::Invalid(bunting_model::Problems(vec![Problem::new(
            pointer(["flags", key]),
            format!("the flag set already holds {MAX_FLAGS} flags, the limit (MAX_FLAGS); delete one first"),
        )])))
    }

    fn flag_obj(&self, key: &str, at: Option<&[ChangeHash]>) -> Option<ObjId> {
        let flags = self.root_map("flags", at)?;
        self.sub_map(&flags, key, at)
    }

    fn evaluators(&self, at: Option<&[ChangeHash]>) -> IndexMap<String, Value> {
        let Some(obj) = self.root_map("$evaluators", at) else {
            return IndexMap::new();
        };
        self.leaf_map(&obj, at).into_iter().collect()
    }

    fn keys_of(&self, obj: &ObjId, at: Option<&[ChangeHash]>) -> Vec<String> {
        match at {
            Some(h) => self.doc.keys_at(obj, h).collect(),
            None => self.doc.keys(obj).collect(),
        }
    }

    /// The entries of one map, in key order, each a decoded JSON leaf or a nested map.
    fn entries(&self, obj: &ObjId, at: Option<&[ChangeHash]>) -> Vec<Entry> {
        let read = Entry::from_item;
        match at {
            Some(h) => self.doc.map_range_at(obj, .., h).map(read).collect(),
            None => self.doc.map_range(obj, ..).map(read).collect(),
        }
    }

    /// Every map of the document with its entries, read in one pass (much cheaper than one range
    /// read per map when rendering everything).
    fn tree(&self, at: Option<&[ChangeHash]>) -> HashMap<ObjId, Vec<Entry>> {
        let mut tree: HashMap<ObjId, Vec<Entry>> = HashMap::new();
        for item in self.doc.iter_at(ROOT, at) {
            if let automerge::iter::DocItem::Map(m) = item.item {
                tree.entry((*item.obj).clone())
                    .or_default()
                    .push(Entry::from_item(m));
            }
        }
        for entries in tree.values_mut() {
            entries.sort_by(|a, b| a.key.cmp(&b.key));
        }
        tree
    }

    /// A map of JSON leaves, decoded; undecodable leaves are skipped.
    fn leaf_map(&self, obj: &ObjId, at: Option<&[ChangeHash]>) -> Map<String, Value> {
        leaf_map_of(self.entries(obj, at))
    }

    /// One flag's map as flagd JSON.
    fn render_flag(&self, obj: &ObjId, at: Option<&[ChangeHash]>) -> Value {
        render_flag_from(obj, &mut |o| self.entries(o, at))
    }

    /// The whole document as flagd JSON (map form unless the stored form says array).
    fn render(&self, at: Option<&[ChangeHash]>) -> Value {
        let mut tree = self.tree(at);
        render_from(&mut |o| tree.remove(o).unwrap_or_default())
    }
}

/// One flag's map as flagd JSON; `entries` yields each map's entries.
fn render_flag_from(obj: &ObjId, entries: &mut dyn FnMut(&ObjId) -> Vec<Entry>) -> Value {
    let mut state = None;
    let mut default_variant = None;
    let mut targeting = None;
    let mut variants = Map::new();
    let mut metadata = Map::new();
    let mut extra = Map::new();
    for e in entries(obj) {
        match (e.key.as_str(), e.node) {
            ("state", Node::Leaf(v)) => state = v,
            ("defaultVariant", Node::Leaf(v)) => default_variant = v,
            ("targeting", Node::Leaf(v)) => targeting = v,
            ("variants", Node::Map(m)) => variants = leaf_map_of(entries(&m)),
            ("metadata", Node::Map(m)) => metadata = leaf_map_of(entries(&m)),
            ("extra", Node::Map(m)) => extra = leaf_map_of(entries(&m)),
            _ => {}
        }
    }
    let mut out = Map::new();
    if let Some(v) = state {
        out.insert("state".into(), v);
    }
    out.insert("variants".into(), Value::Object(variants));
    if let Some(v) = default_variant {
        out.insert("defaultVariant".into(), v);
    }
    if let Some(v) = targeting {
        out.insert("targeting".into(), v);
    }
    if !metadata.is_empty() {
        out.insert("metadata".into(), Value::Object(metadata));
    }
    for (k, v) in extra {
        if !is_flag_member(&k) {
            out.insert(k, v);
        }
    }
    Value::Object(out)
}

/// The whole document as flagd JSON; `entries` yields each map's entries.
fn render_from(entries: &mut dyn FnMut(&ObjId) -> Vec<Entry>) -> Value {
    let mut schema = None;
    let mut array_form = false;
    let mut flags = Map::new();
    let mut evaluators = Map::new();
    let mut metadata = Map::new();
    let mut extra = Map::new();
    for e in entries(&ROOT) {
        match (e.key.as_str(), e.node) {
            ("$schema", Node::Leaf(Some(Value::String(s)))) => schema = Some(s),
            ("flagsForm", Node::Leaf(v)) => array_form = v == Some(json!("array")),
            ("flags", Node::Map(m)) => {
                for f in entries(&m) {
                    if let Node::Map(obj) = f.node {
                        flags.insert(f.key, render_flag_from(&obj, entries));
                    }
                }
            }
            ("$evaluators", Node::Map(m)) => evaluators = leaf_map_of(entries(&m)),
            ("metadata", Node::Map(m)) => metadata = leaf_map_of(entries(&m)),
            ("extra", Node::Map(m)) => extra = leaf_map_of(entries(&m)),
            _ => {}
        }
    }
    let mut out = Map::new();
    if let Some(s) = schema {
        out.insert("$schema".into(), Value::String(s));
    }
    if array_form {
        let list = flags
            .into_iter()
            .map(|(k, mut v)| {
                let mut obj = Map::new();
                obj.insert("key".into(), Value::String(k));
                if let Value::Object(m) = &mut v {
                    obj.append(m);
                }
                Value::Object(obj)
            })
            .collect();
        out.insert("flags".into(), Value::Array(list));
    } else {
        out.insert("flags".into(), Value::Object(flags));
    }
    if !evaluators.is_empty() {
        out.insert("$evaluators".into(), Value::Object(evaluators));
    }
    if !metadata.is_empty() {
        out.insert("metadata".into(), Value::Object(metadata));
    }
    for (k, v) in extra {
        if !matches!(k.as_str(), "flags" | "$evaluators" | "metadata" | "$schema") {
            out.insert(k, v);
        }
    }
    Value::Object(out)
}

impl FlagSetDoc {
    fn fields_of_flag(&self, key: &str, obj: &ObjId) -> Vec<Field> {
        self.fields_of_flag_at(key, obj, None)
    }

    /// Every field stored in one flag's map.
    fn fields_of_flag_at(&self, key: &str, obj: &ObjId, at: Option<&[ChangeHash]>) -> Vec<Field> {
        let k = key.to_owned();
        let mut out = vec![
            Field::State(k.clone()),
            Field::DefaultVariant(k.clone()),
            Field::Targeting(k.clone()),
        ];
        let subs: [(&str, FlagFieldOf); 3] = [
            ("variants", Field::Variant),
            ("metadata", Field::FlagMetadata),
            ("extra", Field::FlagExtra),
        ];
        for (name, make) in subs {
            if let Some(m) = self.sub_map(obj, name, at) {
                out.extend(self.keys_of(&m, at).into_iter().map(|n| make(k.clone(), n)));
            }
        }
        out
    }

    /// Every set-wide field stored now.
    fn set_fields(&self, at: Option<&[ChangeHash]>) -> Vec<Field> {
        let mut out = vec![Field::Schema, Field::FlagsForm];
        let maps: [(&str, SetFieldOf); 3] = [
            ("$evaluators", Field::Evaluator),
            ("metadata", Field::SetMetadata),
            ("extra", Field::SetExtra),
        ];
        for (name, make) in maps {
            if let Some(m) = self.root_map(name, at) {
                out.extend(self.keys_of(&m, at).into_iter().map(make));
            }
        }
        out
    }

    fn push_field_conflict(&self, field: &Field, out: &mut Vec<Conflict>) {
        let Some((obj, prop)) = self.field_location(field, None) else {
            return;
        };
        let all = self.doc.get_all(&obj, prop.as_str()).unwrap_or_default();
        if all.len() < 2 {
            return;
        }
        let winner = self
            .doc
            .get(&obj, prop.as_str())
            .ok()
            .flatten()
            .map(|(_, id)| id);
        out.push(Conflict {
            pointer: field.pointer(),
            kind: ConflictKind::ConcurrentValues,
            values: all
                .iter()
                .map(|(v, id)| ConflictValue {
                    value: decode_leaf(v),
                    author: self.author_of_op(id),
                    winner: winner.as_ref() == Some(id),
                })
                .collect(),
        });
    }

    fn author_of_op(&self, id: &ObjId) -> Option<Author> {
        let hash = self.doc.hash_for_opid(id)?;
        self.author_of_change(&hash)
    }

    fn author_of_change(&self, hash: &ChangeHash) -> Option<Author> {
        let meta = self.doc.get_change_meta_by_hash(hash)?;
        let record = ChangeRecord::parse(meta.message.as_deref()?)?;
        Some(record.into_entry(hash.to_string()).author)
    }

    // ---- deletions that raced edits ----

    /// Changes that touched each flag (from the audit records), in causal order.
    fn changes_by_flag(
        &self,
    ) -> (
        HashMap<String, Vec<ChangeHash>>,
        HashMap<ChangeHash, ChangeInfo>,
    ) {
        let mut by_flag: HashMap<String, Vec<ChangeHash>> = HashMap::new();
        let mut info = HashMap::new();
        for (index, m) in self.doc.get_changes_meta(&[]).iter().enumerate() {
            let record = m.message.as_deref().and_then(ChangeRecord::parse);
            if let Some(r) = &record {
                if let Some(flag) = &r.flag {
                    by_flag.entry(flag.clone()).or_default().push(m.hash);
                }
            }
            info.insert(
                m.hash,
                ChangeInfo {
                    index,
                    deps: m.deps.clone(),
                    delete: record.as_ref().is_some_and(|r| r.operation == "delete"),
                },
            );
        }
        (by_flag, info)
    }

    fn delete_conflicts(&self) -> Vec<Conflict> {
        let (by_flag, info) = self.changes_by_flag();
        let mut keys: Vec<&String> = by_flag
            .iter()
            .filter(|(_, hs)| hs.iter().any(|h| info.get(h).is_some_and(|i| i.delete)))
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| self.delete_conflict_in(k, &by_flag[k], &info))
            .collect()
    }

    fn delete_conflict_of(&self, key: &str) -> Option<Conflict> {
        let (by_flag, info) = self.changes_by_flag();
        self.delete_conflict_in(key, by_flag.get(key)?, &info)
    }

    /// The latest changes touching a flag (those no other such change descends from): a conflict
    /// when they are several and one of them deleted the flag.
    fn delete_conflict_in(
        &self,
        key: &str,
        touching: &[ChangeHash],
        info: &HashMap<ChangeHash, ChangeInfo>,
    ) -> Option<Conflict> {
        let mut frontier: Vec<ChangeHash> = Vec::new();
        for h in touching {
            frontier.retain(|f| !is_ancestor(info, f, h));
            frontier.push(*h);
        }
        // Replicas list changes in different causal orders: report in hash order everywhere.
        frontier.sort();
        if frontier.len() < 2
            || !frontier
                .iter()
                .any(|h| info.get(h).is_some_and(|i| i.delete))
        {
            return None;
        }
        let present = self.flag_obj(key, None).is_some();
        Some(Conflict {
            pointer: Field::Flag(key.to_owned()).pointer(),
            kind: ConflictKind::DeletedWhileEdited,
            values: frontier
                .iter()
                .map(|h| {
                    let delete = info.get(h).is_some_and(|i| i.delete);
                    ConflictValue {
                        value: if delete {
                            None
                        } else {
                            self.flag_value_after(key, h)
                        },
                        author: self.author_of_change(h),
                        winner: delete != present,
                    }
                })
                .collect(),
        })
    }

    /// The flag as it was right after change `h` (what the losing edit wanted).
    fn flag_value_after(&self, key: &str, h: &ChangeHash) -> Option<Value> {
        let at = [*h];
        self.flag_obj(key, Some(&at))
            .map(|o| self.render_flag(&o, Some(&at)))
    }
}

/// Makes the field of a flag's sub-map entry from (flag key, entry name).
type FlagFieldOf = fn(String, String) -> Field;
/// Makes the field of a set-wide map entry from its name.
type SetFieldOf = fn(String) -> Field;

#[derive(Debug, Clone)]
struct ChangeInfo {
    /// Position in a causal order of all changes: an ancestor always has a smaller index.
    index: usize,
    deps: Vec<ChangeHash>,
    delete: bool,
}

/// Whether `a` is an ancestor of `b` (walks `b`'s dependencies, never below `a`'s position).
fn is_ancestor(info: &HashMap<ChangeHash, ChangeInfo>, a: &ChangeHash, b: &ChangeHash) -> bool {
    let Some(floor) = info.get(a).map(|i| i.index) else {
        return false;
    };
    let mut stack = vec![*b];
    let mut seen = HashSet::new();
    while let Some(h) = stack.pop() {
        if &h == a {
            return true;
        }
        let Some(i) = info.get(&h) else { continue };
        if i.index <= floor || !seen.insert(h) {
            continue;
        }
        stack.extend(i.deps.iter().copied());
    }
    false
}

/// The audit record stored as JSON in each change's message.
#[derive(Debug, Clone, PartialEq)]
struct ChangeRecord {
    token_id: String,
    region: String,
    node: String,
    wall_time_ms: u64,
    message: String,
    flag: Option<String>,
    operation: String,
}

impl ChangeRecord {
    fn to_json(&self) -> String {
        json!({
            "v": 1,
            "token": self.token_id,
            "region": self.region,
            "node": self.node,
            "time": self.wall_time_ms,
            "message": self.message,
            "flag": self.flag,
            "op": self.operation,
        })
        .to_string()
    }

    fn parse(text: &str) -> Option<ChangeRecord> {
        let v: Value = serde_json::from_str(text).ok()?;
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Some(ChangeRecord {
            token_id: s("token"),
            region: s("region"),
            node: s("node"),
            wall_time_ms: v.get("time").and_then(Value::as_u64).unwrap_or_default(),
            message: s("message"),
            flag: v.get("flag").and_then(Value::as_str).map(str::to_owned),
            operation: s("op"),
        })
    }

    fn into_entry(self, change: String) -> AuditEntry {
        AuditEntry {
            author: Author {
                token_id: self.token_id,
                region: self.region,
                node: self.node,
                wall_time_ms: self.wall_time_ms,
                change,
            },
            message: self.message,
            flag: self.flag,
            operation: self.operation,
        }
    }
}

fn leaf_map_of(entries: Vec<Entry>) -> Map<String, Value> {
    entries
        .into_iter()
        .filter_map(|e| match e.node {
            Node::Leaf(Some(v)) => Some((e.key, v)),
            _ => None,
        })
        .collect()
}

/// One entry of a map in the document.
struct Entry {
    key: String,
    node: Node,
    /// Whether the key holds concurrent values.
    conflict: bool,
}

impl Entry {
    fn from_item(item: automerge::iter::MapRangeItem<'_>) -> Entry {
        let node = match &item.value {
            ValueRef::Object(ObjType::Map) => Node::Map(item.id()),
            ValueRef::Scalar(ScalarValueRef::Str(text)) => {
                Node::Leaf(serde_json::from_str(text).ok())
            }
            _ => Node::Leaf(None),
        };
        Entry {
            key: item.key.into_owned(),
            node,
            conflict: item.conflict,
        }
    }
}

enum Node {
    /// A JSON leaf, decoded (`None` when it does not decode).
    Leaf(Option<Value>),
    Map(ObjId),
}

/// The document every replica starts from, identical everywhere.
fn genesis() -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(GENESIS_ACTOR));
    let mut tx = doc.transaction();
    for name in ROOT_MAPS {
        // Writing into a fresh transaction on the root cannot fail.
        let _ = tx.put_object(ROOT, name, ObjType::Map);
    }
    tx.commit_with(CommitOptions::default().with_time(0));
    doc
}

fn genesis_hash() -> ChangeHash {
    genesis()
        .get_heads()
        .first()
        .copied()
        .unwrap_or(ChangeHash([0; 32]))
}

/// Applies one edit inside a transaction.
fn write_edit(
    tx: &mut Transaction<'_>,
    edit: &Edit,
    flags: Option<ObjId>,
    locations: &[Option<(ObjId, String)>],
) -> Result<(), automerge::AutomergeError> {
    let flags = flags.unwrap_or(ROOT);
    match edit {
        Edit::Create(key, flag) => {
            let obj = tx.put_object(&flags, key.as_str(), ObjType::Map)?;
            let variants = tx.put_object(&obj, "variants", ObjType::Map)?;
            let metadata = tx.put_object(&obj, "metadata", ObjType::Map)?;
            let extra = tx.put_object(&obj, "extra", ObjType::Map)?;
            let value = flag.to_value();
            for (field, v) in flag_fields(key, &value) {
                let Some(v) = v else { continue };
                let (target, prop) = match &field {
                    Field::Variant(_, n) => (&variants, n.as_str()),
                    Field::FlagMetadata(_, n) => (&metadata, n.as_str()),
                    Field::FlagExtra(_, n) => (&extra, n.as_str()),
                    Field::State(_) => (&obj, "state"),
                    Field::DefaultVariant(_) => (&obj, "defaultVariant"),
                    Field::Targeting(_) => (&obj, "targeting"),
                    _ => continue,
                };
                tx.put(target, prop, encode_leaf(&v))?;
            }
        }
        Edit::Delete(key) => tx.delete(&flags, key.as_str())?,
        Edit::ConfirmDelete(_) => {}
        Edit::Fields(key, writes) => {
            // Sub-maps missing from a flag (written by an older or faulty peer) are made on demand.
            let flag_obj = match tx.get(&flags, key.as_str())? {
                Some((automerge::Value::Object(ObjType::Map), id)) => id,
                _ => return Err(automerge::AutomergeError::InvalidObjId(key.clone())),
            };
            for ((field, value), loc) in writes.iter().zip(locations) {
                let (obj, prop) = match loc {
                    Some(l) => l.clone(),
                    None => {
                        let (sub, prop) = match field {
                            Field::Variant(_, n) => ("variants", n),
                            Field::FlagMetadata(_, n) => ("metadata", n),
                            Field::FlagExtra(_, n) => ("extra", n),
                            _ => continue,
                        };
                        if value.is_none() {
                            continue;
                        }
                        let m = match tx.get(&flag_obj, sub)? {
                            Some((automerge::Value::Object(ObjType::Map), id)) => id,
                            _ => tx.put_object(&flag_obj, sub, ObjType::Map)?,
                        };
                        (m, prop.clone())
                    }
                };
                match value {
                    Some(v) => tx.put(&obj, prop.as_str(), encode_leaf(v))?,
                    None => {
                        if tx.get(&obj, prop.as_str())?.is_some() {
                            tx.delete(&obj, prop.as_str())?;
                        }
                    }
                }
            }
        }
        Edit::Set(writes) => {
            for ((_, value), loc) in writes.iter().zip(locations) {
                let Some((obj, prop)) = loc else { continue };
                match value {
                    Some(v) => tx.put(obj, prop.as_str(), encode_leaf(v))?,
                    None => {
                        if tx.get(obj, prop.as_str())?.is_some() {
                            tx.delete(obj, prop.as_str())?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn encode_leaf(value: &Value) -> ScalarValue {
    ScalarValue::Str(value.to_string().into())
}

fn decode_leaf(value: &automerge::Value<'_>) -> Option<Value> {
    serde_json::from_str(value.as_str()?).ok()
}

fn default_variant_json(dv: &DefaultVariant) -> Option<Value> {
    match dv {
        DefaultVariant::Absent => None,
        DefaultVariant::Null => Some(Value::Null),
        DefaultVariant::Key(k) => Some(Value::String(k.clone())),
    }
}

fn is_flag_member(name: &str) -> bool {
    matches!(
        name,
        "state" | "variants" | "defaultVariant" | "targeting" | "metadata" | "key"
    )
}

/// The fields of a flag's flagd JSON, each with its value.
fn flag_fields(key: &str, flag: &Value) -> Vec<(Field, Option<Value>)> {
    let k = key.to_owned();
    let mut out = Vec::new();
    let Some(obj) = flag.as_object() else {
        return out;
    };
    for (name, v) in obj {
        match name.as_str() {
            "state" => out.push((Field::State(k.clone()), Some(v.clone()))),
            "defaultVariant" => out.push((Field::DefaultVariant(k.clone()), Some(v.clone()))),
            "targeting" => out.push((Field::Targeting(k.clone()), Some(v.clone()))),
            "variants" | "metadata" => {
                for (n, value) in v.as_object().into_iter().flatten() {
                    let field = if name == "variants" {
                        Field::Variant(k.clone(), n.clone())
                    } else {
                        Field::FlagMetadata(k.clone(), n.clone())
                    };
                    out.push((field, Some(value.clone())));
                }
            }
            "key" => {}
            other => out.push((
                Field::FlagExtra(k.clone(), other.to_owned()),
                Some(v.clone()),
            )),
        }
    }
    out
}

/// A flag field's value inside a flag's flagd JSON.
fn field_in(flag: &Value, field: &Field) -> Option<Value> {
    let get = |path: &[&str]| {
        let mut v = flag;
        for p in path {
            v = v.get(p)?;
        }
        Some(v.clone())
    };
    match field {
        Field::State(_) => get(&["state"]),
        Field::DefaultVariant(_) => get(&["defaultVariant"]),
        Field::Targeting(_) => get(&["targeting"]),
        Field::Variant(_, n) => get(&["variants", n]),
        Field::FlagMetadata(_, n) => get(&["metadata", n]),
        Field::FlagExtra(_, n) if !is_flag_member(n) => get(&[n]),
        _ => None,
    }
}

/// Set-wide fields of a flagd document.
fn set_fields_of_value(doc: &Value) -> BTreeMap<Field, Value> {
    let mut out = BTreeMap::new();
    let Some(obj) = doc.as_object() else {
        return out;
    };
    for (name, v) in obj {
        match name.as_str() {
            "flags" => {
                if v.is_array() {
                    out.insert(Field::FlagsForm, json!("array"));
                }
            }
            "$schema" => {
                out.insert(Field::Schema, v.clone());
            }
            "$evaluators" => {
                for (n, r) in v.as_object().into_iter().flatten() {
                    out.insert(Field::Evaluator(n.clone()), r.clone());
                }
            }
            "metadata" => {
                for (n, m) in v.as_object().into_iter().flatten() {
                    out.insert(Field::SetMetadata(n.clone()), m.clone());
                }
            }
            other => {
                out.insert(Field::SetExtra(other.to_owned()), v.clone());
            }
        }
    }
    out
}

fn field_flag_key(field: &Field) -> Option<&str> {
    match field {
        Field::Flag(k)
        | Field::State(k)
        | Field::DefaultVariant(k)
        | Field::Targeting(k)
        | Field::Variant(k, _)
        | Field::FlagMetadata(k, _)
        | Field::FlagExtra(k, _) => Some(k),
        _ => None,
    }
}

fn validate_one(key: &str, flag: &Flag, evaluators: &IndexMap<String, Value>) -> Result<(), Error> {
    let problems = bunting_model::validate_flag(key, flag, evaluators);
    bunting_model::Problems(problems)
        .into_result()
        .map_err(Error::Invalid)
}

/// The flag key a problem pointer is about (`/flags/KEY/...`), unescaped.
fn flag_key_of_pointer(p: &str) -> Option<String> {
    let rest = p.strip_prefix("/flags/")?;
    let seg = rest.split('/').next()?;
    Some(seg.replace("~1", "/").replace("~0", "~"))
}

/// Renders an array-form document in map form (validation pointers then name keys).
fn strip_array_form(doc: Value) -> Value {
    let mut doc = doc;
    if let Some(obj) = doc.as_object_mut() {
        if let Some(Value::Array(list)) = obj.get("flags").cloned() {
            let mut map = Map::new();
            for mut f in list {
                let key = f
                    .as_object_mut()
                    .and_then(|o| o.remove("key"))
                    .and_then(|k| k.as_str().map(str::to_owned));
                if let Some(k) = key {
                    map.insert(k, f);
                }
            }
            obj.insert("flags".into(), Value::Object(map));
        }
    }
    doc
}

/// Set-wide writes must not add problems: flags already broken by a merge stay broken but do not
/// block an unrelated evaluator or metadata write.
fn validate_set_wide(current: &FlagSet, set: &FlagSet) -> Result<(), Error> {
    let before: HashSet<Problem> = problems_of(current).into_iter().collect();
    let new: Vec<Problem> = problems_of(set)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if new.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(bunting_model::Problems(new)))
    }
}

/// Every validation problem of a flag set, with pointers in map form.
fn problems_of(set: &FlagSet) -> Vec<Problem> {
    let mut as_map = set.clone();
    as_map.flags_form = FlagsForm::Map;
    match FlagSet::from_value(&as_map.to_value()) {
        Ok(_) => Vec::new(),
        Err(p) => p.0,
    }
}

/// Applies a one-field patch command to `flag`; returns the field write, `None` for commands that
/// are not one-field patches.
fn patch_flag(flag: &mut Flag, command: &WriteCommand) -> Option<(Field, Option<Value>)> {
    Some(match command {
        WriteCommand::SetState { key, state } => {
            flag.state = *state;
            (Field::State(key.clone()), Some(Value::from(state.as_str())))
        }
        WriteCommand::SetDefaultVariant {
            key,
            default_variant,
        } => {
            flag.default_variant = default_variant.clone();
            (
                Field::DefaultVariant(key.clone()),
                default_variant_json(default_variant),
            )
        }
        WriteCommand::SetTargeting { key, targeting } => {
            flag.targeting = targeting.clone();
            (Field::Targeting(key.clone()), targeting.clone())
        }
        WriteCommand::SetVariant {
            key,
            variant,
            value,
        } => {
            match value {
                Some(v) => {
                    flag.variants.insert(variant.clone(), v.clone());
                }
                None => {
                    flag.variants.shift_remove(variant);
                }
            }
            (Field::Variant(key.clone(), variant.clone()), value.clone())
        }
        WriteCommand::SetFlagMetadata { key, name, value } => {
            match value {
                Some(v) => {
                    flag.metadata.insert(name.clone(), v.clone());
                }
                None => {
                    flag.metadata.shift_remove(name);
                }
            }
            (
                Field::FlagMetadata(key.clone(), name.clone()),
                value.clone(),
            )
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bunting_model::FlagState;
    use serde_json::json;

    fn identity(node: &str) -> Identity {
        Identity {
            node: node.into(),
            region: format!("region-of-{node}"),
            incarnation: 1,
        }
    }

    fn meta(token: &str, time: u64) -> WriteMeta {
        WriteMeta {
            token_id: token.into(),
            wall_time_ms: time,
            message: format!("by {token}"),
        }
    }

    fn bool_flag(default: &str) -> Flag {
        Flag::from_value(
            &json!({"state": "ENABLED", "variants": {"on": true, "off": false},
                    "defaultVariant": default, "metadata": {"team": "web"}}),
            "",
        )
        .unwrap()
    }

    fn put(doc: &mut FlagSetDoc, key: &str, flag: Flag, time: u64) {
        doc.apply(
            &WriteCommand::PutFlag {
                key: key.into(),
                flag,
            }
            .into(),
            &meta("t-admin", time),
        )
        .unwrap();
    }

    fn write(doc: &mut FlagSetDoc, command: WriteCommand, token: &str, time: u64) {
        doc.apply(&command.into(), &meta(token, time)).unwrap();
    }

    /// A second replica holding what `doc` holds, writing as `node`.
    fn fork(doc: &FlagSetDoc, node: &str) -> FlagSetDoc {
        FlagSetDoc::load(Some(&doc.save()), &[], identity(node)).unwrap()
    }

    /// Both documents end up with every change of either.
    fn exchange(a: &mut FlagSetDoc, b: &mut FlagSetDoc) {
        a.doc.merge(&mut b.doc.clone()).unwrap();
        b.doc.merge(&mut a.doc.clone()).unwrap();
    }

    #[test]
    fn replicas_that_start_empty_share_one_genesis() {
        let a = FlagSetDoc::new(identity("a"));
        let b = FlagSetDoc::new(identity("b"));
        assert_eq!(a.heads(), b.heads());
        assert_eq!(a.heads().len(), 1);
    }

    #[test]
    fn flags_written_on_two_empty_replicas_both_survive_the_merge() {
        let mut a = FlagSetDoc::new(identity("a"));
        let mut b = FlagSetDoc::new(identity("b"));
        put(&mut a, "alpha", bool_flag("on"), 1);
        put(&mut b, "beta", bool_flag("off"), 2);
        exchange(&mut a, &mut b);
        let set = a.to_flagd();
        assert_eq!(set.flags.keys().collect::<Vec<_>>(), ["alpha", "beta"]);
        assert_eq!(a.to_flagd(), b.to_flagd());
        assert!(a.conflicts().is_empty());
    }

    #[test]
    fn a_flag_round_trips_through_the_document() {
        let mut doc = FlagSetDoc::new(identity("a"));
        let flag = Flag::from_value(
            &json!({"state": "DISABLED", "variants": {"red": {"hex": "#f00"}, "blue": {"hex": "#00f"}},
                    "defaultVariant": "red",
                    "targeting": {"if": [{"==": [{"var": "tier"}, "gold"]}, "blue", null]},
                    "metadata": {"owner": "web", "version": 3}, "x-note": "kept"}),
            "",
        )
        .unwrap();
        put(&mut doc, "colour", flag.clone(), 1);
        let got = doc.to_flagd();
        let mut expected = flag.clone();
        // The document keeps map keys sorted.
        expected.variants.sort_keys();
        expected.metadata.sort_keys();
        assert_eq!(got.flags["colour"], expected);
        assert!(doc.broken_flags().is_empty());
    }

    #[test]
    fn an_invalid_write_is_refused_and_changes_nothing() {
        let mut doc = FlagSetDoc::new(identity("a"));
        put(&mut doc, "f", bool_flag("on"), 1);
        let heads = doc.heads();
        let err = doc
            .apply(
                &WriteCommand::SetDefaultVariant {
                    key: "f".into(),
                    default_variant: DefaultVariant::Key("missing".into()),
                }
                .into(),
                &meta("t", 2),
            )
            .unwrap_err();
        assert!(matches!(err, Error::Invalid(p) if p.0[0].pointer == "/flags/f/defaultVariant"));
        let err = doc
            .apply(
                &WriteCommand::SetState {
                    key: "nope".into(),
                    state: FlagState::Disabled,
                }
                .into(),
                &meta("t", 2),
            )
            .unwrap_err();
        assert_eq!(err, Error::FlagNotFound("nope".into()));
        assert_eq!(doc.heads(), heads);
    }

    #[test]
    fn concurrent_edits_of_different_fields_both_survive() {
        let mut a = FlagSetDoc::new(identity("a"));
        put(&mut a, "f", bool_flag("on"), 1);
        let mut b = fork(&a, "b");
        write(
            &mut a,
            WriteCommand::SetState {
                key: "f".into(),
                state: FlagState::Disabled,
            },
            "ta",
            2,
        );
        write(
            &mut b,
            WriteCommand::SetDefaultVariant {
                key: "f".into(),
                default_variant: DefaultVariant::Key("off".into()),
            },
            "tb",
            3,
        );
        exchange(&mut a, &mut b);
        let f = a.flag("f").unwrap();
        assert_eq!(f.state, FlagState::Disabled);
        assert_eq!(f.default_variant, DefaultVariant::Key("off".into()));
        assert!(a.conflicts().is_empty());
    }

    #[test]
    fn concurrent_rule_edits_pick_one_whole_rule_and_show_both_until_overwritten() {
        let mut a = FlagSetDoc::new(identity("a"));
        put(&mut a, "f", bool_flag("on"), 1);
        let mut b = fork(&a, "b");
        let rule_a = json!({"if": [{"==": [{"var": "country"}, "NL"]}, "off", null]});
        let rule_b = json!({"if": [{"in": [{"var": "email"}, ["x@y.z"]]}, "on", "off"]});
        write(
            &mut a,
            WriteCommand::SetTargeting {
                key: "f".into(),
                targeting: Some(rule_a.clone()),
            },
            "ta",
            2,
        );
        write(
            &mut b,
            WriteCommand::SetTargeting {
                key: "f".into(),
                targeting: Some(rule_b.clone()),
            },
            "tb",
            3,
        );
        exchange(&mut a, &mut b);
        let winner = a.flag("f").unwrap().targeting.unwrap();
        assert!(winner == rule_a || winner == rule_b, "rule was spliced");
        assert_eq!(b.flag("f").unwrap().targeting.unwrap(), winner);
        let conflicts = a.conflicts();
        assert_eq!(conflicts.len(), 1);
        let c = &conflicts[0];
        assert_eq!(c.pointer, "/flags/f/targeting");
        assert_eq!(c.kind, ConflictKind::ConcurrentValues);
        let mut tokens: Vec<_> = c
            .values
            .iter()
            .map(|v| v.author.as_ref().unwrap().token_id.clone())
            .collect();
        tokens.sort();
        assert_eq!(tokens, ["ta", "tb"]);
        assert_eq!(c.values.iter().filter(|v| v.winner).count(), 1);
        assert_eq!(b.conflicts(), conflicts);
        // A later write over the field resolves the conflict.
        write(
            &mut a,
            WriteCommand::SetTargeting {
                key: "f".into(),
                targeting: Some(rule_a),
            },
            "ta",
            4,
        );
        assert!(a.conflicts().is_empty());
    }

    #[test]
    fn a_deletion_racing_an_edit_is_reported_until_confirmed() {
        let mut a = FlagSetDoc::new(identity("a"));
        put(&mut a, "f", bool_flag("on"), 1);
        let mut b = fork(&a, "b");
        write(
            &mut a,
            WriteCommand::DeleteFlag { key: "f".into() },
            "ta",
            2,
        );
        write(
            &mut b,
            WriteCommand::SetState {
                key: "f".into(),
                state: FlagState::Disabled,
            },
            "tb",
            3,
        );
        exchange(&mut a, &mut b);
        assert!(a.flag("f").is_none());
        assert!(b.flag("f").is_none());
        let conflicts = b.conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].kind, ConflictKind::DeletedWhileEdited);
        assert_eq!(conflicts[0].pointer, "/flags/f");
        let edit = conflicts[0]
            .values
            .iter()
            .find(|v| v.value.is_some())
            .unwrap();
        assert_eq!(edit.value.as_ref().unwrap()["state"], json!("DISABLED"));
        assert_eq!(edit.author.as_ref().unwrap().token_id, "tb");
        assert_eq!(a.conflicts(), conflicts);
        write(
            &mut b,
            WriteCommand::DeleteFlag { key: "f".into() },
            "tb",
            4,
        );
        assert!(b.conflicts().is_empty());
    }

    #[test]
    fn a_merged_flag_that_no_longer_validates_is_listed_as_broken() {
        let mut a = FlagSetDoc::new(identity("a"));
        put(&mut a, "f", bool_flag("on"), 1);
        let mut b = fork(&a, "b");
        // a moves the default to "off"; b (still defaulting to "on") removes "off".
        write(
            &mut a,
            WriteCommand::SetDefaultVariant {
                key: "f".into(),
                default_variant: DefaultVariant::Key("off".into()),
            },
            "ta",
            2,
        );
        write(
            &mut b,
            WriteCommand::SetVariant {
                key: "f".into(),
                variant: "off".into(),
                value: None,
            },
            "tb",
            3,
        );
        exchange(&mut a, &mut b);
        let broken = a.broken_flags();
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].key, "f");
        assert_eq!(broken, b.broken_flags());
        // It still renders.
        assert!(a.to_flagd().flags.contains_key("f"));
    }

    #[test]
    fn a_whole_set_upload_touches_only_the_flags_that_differ() {
        let mut doc = FlagSetDoc::new(identity("a"));
        let mut set = FlagSet::default();
        for i in 0..20 {
            set.flags.insert(format!("flag-{i:02}"), bool_flag("on"));
        }
        let m = meta("ci", 1);
        let made = doc
            .apply(&WriteCommand::ReplaceSet { set: set.clone() }.into(), &m)
            .unwrap();
        assert_eq!(made.len(), 20, "one change per flag");
        let again = doc
            .apply(&WriteCommand::ReplaceSet { set: set.clone() }.into(), &m)
            .unwrap();
        assert!(again.is_empty(), "an identical upload changes nothing");
        set.flags.get_mut("flag-07").unwrap().state = FlagState::Disabled;
        set.flags.shift_remove("flag-03");
        set.metadata.insert("env".into(), json!("prod"));
        let changed = doc
            .apply(&WriteCommand::ReplaceSet { set: set.clone() }.into(), &m)
            .unwrap();
        assert_eq!(
            changed.len(),
            3,
            "one flag edited, one deleted, set metadata"
        );
        let mut expected = set.clone();
        expected.flags.sort_keys();
        assert_eq!(doc.to_flagd(), expected);
    }

    #[test]
    fn a_stale_write_is_refused_with_the_current_values() {
        let mut doc = FlagSetDoc::new(identity("a"));
        put(&mut doc, "f", bool_flag("on"), 1);
        let base = doc.heads();
        write(
            &mut doc,
            WriteCommand::SetState {
                key: "f".into(),
                state: FlagState::Disabled,
            },
            "t1",
            2,
        );
        let stale = Write {
            command: WriteCommand::SetState {
                key: "f".into(),
                state: FlagState::Enabled,
            },
            based_on: Some(base.clone()),
        };
        let heads = doc.heads();
        let err = doc.apply(&stale, &meta("t2", 3)).unwrap_err();
        assert_eq!(
            err,
            Error::Stale {
                current: vec![FieldValue {
                    pointer: "/flags/f/state".into(),
                    value: Some(json!("DISABLED")),
                }]
            }
        );
        assert_eq!(doc.heads(), heads);
        // A write of another field based on the same heads goes through.
        let other = Write {
            command: WriteCommand::SetFlagMetadata {
                key: "f".into(),
                name: "team".into(),
                value: Some(json!("mobile")),
            },
            based_on: Some(base),
        };
        assert_eq!(doc.apply(&other, &meta("t2", 4)).unwrap().len(), 1);
    }

    #[test]
    fn removing_an_evaluator_a_flag_uses_is_refused() {
        let mut doc = FlagSetDoc::new(identity("a"));
        write(
            &mut doc,
            WriteCommand::SetEvaluator {
                name: "vip".into(),
                rule: Some(json!({"in": [{"var": "tier"}, ["gold"]]})),
            },
            "t",
            1,
        );
        let mut flag = bool_flag("off");
        flag.targeting = Some(json!({"if": [{"$ref": "vip"}, "on", null]}));
        put(&mut doc, "f", flag, 2);
        let heads = doc.heads();
        let err = doc
            .apply(
                &WriteCommand::SetEvaluator {
                    name: "vip".into(),
                    rule: None,
                }
                .into(),
                &meta("t", 3),
            )
            .unwrap_err();
        assert!(matches!(err, Error::Invalid(_)));
        assert_eq!(doc.heads(), heads);
        assert_eq!(doc.to_flagd().evaluators.len(), 1);
        // An unrelated set-wide write goes through.
        write(
            &mut doc,
            WriteCommand::SetSetMetadata {
                name: "env".into(),
                value: Some(json!("prod")),
            },
            "t",
            4,
        );
        assert_eq!(doc.to_flagd().metadata["env"], json!("prod"));
    }

    #[test]
    fn touched_flags_name_what_changed_since_given_heads() {
        let mut doc = FlagSetDoc::new(identity("a"));
        put(&mut doc, "a", bool_flag("on"), 1);
        let base = doc.heads();
        put(&mut doc, "b", bool_flag("on"), 2);
        write(
            &mut doc,
            WriteCommand::DeleteFlag { key: "a".into() },
            "t",
            3,
        );
        let touched = doc.touched_flags(&base).unwrap();
        assert_eq!(touched.into_iter().collect::<Vec<_>>(), ["a", "b"]);
        let before_set_write = doc.heads();
        write(
            &mut doc,
            WriteCommand::SetSetMetadata {
                name: "env".into(),
                value: Some(json!("prod")),
            },
            "t",
            4,
        );
        assert_eq!(doc.touched_flags(&before_set_write), None);
    }

    #[test]
    fn a_field_a_faulty_peer_mistyped_hides_only_its_flag() {
        let mut doc = FlagSetDoc::new(identity("a"));
        put(&mut doc, "good", bool_flag("on"), 1);
        put(&mut doc, "bad", bool_flag("on"), 2);
        let obj = doc.flag_obj("bad", None).unwrap();
        let mut tx = doc.doc.transaction();
        tx.put(&obj, "state", "\"SOMETIMES\"").unwrap();
        tx.commit();
        let set = doc.to_flagd();
        assert_eq!(set.flags.keys().collect::<Vec<_>>(), ["good"]);
        let broken = doc.broken_flags();
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].key, "bad");
    }

    #[test]
    fn history_is_newest_first_paged_and_filterable() {
        let mut doc = FlagSetDoc::new(identity("a"));
        put(&mut doc, "a", bool_flag("on"), 10);
        put(&mut doc, "b", bool_flag("on"), 20);
        write(
            &mut doc,
            WriteCommand::SetState {
                key: "a".into(),
                state: FlagState::Disabled,
            },
            "t-ops",
            30,
        );
        let all = doc.history(&HistoryQuery::default());
        assert_eq!(
            all.iter()
                .map(|e| e.author.wall_time_ms)
                .collect::<Vec<_>>(),
            [30, 20, 10]
        );
        assert_eq!(all[0].author.token_id, "t-ops");
        assert_eq!(all[0].author.region, "region-of-a");
        assert_eq!(all[0].operation, "update");
        let only_a = doc.history(&HistoryQuery {
            flag: Some("a".into()),
            ..Default::default()
        });
        assert_eq!(only_a.len(), 2);
        let page = doc.history(&HistoryQuery {
            offset: 1,
            limit: 1,
            ..Default::default()
        });
        assert_eq!(page, vec![all[1].clone()]);
    }

    #[test]
    fn a_saved_document_loads_with_a_new_actor() {
        let mut doc = FlagSetDoc::new(identity("a"));
        put(&mut doc, "f", bool_flag("on"), 1);
        let mut next = identity("a");
        next.incarnation = 2;
        let loaded = FlagSetDoc::load(Some(&doc.save()), &[], next.clone()).unwrap();
        assert_eq!(loaded.heads(), doc.heads());
        assert_eq!(loaded.automerge().get_actor(), &next.actor_id());
        let from_changes = FlagSetDoc::load(None, &doc.changes_since(&[]), next).unwrap();
        assert_eq!(from_changes.to_flagd(), doc.to_flagd());
        let mut torn = doc.save();
        torn.truncate(torn.len() - 3);
        assert!(FlagSetDoc::load(Some(&torn), &[], identity("a")).is_err());
        // A lost record in the middle is reported, not skipped.
        put(&mut doc, "g", bool_flag("on"), 2);
        let mut changes = doc.changes_since(&[]);
        changes.remove(1);
        assert!(FlagSetDoc::load(None, &changes, identity("a")).is_err());
    }
}
