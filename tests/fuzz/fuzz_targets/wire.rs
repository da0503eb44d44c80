//! Decoding every message type that crosses the supervisor/worker channel directly (the frame
//! target reaches them through the channel; this one at full speed): supervisor-to-worker,
//! worker-to-supervisor, replies, the handshake, the confinement plan and report. Whatever
//! decodes must re-encode and decode to the same value.
#![no_main]

use std::fmt::Debug;

use airlock_protocol::confinement::{ConfinementPlan, ConfinementReport};
use airlock_protocol::wire::{FromWorker, Reply, Request, ToWorker};
use airlock_protocol::Hello;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned + Debug>(data: &[u8]) {
    if let Ok(v) = postcard::from_bytes::<T>(data) {
        let enc = postcard::to_allocvec(&v).expect("a decoded message re-encodes");
        let back: T = postcard::from_bytes(&enc).expect("our own encoding decodes");
        assert_eq!(format!("{v:?}"), format!("{back:?}"));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 7 {
        0 => round_trip::<ToWorker>(rest),
        1 => round_trip::<FromWorker>(rest),
        2 => round_trip::<Reply>(rest),
        3 => round_trip::<Request>(rest),
        4 => round_trip::<Hello>(rest),
        5 => round_trip::<ConfinementPlan>(rest),
        _ => round_trip::<ConfinementReport>(rest),
    }
});
