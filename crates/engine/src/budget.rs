//! The evaluation budget: steps and allocated bytes one evaluation may spend.
//!
//! Rules are charged where their cost grows with the data rather than with the rule: per element
//! an iterating operation visits (its body's size, fixed at compile time), per element `merge`
//! copies or `in` scans, per byte `cat` and `substr` build, per value copied from the context.
//! A rule without such operations is never charged: its cost is bounded by its size, which
//! validation bounds. Past the budget every charge fails, each loop stops at its next element,
//! and the flag resolves to an ERROR naming the operation that ran out.

use std::cell::Cell;

use bunting_model::limits::{BUDGET_BYTES_PER_STEP, MAX_EVALUATION_BYTES, MAX_EVALUATION_STEPS};

/// Where in a rule a charge was made: an index into the rule's table of JSON Pointers (0 is the
/// rule itself).
pub(crate) type Site = u32;

/// The site of charges made outside any recorded operation.
pub(crate) const RULE_SITE: Site = 0;

/// Which part of the budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exhausted {
    Steps,
    Bytes,
}

/// What was left of one evaluation's budget, and where it ran out.
pub(crate) struct Meter {
    steps: Cell<u64>,
    bytes: Cell<u64>,
    exhausted: Cell<Option<(Exhausted, Site)>>,
}

impl Meter {
    pub(crate) fn new() -> Meter {
        Meter::with_budget(MAX_EVALUATION_STEPS, MAX_EVALUATION_BYTES)
    }

    pub(crate) fn with_budget(steps: u64, bytes: u64) -> Meter {
        Meter {
            steps: Cell::new(steps),
            bytes: Cell::new(bytes),
            exhausted: Cell::new(None),
        }
    }

    /// Spends `steps` and `bytes`; `false` (and nothing spent) when either is more than is left.
    /// Once it has failed every later charge fails, so loops can stop at their next element.
    #[inline]
    pub(crate) fn charge(&self, site: Site, steps: u64, bytes: u64) -> bool {
        let (s, b) = (self.steps.get(), self.bytes.get());
        if steps <= s && bytes <= b {
            self.steps.set(s - steps);
            self.bytes.set(b - bytes);
            true
        } else {
            self.exhaust(site, steps > s);
            false
        }
    }

    /// Charges building or scanning `len` bytes of text (one step at least).
    #[inline]
    pub(crate) fn charge_text(&self, site: Site, len: usize, allocates: bool) -> bool {
        let len = len as u64;
        self.charge(
            site,
            len / BUDGET_BYTES_PER_STEP + 1,
            if allocates { len } else { 0 },
        )
    }

    /// Bytes left, for weighing a value before it is copied or turned into text.
    pub(crate) fn bytes_left(&self) -> usize {
        usize::try_from(self.bytes.get()).unwrap_or(usize::MAX)
    }

    #[cold]
    fn exhaust(&self, site: Site, steps: bool) {
        if self.exhausted.get().is_none() {
            let kind = if steps {
                Exhausted::Steps
            } else {
                Exhausted::Bytes
            };
            self.exhausted.set(Some((kind, site)));
        }
        self.steps.set(0);
        self.bytes.set(0);
    }

    /// Which budget ran out and where, if one did.
    #[inline]
    pub(crate) fn exhausted(&self) -> Option<(Exhausted, Site)> {
        self.exhausted.get()
    }
}

