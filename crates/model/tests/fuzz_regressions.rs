//! Inputs the fuzz targets in fuzz/ found, kept as tests so they stay fixed.

// A test: failing loudly on a broken fixture is the point.
#![allow(clippy::unwrap_used)]

use bunting_model::FlagSet;

/// Found by fuzz/ (`flagset`): a 110-digit integer in a rule was read as a float one ulp away
/// from the nearest one (serde_json's default float parsing is not correctly rounded), so the
/// document written back out read as a different document. The workspace now enables
/// serde_json's `float_roundtrip`; and text from outside is read strictly, so such an integer
/// is refused with its pointer rather than silently rounded.
#[test]
fn a_huge_number_in_a_rule_reads_back_the_same_after_serialising() {
    let big = format!("{}33", "8".repeat(108));
    let text = format!(
        r#"{{"flags":{{"f":{{"state":"ENABLED","variants":{{"a":1,"b":2}},"defaultVariant":"a",
            "targeting":{{"if":[{{"==":[{{"var":"n"}},{big}]}},"a","b"]}}}}}}}}"#
    );
    let refused = FlagSet::from_json_str(&text).unwrap_err();
    assert!(
        refused.0[0].pointer == "/flags/f/targeting/if/0/==/1",
        "{refused:?}"
    );
    // A value that reached the model another way (a merged document) still round trips.
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let set = FlagSet::from_value(&value).unwrap();
    let again: serde_json::Value = serde_json::from_str(&set.to_json_string_pretty()).unwrap();
    assert_eq!(FlagSet::from_value(&again).unwrap(), set);
}
