//! field's validation of a Modbus/TCP answer against the request it answers: the frame
//! length from the MBAP head, the answer checked against the request, and the registers read
//! out of it, as `field` does for every poll and write.
#![no_main]

use airlock_hmi::field::{answer_len, check_answer, registers};
use libfuzzer_sys::fuzz_target;
use rmodbus::client::ModbusRequest;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (params, frame) = data.split_at(6);
    let unit = params[0];
    let tr_id = u16::from_le_bytes([params[1], params[2]]);
    let lo = u16::from(params[3]);
    let count = u16::from(params[4] % 126).max(1);
    let mut mreq = ModbusRequest::new_tcp_udp(unit, tr_id);
    let mut req = Vec::new();
    let built = match params[5] % 3 {
        0 => mreq.generate_get_inputs(lo, count, &mut req),
        1 => mreq.generate_get_holdings(lo, count, &mut req),
        _ => mreq.generate_set_holding(lo, u16::from(params[4]), &mut req),
    };
    if built.is_err() || frame.len() < 6 {
        return;
    }
    let mut head = [0u8; 6];
    head.copy_from_slice(&frame[..6]);
    let Ok(len) = answer_len(&head) else { return };
    assert!((8..=260).contains(&len));
    // The field layer reads exactly `len` bytes; fewer is a timeout, not a decode.
    let Some(frame) = frame.get(..len) else { return };
    if check_answer(&mreq, frame).is_ok() && params[5] % 3 != 2 {
        if let Ok(regs) = registers(frame, count) {
            assert_eq!(regs.len(), usize::from(count));
        }
    }
});
