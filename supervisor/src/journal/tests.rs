//! The journal's tests.

use super::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("airlock-journal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn pending_entries_survive_reopen_in_order_and_done_ones_do_not() {
    let d = dir("reopen");
    let (mut j, p) = Journal::open(&d).expect("open");
    assert!(p.is_empty());
    let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
    let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
    let c = j.enqueue("w", "s", "m", b"three".to_vec()).expect("c");
    j.done(b.id).expect("done");
    j.sync().expect("sync");
    drop(j);
    let (mut j, p) = Journal::open(&d).expect("reopen");
    assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a.id, c.id]);
    assert_eq!(p[1].body, b"three");
    let e = j.enqueue("w", "s", "m", vec![]).expect("next");
    assert!(e.id > c.id, "ids keep increasing across restarts");
    // Even when everything was handled and compaction dropped every record.
    for id in [a.id, c.id, e.id] {
        j.done(id).expect("done");
    }
    j.sync().expect("sync");
    drop(j);
    let (_, p) = Journal::open(&d).expect("reopen");
    assert!(p.is_empty());
    let (mut j, _) = Journal::open(&d).expect("reopen twice");
    let f = j.enqueue("w", "s", "m", vec![]).expect("after");
    assert!(f.id > e.id, "ids went back to {} after {}", f.id, e.id);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn borrowed_records_encode_exactly_as_owned_ones() {
    let e = Entry { id: 7, from: "a".into(), service: "b".into(), method: "c".into(), body: vec![1, 2, 3] };
    let enc = |r: &RecordRef<'_>| postcard::to_allocvec(r).expect("encode");
    let own = |r: &Record| postcard::to_allocvec(r).expect("encode");
    assert_eq!(enc(&RecordRef::Enqueue(&e)), own(&Record::Enqueue(e.clone())));
    assert_eq!(enc(&RecordRef::Done(9)), own(&Record::Done(9)));
    assert_eq!(enc(&RecordRef::NextId(9)), own(&Record::NextId(9)));
    assert_eq!(enc(&RecordRef::DoneMany(&[4, 5])), own(&Record::DoneMany(vec![4, 5])));
}

