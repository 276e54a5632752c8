//! Targeting rules: JsonLogic with flagd's operations, compiled once and evaluated often.

use indexmap::IndexMap;
use serde_json::Value;

use crate::compiled::CompileOptions;
use crate::context::EvaluationContext;

/// What one evaluation sees: the flag being evaluated and the caller's context.
pub(crate) struct Env<'a> {
    pub(crate) flag_key: &'a str,
    pub(crate) ctx: &'a EvaluationContext,
}

impl<'a> Env<'a> {
    pub(crate) fn new(flag_key: &'a str, ctx: &'a EvaluationContext) -> Self {
        Env { flag_key, ctx }
    }
}

/// A value produced while evaluating a rule; borrows from the rule and the context where it can.
#[derive(Debug, Clone)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(&'a str),
    String(String),
}

impl Val<'_> {
    /// The variant key a non-string targeting result names, as flagd renders it.
    pub(crate) fn variant_name(&self) -> String {
        match self {
            Val::Null => "null".into(),
            Val::Bool(b) => b.to_string(),
            Val::Num(n) => n.to_string(),
            Val::Str(s) => (*s).to_owned(),
            Val::String(s) => s.clone(),
        }
    }
}

/// A compiled targeting rule.
#[derive(Debug)]
pub(crate) struct Rule {
    _root: Value,
}

impl Rule {
    pub(crate) fn compile(
        rule: &Value,
        _evaluators: &IndexMap<String, Value>,
        _options: &CompileOptions,
    ) -> Result<Rule, String> {
        Ok(Rule {
            _root: rule.clone(),
        })
    }

    pub(crate) fn evaluate<'a>(&'a self, _env: &Env<'a>) -> Val<'a> {
        Val::Null
    }
}
