//! The flag-file parser and validator (`FlagSet::from_json_str`) on any text.
//!
//! Must hold: no panic; a document that parses serialises (both forms) and parses back to the
//! same value; reading only the structure never refuses what full validation accepted.
#![no_main]

use bunting_model::FlagSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = FlagSet::from_json_str(text) else {
        return;
    };
    let pretty = set.to_json_string_pretty();
    let again = FlagSet::from_json_str(&pretty).unwrap_or_else(|p| {
        panic!("a valid set no longer parses after serialising: {p:?}\n{pretty}")
    });
    assert_eq!(again, set, "pretty round trip changed the set");
    let value = set.to_value();
    let from_value = FlagSet::from_value(&value)
        .unwrap_or_else(|p| panic!("a valid set's value no longer validates: {p:?}"));
    assert_eq!(from_value, set, "value round trip changed the set");
    let unvalidated = FlagSet::from_value_unvalidated(&value)
        .unwrap_or_else(|p| panic!("structure of a valid set refused: {p:?}"));
    assert_eq!(
        unvalidated, set,
        "structure-only read differs from the validated read"
    );
});
