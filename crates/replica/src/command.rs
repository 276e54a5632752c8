//! Admin writes as typed commands, and the metadata every change records.

use automerge::ChangeHash;
use bunting_model::{DefaultVariant, Flag, FlagSet, FlagState};
use serde_json::Value;

/// One admin write against one flag set.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteCommand {
    /// Creates the flag, or replaces it (written as the field-level difference, so concurrent edits
    /// of fields this write leaves unchanged survive).
    PutFlag { key: String, flag: Flag },
    /// Sets `state`.
    SetState { key: String, state: FlagState },
    /// Sets `defaultVariant` (absent, `null` or a variant key).
    SetDefaultVariant {
        key: String,
        default_variant: DefaultVariant,
    },
    /// Sets or removes (`None`) the whole targeting rule.
    SetTargeting {
        key: String,
        targeting: Option<Value>,
    },
    /// Sets or removes (`None`) one variant.
    SetVariant {
        key: String,
        variant: String,
        value: Option<Value>,
    },
    /// Sets or removes (`None`) one metadata entry of a flag.
    SetFlagMetadata {
        key: String,
        name: String,
        value: Option<Value>,
    },
    /// Deletes the flag. On a flag already gone whose deletion raced an edit, it confirms the
    /// deletion and so resolves that conflict.
    DeleteFlag { key: String },
    /// Replaces the whole flag set with a flagd document, written as the minimal field-level
    /// difference with one Automerge change per flag touched.
    ReplaceSet { set: FlagSet },
    /// Sets or removes (`None`) one `$evaluators` entry.
    SetEvaluator { name: String, rule: Option<Value> },
    /// Sets or removes (`None`) one flag-set metadata entry.
    SetSetMetadata { name: String, value: Option<Value> },
}

impl WriteCommand {
    /// The flag a command is about, for the audit log; `None` for set-wide commands.
    pub fn flag_key(&self) -> Option<&str> {
        match self {
            WriteCommand::PutFlag { key, .. }
            | WriteCommand::SetState { key, .. }
            | WriteCommand::SetDefaultVariant { key, .. }
            | WriteCommand::SetTargeting { key, .. }
            | WriteCommand::SetVariant { key, .. }
            | WriteCommand::SetFlagMetadata { key, .. }
            | WriteCommand::DeleteFlag { key } => Some(key),
            WriteCommand::ReplaceSet { .. }
            | WriteCommand::SetEvaluator { .. }
            | WriteCommand::SetSetMetadata { .. } => None,
        }
    }
}

/// A command with its optional optimistic-concurrency precondition.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub command: WriteCommand,
    /// The document heads the writer read before deciding; when given, the write is refused if any
    /// field it touches was changed after them (HTTP maps this to 409/412).
    pub based_on: Option<Vec<ChangeHash>>,
}

impl From<WriteCommand> for Write {
    fn from(command: WriteCommand) -> Self {
        Write {
            command,
            based_on: None,
        }
    }
}

/// Who wrote and why; recorded in every change so the history is the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteMeta {
    /// Id of the API token that authorised the write (never the secret).
    pub token_id: String,
    /// Wall-clock time of the write in milliseconds since the Unix epoch, read by the driver.
    pub wall_time_ms: u64,
    /// The admin's reason for the change.
    pub message: String,
}
