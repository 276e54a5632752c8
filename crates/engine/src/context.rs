//! The evaluation context: who is asking, and when.

use serde_json::{Map, Value};

use crate::error::EngineError;

/// What targeting rules see: the caller's attributes, the targeting key, and the time.
///
/// Rules read it as flagd builds it: the attributes as the data object, `targetingKey` among them,
/// and `$flagd.flagKey` / `$flagd.timestamp` added by the engine (a `$flagd` attribute given by the
/// caller is replaced, as flagd replaces it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvaluationContext {
    /// The subject's stable identifier; fractional rollouts bucket on it by default.
    pub targeting_key: Option<String>,
    /// Every other attribute, by name. A `targetingKey` member here is shadowed by `targeting_key`
    /// when that is set.
    pub attributes: Map<String, Value>,
    /// Unix seconds, seen by rules as `$flagd.timestamp`. The caller supplies it: the engine never
    /// reads the clock.
    pub timestamp: i64,
}

impl EvaluationContext {
    /// An empty context at `timestamp`.
    pub fn new(timestamp: i64) -> Self {
        EvaluationContext {
            timestamp,
            ..Default::default()
        }
    }

    /// The context an OFREP request sends: a JSON object whose `targetingKey` member, when it is a
    /// string, becomes the targeting key. Anything but an object is INVALID_CONTEXT; `null`
    /// (no context sent) is the empty context.
    pub fn from_value(value: &Value, timestamp: i64) -> Result<Self, EngineError> {
        match value {
            Value::Object(map) => Ok(Self::from_map(map.clone(), timestamp)),
            Value::Null => Ok(Self::new(timestamp)),
            other => Err(EngineError::InvalidContext(format!(
                "the context must be a JSON object, not {}",
                json_type_name(other)
            ))),
        }
    }

    /// Like [`EvaluationContext::from_value`], taking the object by value.
    pub fn from_map(mut attributes: Map<String, Value>, timestamp: i64) -> Self {
        let targeting_key = match attributes.get("targetingKey") {
            Some(Value::String(_)) => match attributes.remove("targetingKey") {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
            // A non-string targetingKey stays an attribute: rules can read it, fractional
            // bucketing refuses it (as flagd does).
            _ => None,
        };
        EvaluationContext {
            targeting_key,
            attributes,
            timestamp,
        }
    }

    /// Sets the targeting key.
    pub fn with_targeting_key(mut self, key: impl Into<String>) -> Self {
        self.targeting_key = Some(key.into());
        self
    }

    /// Sets one attribute.
    pub fn with_attribute(mut self, name: impl Into<String>, value: Value) -> Self {
        self.attributes.insert(name.into(), value);
        self
    }

    /// The `targetingKey` member as rules see it.
    pub(crate) fn targeting_key_value(&self) -> Option<TargetingKey<'_>> {
        match &self.targeting_key {
            Some(k) => Some(TargetingKey::Str(k)),
            None => self
                .attributes
                .get("targetingKey")
                .map(|_| TargetingKey::Other),
        }
    }

    /// The whole data object as flagd hands it to JsonLogic (`{"var": ""}`); built on demand.
    pub(crate) fn to_data(&self, flag_key: &str) -> Value {
        let mut data = self.attributes.clone();
        if let Some(k) = &self.targeting_key {
            data.insert("targetingKey".into(), Value::String(k.clone()));
        }
        data.insert("$flagd".into(), flagd_properties(flag_key, self.timestamp));
        Value::Object(data)
    }
}

/// The `$flagd` object the engine adds to the data: `{"flagKey", "timestamp"}`.
pub(crate) fn flagd_properties(flag_key: &str, timestamp: i64) -> Value {
    let mut m = Map::new();
    m.insert("flagKey".into(), Value::String(flag_key.to_owned()));
    m.insert("timestamp".into(), Value::from(timestamp));
    Value::Object(m)
}

/// The context's targeting key: a string, or whatever else a caller put under `targetingKey`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TargetingKey<'a> {
    Str(&'a str),
    /// Present but not a string.
    Other,
}

pub(crate) fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ofrep_context_object_gives_targeting_key_and_attributes() {
        let ctx = EvaluationContext::from_value(
            &json!({"targetingKey": "u1", "email": "a@b.c"}),
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(ctx.targeting_key.as_deref(), Some("u1"));
        assert_eq!(ctx.attributes.get("email"), Some(&json!("a@b.c")));
        assert!(!ctx.attributes.contains_key("targetingKey"));
        assert_eq!(ctx.timestamp, 1_700_000_000);
    }

    #[test]
    fn non_object_context_is_invalid_context() {
        for bad in [json!([1]), json!("x"), json!(3), json!(true)] {
            let err = EvaluationContext::from_value(&bad, 0).unwrap_err();
            assert_eq!(err.error_code().as_str(), "INVALID_CONTEXT");
        }
        assert_eq!(
            EvaluationContext::from_value(&Value::Null, 5).unwrap(),
            EvaluationContext::new(5)
        );
    }

    #[test]
    fn whole_data_has_flagd_properties_replacing_callers_own() {
        let ctx = EvaluationContext::from_value(
            &json!({"targetingKey": "u1", "$flagd": {"flagKey": "spoof"}}),
            7,
        )
        .unwrap();
        assert_eq!(
            ctx.to_data("real"),
            json!({"targetingKey": "u1", "$flagd": {"flagKey": "real", "timestamp": 7}})
        );
    }
}
