//! Journal recovery, in memory: a file built from the input (the durable-end mark, records
//! sealed under a fixed test key: well-formed ones and arbitrary plaintexts, an unsealed tail,
//! one flipped byte) replayed by the recovery code. Never a panic or a hang; exactly the
//! pending entries a straightforward replay of the same records gives; a failure before the
//! durable mark refused, never skipped.
#![no_main]

use airlock_supervisor::journal::{replay_for_fuzzing, seal_for_fuzzing, Entry, FUZZ_LAYOUT};
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const KEY: [u8; 32] = [0x5a; 32];

/// The journal's record, spelled again: the same variants in the same order.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Enqueue(Entry),
    Done(u64),
    NextId(u64),
    DoneMany(Vec<u64>),
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let Some(flags) = inp.byte() else { return };
    let legacy = flags & 1 != 0;
    let (header, slots) = FUZZ_LAYOUT;
    let mut file = if legacy { Vec::new() } else { vec![0u8; header as usize] };
    // Plaintexts, sealed one after the other; where each starts.
    let mut starts = Vec::new();
    let mut plains = Vec::new();
    let mut nonce = 0u64;
    while let Some(op) = inp.byte() {
        if plains.len() >= 64 {
            break;
        }
        let id = u64::from(inp.byte().unwrap_or(0));
        let plain = match op % 6 {
            0 | 1 => {
                let n = usize::from(inp.byte().unwrap_or(0) % 32);
                let e = Entry {
                    id,
                    from: "ui".into(),
                    service: "logic".into(),
                    method: if op & 8 != 0 { "ack".into() } else { "m".into() },
                    body: inp.bytes(n),
                };
                postcard::to_allocvec(&Record::Enqueue(e)).expect("encode")
            }
            2 => postcard::to_allocvec(&Record::Done(id)).expect("encode"),
            3 => postcard::to_allocvec(&Record::NextId(if op & 0x80 != 0 { u64::MAX } else { id })).expect("encode"),
            4 => {
                let n = (id % 8) as usize;
                let ids: Vec<u64> = inp.bytes(n).into_iter().map(u64::from).collect();
                postcard::to_allocvec(&Record::DoneMany(ids)).expect("encode")
            }
            _ => {
                let n = (id % 64) as usize;
                inp.bytes(n)
            }
        };
        starts.push(file.len());
        nonce += 1;
        let mut n12 = [0u8; 12];
        n12[..8].copy_from_slice(&nonce.to_le_bytes());
        seal_for_fuzzing(&mut file, &KEY, false, n12, &plain);
        plains.push(plain);
    }
    let records_end = file.len();
    // The durable end: the end of the records, or short of it, or past it (a truncated file).
    let durable = match flags >> 4 {
        0..=9 => records_end as u64,
        10..=13 => starts.get(usize::from(flags >> 1 & 7)).map_or(records_end, |&s| s) as u64,
        _ => records_end as u64 + 1 + u64::from(flags & 0x0e),
    };
    if !legacy {
        let mut mark = Vec::new();
        seal_for_fuzzing(&mut mark, &KEY, true, [0xee; 12], &durable.to_le_bytes());
        file[slots[0] as usize..slots[0] as usize + mark.len()].copy_from_slice(&mark);
        if flags & 2 != 0 {
            // An older mark in the other slot: the larger one counts.
            let mut old = Vec::new();
            seal_for_fuzzing(&mut old, &KEY, true, [0xef; 12], &(header).to_le_bytes());
            file[slots[1] as usize..slots[1] as usize + old.len()].copy_from_slice(&old);
        }
    }
    // An unsealed tail (zeros, or the input's remaining bytes).
    let tail_zero = flags & 4 != 0;
    let tail = if tail_zero { vec![0u8; usize::from(flags & 0x30)] } else { inp.0.to_vec() };
    file.extend_from_slice(&tail);
    // One flipped byte inside a record (with the 0x08 flag), chosen by the last input byte.
    let mut flipped_record = None;
    if flags & 8 != 0 && !starts.is_empty() {
        let span = records_end - starts[0];
        let p = starts[0] + usize::from(data[data.len() - 1]) * 7919 % span;
        file[p] ^= 0x40;
        flipped_record = starts.iter().rposition(|&s| s <= p);
    }

    let got = replay_for_fuzzing(&KEY, &file);

    // The straightforward replay of the same records.
    let mut pending: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut stop = None;
    for (i, plain) in plains.iter().enumerate() {
        if flipped_record == Some(i) {
            stop = Some(starts[i]);
            break;
        }
        match postcard::from_bytes::<Record>(plain) {
            Ok(Record::Enqueue(e)) => {
                pending.insert(e.id, e);
            }
            Ok(Record::Done(id)) => {
                pending.remove(&id);
            }
            Ok(Record::DoneMany(ids)) => ids.iter().for_each(|id| drop(pending.remove(id))),
            Ok(Record::NextId(_)) => {}
            Err(_) => {
                stop = Some(starts[i]);
                break;
            }
        }
    }
    if stop.is_none() && !tail.is_empty() && !tail.iter().all(|&b| b == 0) {
        stop = Some(records_end);
    }
    let durable = if legacy { 0 } else { durable as usize };
    // Without a mark, a file whose first record does not authenticate cannot be told from
    // one under another key: refused.
    if legacy && (flipped_record == Some(0) || plains.is_empty() && !tail.is_empty()) {
        assert!(got.is_err(), "a file with neither mark nor a first record was accepted");
        return;
    }
    // A log that ends (EOF, zeros, a bad record) before its durable mark lost synced records.
    let reached = stop.unwrap_or(records_end);
    if reached < durable {
        assert!(got.is_err(), "replay stopped at {reached} before the durable end {durable} and was accepted: {got:?}");
        return;
    }
    let (entries, _max) = got.expect("a journal intact up to its durable end recovers");
    let want: Vec<Entry> = pending.into_values().collect();
    assert_eq!(entries, want);
    let mut ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), entries.len(), "an entry delivered twice");
});