/// The error details of an evaluation that ran out of budget at `pointer`.
pub(crate) fn exhausted_details(kind: Exhausted, pointer: &str) -> String {
    match kind {
        Exhausted::Steps => format!(
            "evaluation exceeded its budget of {MAX_EVALUATION_STEPS} steps \
             (MAX_EVALUATION_STEPS) at {pointer}"
        ),
        Exhausted::Bytes => format!(
            "evaluation exceeded its budget of {MAX_EVALUATION_BYTES} bytes \
             (MAX_EVALUATION_BYTES) at {pointer}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::{CompileOptions, CompiledFlagSet, ErrorCode, EvaluationContext, Reason};
    use bunting_model::FlagSet;

    /// One flag `f` with `rule` as its targeting, compiled as a node would compile a stored set
    /// (validation's cost check is for writes; stored rules evaluate under the budget).
    fn flag_with(rule: Value) -> CompiledFlagSet {
        let doc = json!({"flags": {
            "f": {"state": "ENABLED", "variants": {"on": true, "off": false},
                  "defaultVariant": "off", "targeting": rule},
            "plain": {"state": "ENABLED", "variants": {"on": true, "off": false},
                      "defaultVariant": "on"}}});
        let set = FlagSet::from_value_unvalidated(&doc).unwrap();
        let compiled = CompiledFlagSet::compile(&set, &CompileOptions::default());
        assert!(
            compiled.broken_flags().is_empty(),
            "{:?}",
            compiled.broken_flags()
        );
        compiled
    }

    fn context(data: Value) -> EvaluationContext {
        EvaluationContext::from_value(&data, 0).unwrap()
    }

    fn assert_over_budget(compiled: &CompiledFlagSet, ctx: &EvaluationContext, at: &str) {
        let r = compiled.evaluate("f", ctx);
        assert_eq!(r.reason, Reason::Error, "{r:?}");
        assert_eq!(r.error_code, Some(ErrorCode::General));
        let details = r.error_details.unwrap_or_default();
        assert!(details.contains("exceeded its budget"), "{details}");
        assert!(details.contains(at), "{details} should name {at}");
        // The set still answers for its other flags, with the same context.
        assert_eq!(compiled.evaluate("plain", ctx).reason, Reason::Static);
    }

    #[test]
    fn some_over_a_thousand_merged_context_arrays_is_an_error_not_an_abort() {
        let merge: Vec<Value> = (0..1_000).map(|_| json!({"var": "arr"})).collect();
        let compiled = flag_with(json!({"some": [{"merge": merge}, {"==": [{"var": ""}, 2]}]}));
        let ctx = context(json!({"arr": vec![1; 100_000]}));
        assert_over_budget(&compiled, &ctx, "/flags/f/targeting/some/0/merge");
    }

    #[test]
    fn a_thousand_copies_of_a_large_context_string_are_an_error() {
        let parts: Vec<Value> = (0..1_000).map(|_| json!({"var": "s"})).collect();
        let compiled = flag_with(json!({"if": [{"cat": parts}, "on", "off"]}));
        let ctx = context(json!({"s": "x".repeat(200 * 1024)}));
        assert_over_budget(&compiled, &ctx, "/flags/f/targeting/if/0/cat");
        let r = compiled.evaluate("f", &ctx);
        assert!(r.error_details.unwrap_or_default().contains("bytes"));
    }

    #[test]
    fn reduce_with_a_large_body_over_a_large_context_array_is_an_error() {
        let mut terms = vec![json!({"var": "accumulator"})];
        terms.extend((1..2_000).map(|_| json!({"var": "current"})));
        let compiled = flag_with(json!({"if": [
            {">": [{"reduce": [{"var": "arr"}, {"+": terms}, 0]}, 0]}, "on", "off"]}));
        let ctx = context(json!({"arr": vec![1; 100_000]}));
        assert_over_budget(&compiled, &ctx, "/flags/f/targeting/if/0/>/0/reduce");
        let r = compiled.evaluate("f", &ctx);
        assert!(r.error_details.unwrap_or_default().contains("steps"));
    }

    #[test]
    fn an_accumulator_that_grows_with_every_element_is_an_error() {
        // Quadratic: each step copies the accumulator it is building.
        let compiled = flag_with(json!({"if": [{"reduce": [{"var": "arr"},
            {"merge": [{"var": "accumulator"}, [{"var": "current"}]]}, []]}, "on", "off"]}));
        let ctx = context(json!({"arr": vec![1; 50_000]}));
        assert_over_budget(&compiled, &ctx, "/flags/f/targeting/if/0/reduce/1/merge");
    }

    #[test]
    fn rules_within_the_budget_answer_as_before_even_over_large_contexts() {
        let compiled = flag_with(json!({"if": [
            {"some": [{"var": "arr"}, {"==": [{"var": ""}, 2]}]}, "on", "off"]}));
        let mut arr = vec![1; 100_000];
        let r = compiled.evaluate("f", &context(json!({ "arr": arr })));
        assert_eq!(
            (r.reason, r.variant.as_deref()),
            (Reason::TargetingMatch, Some("off"))
        );
        arr[99_999] = 2;
        let r = compiled.evaluate("f", &context(json!({ "arr": arr })));
        assert_eq!(
            (r.reason, r.variant.as_deref()),
            (Reason::TargetingMatch, Some("on"))
        );
        // The same rule over a context too large for its budget is an error for that request.
        let r = compiled.evaluate("f", &context(json!({"arr": vec![1; 3_000_000]})));
        assert_eq!(r.error_code, Some(ErrorCode::General), "{r:?}");
    }

    #[test]
    fn merged_values_reread_by_comparisons_are_charged_as_text() {
        // One merge of many single-element lists that hold a large string, then turned into
        // text by a comparison: cheap to build, costly to stringify.
        let lists: Vec<Value> = (0..1_000).map(|_| json!([{"var": "s"}])).collect();
        let compiled = flag_with(json!({"if": [{"==": [{"merge": lists}, "x"]}, "on", "off"]}));
        let ctx = context(json!({"s": "y".repeat(200 * 1024)}));
        assert_over_budget(&compiled, &ctx, "/flags/f/targeting");
    }
}