#[test]
fn one_done_record_per_acknowledgement_from_earlier_versions_is_still_read() {
    let d = dir("legacy-done");
    let (mut j, _) = Journal::open(&d).expect("open");
    let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
    let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
    j.write(&RecordRef::Done(a.id)).expect("legacy done");
    j.sync().expect("sync");
    drop(j);
    let (_, p) = Journal::open(&d).expect("reopen");
    assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![b.id]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_sync_thread_reports_each_requested_generation() {
    let d = dir("sync-thread");
    let (mut j, _) = Journal::open(&d).expect("open");
    let wait = |j: &mut Journal, g: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            assert!(std::time::Instant::now() < deadline, "generation {g} never synced");
            let _ = airlock_protocol::sys::poll_readable(j.sync_events(), 100);
            if j.synced().expect("synced") >= g {
                return;
            }
        }
    };
    j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
    let g1 = j.request_sync().expect("request");
    assert_eq!(g1, 1);
    assert_eq!(j.request_sync().expect("nothing new"), g1, "nothing written since: same generation");
    wait(&mut j, g1);
    j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
    let g2 = j.request_sync().expect("request");
    assert_eq!(g2, 2);
    wait(&mut j, g2);
    drop(j);
    let (_, p) = Journal::open(&d).expect("reopen");
    assert_eq!(p.len(), 2);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn records_overwrite_a_zero_filled_file_that_grows_by_whole_chunks() {
    let d = dir("chunks");
    let (mut j, _) = Journal::open(&d).expect("open");
    j.enqueue("w", "s", "m", vec![7; 100]).expect("e");
    j.sync().expect("sync");
    let size = || std::fs::metadata(d.join("journal")).expect("stat").len();
    assert_eq!(size(), CHUNK, "one chunk, zero-filled after {} bytes of records", j.end);
    // Past the first chunk: the file grows by whole chunks, every record still readable.
    let n = (CHUNK as usize / 60_000) + 2;
    for _ in 0..n {
        j.enqueue("w", "s", "m", vec![9; 60_000]).expect("big");
        j.flush().expect("flush");
    }
    j.sync().expect("sync");
    assert!(j.end > CHUNK && size() % CHUNK == 0 && size() > j.end, "size {} end {}", size(), j.end);
    drop(j);
    let (_, p) = Journal::open(&d).expect("reopen");
    assert_eq!(p.len(), n + 1);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_torn_durable_end_mark_leaves_the_other_slot() {
    let d = dir("mark");
    let (mut j, _) = Journal::open(&d).expect("open");
    let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
    j.sync().expect("sync");
    let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
    j.sync().expect("sync");
    drop(j);
    let path = d.join("journal");
    // (Each open rewrites the file: every case starts from the same bytes.)
    let written = std::fs::read(&path).expect("read");
    for slot in MARK_SLOTS {
        let mut raw = written.clone();
        raw[slot as usize + 20] ^= 0xff;
        std::fs::write(&path, &raw).expect("tear one mark");
        let (_, p) = Journal::open(&d).expect("the other mark stands");
        assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a.id, b.id]);
    }
    // Both marks damaged (or a journal under another key): refused, never read as empty.
    let mut raw = written;
    for slot in MARK_SLOTS {
        raw[slot as usize + 20] ^= 0xff;
    }
    std::fs::write(&path, &raw).expect("tear both");
    assert!(matches!(Journal::open(&d), Err(JournalError::Corrupt { offset: 0, .. })));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_journal_of_the_earlier_format_is_read_whole() {
    // Records from offset 0, no durable-end mark, as airlockd wrote them before.
    let d = dir("earlier");
    let (mut j, _) = Journal::open(&d).expect("open");
    let a = j.enqueue("w", "s", "m", b"one".to_vec()).expect("a");
    let b = j.enqueue("w", "s", "m", b"two".to_vec()).expect("b");
    j.done(a.id).expect("done");
    j.sync().expect("sync");
    let (start, end) = (HEADER as usize, j.end as usize);
    drop(j);
    let path = d.join("journal");
    let raw = std::fs::read(&path).expect("read");
    std::fs::write(&path, &raw[start..end]).expect("rewrite as the earlier format");
    let (_, p) = Journal::open(&d).expect("reopen");
    assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![b.id]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bodies_are_not_stored_in_clear() {
    let d = dir("clear");
    let (mut j, _) = Journal::open(&d).expect("open");
    j.enqueue("w", "s", "m", b"SECRET-SETPOINT-4242".to_vec()).expect("e");
    j.sync().expect("sync");
    let raw = std::fs::read(d.join("journal")).expect("read");
    assert!(!raw.windows(20).any(|w| w == b"SECRET-SETPOINT-4242"));
    let key = std::fs::metadata(d.join("journal.key")).expect("key");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777, 0o600);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn torn_last_record_is_dropped_but_corruption_elsewhere_is_an_error() {
    let d = dir("torn");
    let (mut j, _) = Journal::open(&d).expect("open");
    j.enqueue("w", "s", "m", b"kept".to_vec()).expect("e");
    j.sync().expect("sync");
    // Written, never synced: the power went while its last sector was on its way.
    j.enqueue("w", "s", "m", b"torn".to_vec()).expect("e");
    j.flush().expect("flush");
    let end = j.end as usize;
    drop(j);
    let path = d.join("journal");
    let mut raw = std::fs::read(&path).expect("read");
    raw[end - 5..end].fill(0);
    std::fs::write(&path, &raw).expect("tear");
    let (_, p) = Journal::open(&d).expect("torn tail is recoverable");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].body, b"kept");
    // Now flip a byte in the first (synced) record, with another after it.
    let (mut j, _) = Journal::open(&d).expect("open");
    j.enqueue("w", "s", "m", b"after".to_vec()).expect("e");
    j.sync().expect("sync");
    drop(j);
    let mut raw = std::fs::read(&path).expect("read");
    raw[HEADER as usize + 20] ^= 1;
    std::fs::write(&path, &raw).expect("write");
    match Journal::open(&d) {
        Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, HEADER),
        other => panic!("expected corruption at {HEADER}, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unsynced_writes_the_disk_reordered_are_dropped_not_refused() {
    // R1 synced; R2 and R3 written after it and never synced. The power went with R3's
    // pages on disk and part of R2's not: what is past the durable-end mark is dropped,
    // and airlockd starts.
    let d = dir("reordered");
    let (mut j, _) = Journal::open(&d).expect("open");
    let r1 = j.enqueue("w", "s", "m", vec![1; 100]).expect("r1");
    j.sync().expect("sync");
    let r2_at = j.end as usize;
    j.enqueue("w", "s", "m", vec![2; 9000]).expect("r2");
    j.enqueue("w", "s", "m", vec![3; 100]).expect("r3");
    j.flush().expect("flush");
    drop(j);
    let path = d.join("journal");
    let mut raw = std::fs::read(&path).expect("read");
    raw[r2_at + 4096..r2_at + 8192].fill(0);
    std::fs::write(&path, &raw).expect("write");
    let (_, p) = Journal::open(&d).expect("a crash's debris is not corruption");
    assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), vec![r1.id]);
    // The same damage to a record a sync had covered is corruption.
    let (mut j, _) = Journal::open(&d).expect("open");
    let at = j.end as usize;
    j.enqueue("w", "s", "m", vec![4; 9000]).expect("r4");
    j.enqueue("w", "s", "m", vec![5; 100]).expect("r5");
    j.sync().expect("sync");
    drop(j);
    let mut raw = std::fs::read(&path).expect("read");
    raw[at + 4096..at + 8192].fill(0);
    std::fs::write(&path, &raw).expect("write");
    match Journal::open(&d) {
        Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, at as u64),
        other => panic!("expected corruption at {at}, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn compaction_keeps_exactly_the_live_entries() {
    let d = dir("compact");
    let (mut j, _) = Journal::open(&d).expect("open");
    let mut live = Vec::new();
    for k in 0..100u32 {
        let e = j.enqueue("w", "s", "m", k.to_le_bytes().to_vec()).expect("e");
        if k % 10 == 0 {
            live.push(e);
        } else {
            j.done(e.id).expect("done");
        }
    }
    j.sync().expect("sync");
    let before = j.end - HEADER;
    j.compact(live.iter().collect()).expect("compact");
    let after = j.end - HEADER;
    assert!(after < before / 4, "{after} vs {before} bytes of records");
    let next = j.enqueue("w", "s", "m", b"after".to_vec()).expect("append after compaction");
    j.sync().expect("sync");
    drop(j);
    let (_, p) = Journal::open(&d).expect("reopen");
    let mut want: Vec<u64> = live.iter().map(|e| e.id).collect();
    want.push(next.id);
    assert_eq!(p.iter().map(|e| e.id).collect::<Vec<_>>(), want);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_journal_under_another_key_is_refused() {
    let d = dir("key");
    let (mut j, _) = Journal::open(&d).expect("open");
    j.enqueue("w", "s", "m", b"x".to_vec()).expect("e");
    j.enqueue("w", "s", "m", b"y".to_vec()).expect("e");
    j.sync().expect("sync");
    drop(j);
    std::fs::write(d.join("journal.key"), [9u8; 32]).expect("swap key");
    assert!(matches!(Journal::open(&d), Err(JournalError::Corrupt { .. })));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn synced_records_cut_off_or_zeroed_before_the_durable_mark_are_refused() {
    // Found by the `journal` fuzz target: a file that ends (or turns to zeros) before its
    // durable-end mark has lost records a completed sync had put on disk. Recovery used to
    // take the shorter log as complete and silently drop them.
    let d = dir("cut");
    let (mut j, _) = Journal::open(&d).expect("open");
    j.enqueue("w", "s", "m", b"one".to_vec()).expect("e");
    let second_at = j.end;
    j.enqueue("w", "s", "m", b"two".to_vec()).expect("e");
    j.sync().expect("sync");
    drop(j);
    let path = d.join("journal");
    let raw = std::fs::read(&path).expect("read");
    // Truncated inside the second (synced) record.
    std::fs::write(&path, &raw[..second_at as usize + 10]).expect("truncate");
    match Journal::open(&d) {
        Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, second_at),
        other => panic!("a truncated journal was accepted: {other:?}"),
    }
    // Truncated exactly at the second record: every record left is whole.
    std::fs::write(&path, &raw[..second_at as usize]).expect("truncate");
    assert!(matches!(Journal::open(&d), Err(JournalError::Corrupt { .. })), "a journal cut at a record boundary");
    // Zeroed from the second record on (pages lost), file size unchanged.
    let mut zeroed = raw.clone();
    zeroed[second_at as usize..].fill(0);
    std::fs::write(&path, &zeroed).expect("zero");
    match Journal::open(&d) {
        Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, second_at),
        other => panic!("a journal zeroed before its durable end was accepted: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_journal_whose_ids_are_used_up_is_refused_not_wrapped() {
    let d = dir("ids-used-up");
    let (mut j, _) = Journal::open(&d).expect("open");
    j.write(&RecordRef::NextId(u64::MAX)).expect("next id");
    j.write(&RecordRef::Done(u64::MAX)).expect("done");
    j.sync().expect("sync");
    drop(j);
    match Journal::open(&d) {
        Err(JournalError::Corrupt { what, .. }) => assert!(what.contains("ids are used up"), "{what}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&d);
}
