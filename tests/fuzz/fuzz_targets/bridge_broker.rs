//! What the bridge takes from an MQTT broker: a byte stream framed into packets
//! (`bridge::mqtt::next_packet`, bounded, with mqttrs behind it) and the commands in PUBLISHes
//! (`bridge::sparkplug::command`, a Sparkplug B payload), in pieces as TCP delivers them.
#![no_main]

use airlock_hmi::bridge::{mqtt, sparkplug};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // mqttrs may panic on a malformed packet; next_packet catches that and returns an error
    // (the bridge disconnects). libFuzzer's hook would abort on the caught panic itself, so
    // the hook is silenced: a panic that escapes next_packet still aborts the run.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&cut, stream)) = data.split_first() else { return };
    let cut = usize::from(cut).min(stream.len());
    let mut buf = Vec::new();
    for piece in [&stream[..cut], &stream[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match mqtt::next_packet(&mut buf) {
                Ok(Some(mqtt::Incoming::Publish { payload, .. })) => {
                    if let Ok(sparkplug::Command::Refused(names)) = sparkplug::command(&payload) {
                        assert!(names.len() <= payload.len());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                // The connection ends here; nothing after an error is read.
                Err(_) => return,
            }
            assert!(buf.len() <= 2 * mqtt::MAX_PACKET + stream.len());
        }
    }
});
