//! OFREP and admin request bodies, through the library functions the node's handlers call:
//! the OFREP `{"context": {...}}` read into an `EvaluationContext` and evaluated against the
//! repository's example flag set; an admin flag body (`PUT .../flags/{key}`) read with
//! `Flag::from_value` and written to a replica; an upload (`PUT .../flagsets/{set}`) read with
//! `FlagSet::from_value` and written as a whole set.
//!
//! Must hold: no panic; a flag that reads serialises and reads back the same; a flag or set the
//! replica accepts reads back from its document unchanged, and that document compiles.
#![no_main]

use std::sync::OnceLock;

use bunting_engine::{CompileOptions, CompiledFlagSet, EvaluationContext};
use bunting_model::{Flag, FlagSet};
use bunting_replica::{Replica, ReplicaConfig, Timestamp, WriteCommand, WriteMeta};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const NOW: i64 = 1_764_806_400;
const SET: &str = "production";
const KEY: &str = "fuzzed";

fn examples() -> &'static CompiledFlagSet {
    static COMPILED: OnceLock<CompiledFlagSet> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let set = FlagSet::from_json_str(include_str!("../../examples/flags.json"))
            .expect("examples/flags.json is valid");
        CompiledFlagSet::compile(&set, &CompileOptions::default())
    })
}

fn replica() -> Replica {
    Replica::new(
        ReplicaConfig::new("fuzz-node", "fuzz-region", 1),
        Timestamp(0),
    )
}

fn ofrep(body: &Value) {
    let context = body.get("context").unwrap_or(&Value::Null);
    let Ok(ctx) = EvaluationContext::from_value(context, NOW) else {
        return;
    };
    let compiled = examples();
    for (key, resolution) in compiled.evaluate_all_ref(&ctx) {
        let _ = resolution.to_ofrep_json(key);
    }
}

fn put_flag(body: &Value) {
    let Ok(flag) = Flag::from_value(body, "/flags/fuzzed") else {
        return;
    };
    let again = Flag::from_value(&flag.to_value(), "/flags/fuzzed")
        .unwrap_or_else(|p| panic!("a flag that read no longer reads after serialising: {p:?}"));
    assert_eq!(again, flag, "flag round trip changed it");
    let mut replica = replica();
    let command = WriteCommand::PutFlag {
        key: KEY.into(),
        flag: flag.clone(),
    };
    if replica
        .handle_local_write(SET, command.into(), WriteMeta::default(), Timestamp(1))
        .is_ok()
    {
        let doc = replica.flag_set(SET).expect("the write created the set");
        assert_eq!(
            doc.flag(KEY).as_ref(),
            Some(&flag),
            "the document changed the flag"
        );
        let _ = doc.compile(&CompileOptions::default());
    }
}

fn upload(body: &Value) {
    let Ok(set) = FlagSet::from_value(body) else {
        return;
    };
    let mut replica = replica();
    let command = WriteCommand::ReplaceSet { set: set.clone() };
    if replica
        .handle_local_write(SET, command.into(), WriteMeta::default(), Timestamp(1))
        .is_ok()
    {
        let doc = replica.flag_set(SET).expect("the write created the set");
        let stored = doc.to_flagd();
        assert_eq!(
            stored.flags, set.flags,
            "the document changed the set's flags"
        );
        assert_eq!(
            stored.evaluators, set.evaluators,
            "the document changed the evaluators"
        );
        let _ = doc.compile(&CompileOptions::default());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    ofrep(&body);
    put_flag(&body);
    upload(&body);
});
