//! The control socket's request parser: one JSON line, as `airlockd` reads it (at most 64 KiB,
//! trimmed). What parses re-encodes to a request that parses the same.
#![no_main]

use airlock_protocol::control::ControlRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(64 * 1024)];
    let Ok(line) = std::str::from_utf8(data) else { return };
    if let Ok(req) = serde_json::from_str::<ControlRequest>(line.trim()) {
        let enc = serde_json::to_string(&req).expect("a request re-encodes");
        let back: ControlRequest = serde_json::from_str(&enc).expect("our own encoding parses");
        assert_eq!(format!("{req:?}"), format!("{back:?}"));
    }
});
