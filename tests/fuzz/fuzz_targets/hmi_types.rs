//! The postcard bodies the HMI's layers exchange (through the broker, so a compromised layer
//! controls them): each decodes or is refused, and what decodes round-trips.
#![no_main]

use std::fmt::Debug;

use airlock_hmi::types::{
    self as hmi, Ack, Alarm, Event, Login, Range, RawWrite, Sample, SessionInfo, Setpoint, TagValue, Token, TrendQuery,
    Verdict,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned + Debug>(data: &[u8]) {
    if let Ok(v) = hmi::decode::<T>(data) {
        let back: T = hmi::decode(&hmi::encode(&v)).expect("our own encoding decodes");
        assert_eq!(format!("{v:?}"), format!("{back:?}"));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 14 {
        0 => round_trip::<Sample>(rest),
        1 => round_trip::<RawWrite>(rest),
        2 => round_trip::<Token>(rest),
        3 => round_trip::<Login>(rest),
        4 => round_trip::<SessionInfo>(rest),
        5 => round_trip::<Vec<TagValue>>(rest),
        6 => round_trip::<Vec<Alarm>>(rest),
        7 => round_trip::<Ack>(rest),
        8 => round_trip::<Setpoint>(rest),
        9 => round_trip::<Verdict>(rest),
        10 => round_trip::<Vec<Event>>(rest),
        11 => round_trip::<TrendQuery>(rest),
        12 => round_trip::<Range>(rest),
        _ => round_trip::<Vec<(i64, f64)>>(rest),
    }
});
