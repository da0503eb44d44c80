//! The configuration parser, as `airlockd --check-config` runs it: any text, against the
//! names of the compiled-in policies. Refuses or accepts, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static KNOWN: OnceLock<Vec<String>> = OnceLock::new();
    let known = KNOWN.get_or_init(airlock_supervisor::known_policies);
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = airlock_supervisor::config::parse(text, "fuzz.toml", known) {
        // What the supervisor derives from an accepted configuration must not panic either.
        let _ = c.permit_table();
        for w in &c.workers {
            let _ = c.settings_for(w);
            let _ = c.rlimits(w);
        }
    }
});
