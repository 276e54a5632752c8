//! Inputs the fuzz targets in fuzz/ found, kept as tests so they stay fixed.

// A test: failing loudly on a broken fixture is the point.
#![allow(clippy::unwrap_used)]

use bunting_model::FlagSet;

/// Found by fuzz/ (`flagset`): a 110-digit integer in a rule was read as a float one ulp away
/// from the nearest one (serde_json's default float parsing is not correctly rounded), so the
/// document written back out read as a different document. The workspace now enables
/// serde_json's `float_roundtrip`.
#[test]
fn a_huge_number_in_a_rule_reads_back_the_same_after_serialising() {
    let big = format!("{}33", "8".repeat(108));
    let text = format!(
        r#"{{"flags":{{"f":{{"state":"ENABLED","variants":{{"a":1,"b":2}},"defaultVariant":"a",
            "targeting":{{"if":[{{"==":[{{"var":"n"}},{big}]}},"a","b"]}}}}}}}}"#
    );
    let set = FlagSet::from_json_str(&text).unwrap();
    let again = FlagSet::from_json_str(&set.to_json_string_pretty()).unwrap();
    assert_eq!(again, set);
}
