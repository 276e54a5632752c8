//! OpenFeature resolution details: what one evaluation of one flag answers.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Why a flag resolved the way it did (OpenFeature's resolution reasons, as flagd reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The flag has no targeting: its default variant is served.
    Static,
    /// Targeting returned a variant key.
    TargetingMatch,
    /// A fractional split chose the variant. flagd reports fractional results as TARGETING_MATCH,
    /// and so does this engine; the reason exists for callers that build resolutions themselves.
    Split,
    /// Targeting returned null: the default variant is served (or no value, when there is none).
    Default,
    /// The flag is disabled: no value and no variant, so the caller's code default is used.
    Disabled,
    /// The flag could not be resolved; see the error code.
    Error,
}

impl Reason {
    /// The OpenFeature spelling, e.g. `TARGETING_MATCH`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Split => "SPLIT",
            Reason::Default => "DEFAULT",
            Reason::Disabled => "DISABLED",
            Reason::Error => "ERROR",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// OpenFeature error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No flag with that key in the flag set.
    FlagNotFound,
    /// The flag's targeting rule could not be compiled.
    ParseError,
    /// The flag's value is not of the type the caller asked for.
    TypeMismatch,
    /// A targeting key was required but not given.
    TargetingKeyMissing,
    /// The evaluation context is malformed.
    InvalidContext,
    /// Anything else: an invalid flag, or targeting that named no variant.
    General,
}

impl ErrorCode {
    /// The OpenFeature spelling, e.g. `FLAG_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            ErrorCode::InvalidContext => "INVALID_CONTEXT",
            ErrorCode::General => "GENERAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A variant value shared between the compiled flag set and every resolution that serves it, with
/// its JSON text rendered once at compile time, so serving it costs a reference-count increment.
#[derive(Clone, PartialEq)]
pub struct SharedValue(Arc<SharedInner>);

#[derive(PartialEq)]
struct SharedInner {
    value: Value,
    /// The value as compact JSON, for writers that splice it into a response.
    json: Box<str>,
}

impl SharedValue {
    pub fn new(value: Value) -> Self {
        let json = value.to_string().into_boxed_str();
        SharedValue(Arc::new(SharedInner { value, json }))
    }

    pub fn value(&self) -> &Value {
        &self.0.value
    }

    /// The value as compact JSON text.
    pub fn json(&self) -> &str {
        &self.0.json
    }
}

impl Deref for SharedValue {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.0.value
    }
}

impl fmt::Debug for SharedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json())
    }
}

impl From<Value> for SharedValue {
    fn from(value: Value) -> Self {
        SharedValue::new(value)
    }
}

/// The outcome of evaluating one flag: OpenFeature's resolution details.
///
/// Every field is shared with the compiled flag set, so cloning or building one does not allocate
/// on the success path.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// The served value; `None` when the caller's code default applies (disabled flag, no default
    /// variant, error).
    pub value: Option<SharedValue>,
    /// The key of the served variant.
    pub variant: Option<Arc<str>>,
    pub reason: Reason,
    /// Set exactly when `reason` is [`Reason::Error`].
    pub error_code: Option<ErrorCode>,
    /// Human-readable detail of the error.
    pub error_details: Option<Arc<str>>,
    /// Flag-set metadata overlaid with the flag's own metadata (the flag's entries win).
    pub metadata: Arc<Map<String, Value>>,
}

impl Resolution {
    /// An error resolution.
    pub fn error(
        code: ErrorCode,
        details: impl Into<Arc<str>>,
        metadata: Arc<Map<String, Value>>,
    ) -> Self {
        Resolution {
            value: None,
            variant: None,
            reason: Reason::Error,
            error_code: Some(code),
            error_details: Some(details.into()),
            metadata,
        }
    }

    pub fn is_error(&self) -> bool {
        self.error_code.is_some()
    }

    /// The resolution in OFREP's shape: `{key, value, variant, reason, metadata}` on success,
    /// `{key, errorCode, errorDetails, metadata}` on error. Absent values are left out.
    pub fn to_ofrep_json(&self, key: &str) -> Value {
        let mut out = Map::new();
        out.insert("key".into(), Value::String(key.to_owned()));
        if let Some(code) = self.error_code {
            out.insert("errorCode".into(), Value::String(code.as_str().into()));
            if let Some(d) = &self.error_details {
                out.insert("errorDetails".into(), Value::String(d.to_string()));
            }
        } else {
            if let Some(v) = &self.value {
                out.insert("value".into(), v.value().clone());
            }
            if let Some(v) = &self.variant {
                out.insert("variant".into(), Value::String(v.to_string()));
            }
        }
        out.insert("reason".into(), Value::String(self.reason.as_str().into()));
        out.insert("metadata".into(), Value::Object((*self.metadata).clone()));
        Value::Object(out)
    }
}

/// A resolution whose value was checked against the type the caller asked for; built by the typed
/// accessors such as [`crate::CompiledFlagSet::evaluate_boolean`].
#[derive(Debug, Clone, PartialEq)]
pub struct TypedResolution<T> {
    /// The served value; `None` when the caller's code default applies.
    pub value: Option<T>,
    pub variant: Option<Arc<str>>,
    pub reason: Reason,
    pub error_code: Option<ErrorCode>,
    pub error_details: Option<Arc<str>>,
    pub metadata: Arc<Map<String, Value>>,
}

impl<T> TypedResolution<T> {
    /// Converts an untyped resolution with `convert`; a value it refuses becomes TYPE_MISMATCH.
    pub(crate) fn from_resolution(
        r: Resolution,
        expected: &str,
        convert: impl FnOnce(&Value) -> Option<T>,
    ) -> Self {
        let value = match &r.value {
            None => None,
            Some(v) => match convert(v.value()) {
                Some(t) => Some(t),
                None => {
                    return TypedResolution {
                        value: None,
                        variant: None,
                        reason: Reason::Error,
                        error_code: Some(ErrorCode::TypeMismatch),
                        error_details: Some(
                            format!("flag value {} is not of type {expected}", v.json()).into(),
                        ),
                        metadata: r.metadata,
                    }
                }
            },
        };
        TypedResolution {
            value,
            variant: r.variant,
            reason: r.reason,
            error_code: r.error_code,
            error_details: r.error_details,
            metadata: r.metadata,
        }
    }
}
