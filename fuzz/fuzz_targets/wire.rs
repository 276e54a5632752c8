//! Wire frames from a peer: `wire::decode` and `Replica::handle_message` on any bytes.
//!
//! Must hold: no panic; a frame that decodes re-encodes to the same bytes (and so does a heads
//! list); whatever the replica applies from a frame, even one it then reports as a protocol
//! error (a changes frame whose good changes apply and bad ones do not), it asks to store, and a
//! replica restored from what it asked to store holds the same document; that document renders
//! and compiles; every frame the replica sends in reply decodes.
#![no_main]

use bunting_engine::CompileOptions;
use bunting_replica::wire::{self, DEFAULT_MAX_FRAME_BYTES};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use bunting_replica::{
    Event, FlagSetDoc, PeerId, Replica, ReplicaConfig, StoredFlagSet, Timestamp,
};
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// The last panic's message, printed only if nothing inside the replica caught it.
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// libfuzzer-sys aborts at any panic, even one the code under test catches on purpose (the
/// replica turns a panic inside Automerge's decoder into a protocol error). Here only a panic
/// that escapes the replica is a crash: it is reported with its message and ends the run.
fn only_escaping_panics_crash() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        panic::set_hook(Box::new(|info| {
            LAST_PANIC.with(|m| *m.borrow_mut() = info.to_string());
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    only_escaping_panics_crash();
    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| exercise(data))) {
        LAST_PANIC.with(|m| eprintln!("panic escaped the replica: {}", m.borrow()));
        panic::resume_unwind(payload);
    }
});

fn exercise(data: &[u8]) {
    if let Ok(frame) = wire::decode(data, DEFAULT_MAX_FRAME_BYTES) {
        let again = wire::encode(
            frame.kind,
            frame.flag_set,
            frame.payload,
            DEFAULT_MAX_FRAME_BYTES,
        )
        .expect("a decoded frame must encode");
        assert_eq!(again, data, "frame did not round trip");
        if let Ok((heads, rest)) = wire::decode_heads(frame.payload) {
            let mut out = Vec::new();
            wire::encode_heads(&heads, &mut out).expect("decoded heads must encode");
            out.extend_from_slice(rest);
            assert_eq!(out, frame.payload, "heads list did not round trip");
        }
    }

    let peer = PeerId("peer-a".into());
    let mut replica = Replica::new(
        ReplicaConfig::new("fuzz-node", "fuzz-region", 1),
        Timestamp(0),
    );
    replica.add_peer(peer.clone(), Timestamp(0));
    while replica.poll_transmit().is_some() {}
    while replica.poll_event().is_some() {}

    replica.handle_message(&peer, data, Timestamp(1));
    let mut stored: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    while let Some(event) = replica.poll_event() {
        if let Event::PersistRequest(p) = event {
            stored
                .entry(p.flag_set.clone())
                .or_default()
                .extend(p.changes);
            replica
                .persisted(p.id, Timestamp(1))
                .expect("a request it made");
        }
    }
    let restored = Replica::restore(
        ReplicaConfig::new("fuzz-node", "fuzz-region", 2),
        stored
            .into_iter()
            .map(|(name, changes)| StoredFlagSet {
                name,
                changes,
                ..StoredFlagSet::default()
            })
            .collect(),
        Timestamp(2),
    )
    .expect("what the replica asked to store loads");
    for name in replica.flag_set_names() {
        let doc = replica.flag_set(&name).expect("a listed flag set exists");
        // A set nothing was stored for restarts as the genesis document every set starts from.
        let heads = match restored.flag_set(&name) {
            Some(d) => d.heads(),
            None => FlagSetDoc::new(replica.identity().clone()).heads(),
        };
        assert_eq!(
            heads,
            doc.heads(),
            "{name:?} holds changes it never asked to store"
        );
        let _ = doc.to_flagd();
        let _ = doc.compile(&CompileOptions::default());
        let _ = doc.broken_flags();
        let _ = doc.conflicts();
    }
    replica.handle_timeout(Timestamp(3_600_000));
    while let Some((to, bytes)) = replica.poll_transmit() {
        assert_eq!(to, peer);
        assert!(
            wire::decode(&bytes, DEFAULT_MAX_FRAME_BYTES).is_ok(),
            "the replica sent a frame that does not decode"
        );
    }
}
