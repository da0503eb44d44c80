//! The credential file parser of the auth layer: any text; what parses renders back to a
//! file that parses to the same operators.
#![no_main]

use airlock_hmi::credentials;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(ops) = credentials::parse(text) {
        let again = credentials::parse(&credentials::render(&ops)).expect("a rendered file parses");
        assert_eq!(ops, again);
    }
});
