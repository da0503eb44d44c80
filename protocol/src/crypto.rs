//! Keys and the per-direction AEAD state.
//!
//! One 256-bit ChaCha20-Poly1305 key per direction. The nonce is `domain (4 bytes) || sequence
//! (8 bytes)`, so a (key, nonce) pair is never reused: frames use domain 0, bulk payloads domain
//! 1, and the key ratchet domain 2; stream records (`crate::stream`, under a per-stream key of
//! their own) use domain 3, and the requests and answers of region calls (`crate::region`, under
//! a per-region key) domains 4 and 5. Every `rekey_interval` frames both sides replace the key
//! with `ChaCha20(key, nonce = 2 || epoch)` keystream, a one-way step: a captured new key does
//! not reveal the old one. Keys are zeroized when replaced or dropped and never formatted.

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::frame::TAG_LEN;

pub const KEY_LEN: usize = 32;
const DOMAIN_FRAME: u32 = 0;
const DOMAIN_BULK: u32 = 1;
const DOMAIN_RATCHET: u32 = 2;
/// Stream records: a per-stream key, the record's sequence number as the counter.
pub(crate) const DOMAIN_STREAM: u32 = 3;
/// A region call's request (`crate::region`): a per-region key, the call's number as the counter.
pub(crate) const DOMAIN_REGION_REQUEST: u32 = 4;
/// A region call's answer or refusal, under the same key and call number as its request.
pub(crate) const DOMAIN_REGION_ANSWER: u32 = 5;

/// A 256-bit key. Its `Debug` prints nothing of the key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> std::io::Result<Key> {
        // Filled in place: no copy of the key is left behind on the stack.
        let mut k = Key([0u8; KEY_LEN]);
        getrandom::getrandom(&mut k.0).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(k)
    }

    /// A key from its bytes. The argument (a copy: arrays are `Copy`) is zeroized here; the
    /// caller zeroizes its own array.
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Key {
        let k = Key(bytes);
        bytes.zeroize();
        k
    }

    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

pub(crate) fn nonce(domain: u32, counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&domain.to_le_bytes());
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// A ChaCha20-Poly1305 nonce.
pub(crate) type Nonce = [u8; 12];

/// Texts up to this many bytes are sealed and opened by `Aead`'s short path; longer ones by
/// `chacha20poly1305` itself. Measured (`docs/performance.md`, "The AEAD by size"): the short
/// path is faster up to 448 bytes (two calls of ChaCha20's four-block backend), the crate
/// as fast or faster from 512.
pub const SHORT_TEXT_MAX: usize = 448;

/// Keystream computed per call of ChaCha20 on the short path: four blocks, what ChaCha20's
/// AVX2 backend computes at once.
const KEYSTREAM_CHUNK: usize = 256;
/// The first chunk's block 0 keys Poly1305 (RFC 8439, 2.6); the text starts at block 1.
const FIRST_TEXT: usize = KEYSTREAM_CHUNK - 64;

/// The authentication failed (or the text is too long for one key and nonce).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

/// ChaCha20-Poly1305 (RFC 8439) under one key.
///
/// - **Long texts** (over `SHORT_TEXT_MAX`): RustCrypto's `chacha20poly1305` 0.10, with
///   ChaCha20's AVX2 backend detected at run time and the portable Poly1305
///   (`poly1305_force_soft` in `.cargo/config.toml`): batch frames, bulk payloads, long stream
///   and region records.
/// - **Short texts**: the same construction (RFC 8439, 2.8) composed here from the two crates
///   `chacha20poly1305` 0.10 is built from, `chacha20` 0.9 and `poly1305` 0.8, with one
///   difference in how it runs: the keystream for Poly1305's key and for the first 192 bytes of
///   text is computed by one call of ChaCha20's four-block backend. The crate computes the
///   Poly1305 key's block in a call of its own, and a text of fewer than four blocks one block
///   per call; the AVX2 backend's call costs as much for one block as for four, so a 66-byte
///   text took three. Sealing 66 bytes with a 24-byte header: ~255 ns, against ~440 ns
///   through the crate.
///
/// Both paths compute the same function (tests: RFC 8439's vector, and agreement with the
/// crate in both directions at every length to 528 bytes, and by property test to 700), so
/// either end may use either.
#[derive(Clone)]
pub struct Aead {
    key: Key,
    long: chacha20poly1305::ChaCha20Poly1305,
}

impl std::fmt::Debug for Aead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aead(..)")
    }
}

fn xor_into(buf: &mut [u8], keystream: &[u8]) {
    for (b, k) in buf.iter_mut().zip(keystream) {
        *b ^= k;
    }
}

/// The short path's keystream for one message: the cipher positioned after the first chunk,
/// and that chunk's keystream from block 1 on.
///
/// Only the Poly1305 key (block 0's first 32 bytes) is wiped, as the crate wipes it; wiping
/// the whole chunk cost ~40 ns a message (byte-wise volatile writes). What stays on the stack
/// is keystream: over the text it is the ciphertext (sent) XOR the plaintext (in the caller's
/// buffer), and past the text it is never used, since no (key, nonce) pair repeats. The
/// cipher's state, which holds the key, is wiped on drop (`chacha20`'s `zeroize` feature).
struct ShortPath {
    cipher: chacha20::ChaCha20,
    keystream: [u8; KEYSTREAM_CHUNK],
}

impl ShortPath {
    /// The keystream's first chunk, and Poly1305 keyed from its block 0.
    fn start(key: &Key, nonce: &Nonce) -> (ShortPath, poly1305::Poly1305) {
        use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
        use poly1305::universal_hash::KeyInit as _;
        let mut cipher = chacha20::ChaCha20::new(key.expose().into(), nonce.into());
        let mut keystream = [0u8; KEYSTREAM_CHUNK];
        cipher.apply_keystream(&mut keystream);
        let mac = poly1305::Poly1305::new(poly1305::Key::from_slice(&keystream[..32]));
        keystream[..32].zeroize();
        (ShortPath { cipher, keystream }, mac)
    }

    /// XORs the keystream from block 1 on into `buf`.
    fn apply(mut self, buf: &mut [u8]) {
        use chacha20::cipher::StreamCipher as _;
        let (head, tail) = buf.split_at_mut(buf.len().min(FIRST_TEXT));
        xor_into(head, &self.keystream[64..]);
        for chunk in tail.chunks_mut(KEYSTREAM_CHUNK) {
            // `apply_keystream` XORs: the buffer must be zero to come out as keystream.
            self.keystream.fill(0);
            self.cipher.apply_keystream(&mut self.keystream);
            xor_into(chunk, &self.keystream[..]);
        }
    }
}

/// Poly1305 over the associated data and the ciphertext, each padded to 16 bytes, then both
/// lengths (RFC 8439, 2.8).
fn authenticate(mut mac: poly1305::Poly1305, aad: &[u8], ciphertext: &[u8]) -> poly1305::Poly1305 {
    use poly1305::universal_hash::UniversalHash as _;
    mac.update_padded(aad);
    mac.update_padded(ciphertext);
    let mut lengths = poly1305::Block::default();
    lengths[..8].copy_from_slice(&(aad.len() as u64).to_le_bytes());
    lengths[8..].copy_from_slice(&(ciphertext.len() as u64).to_le_bytes());
    mac.update(&[lengths]);
    mac
}

impl Aead {
    pub fn new(key: &[u8; KEY_LEN]) -> Aead {
        use chacha20poly1305::aead::KeyInit as _;
        Aead { key: Key::from_bytes(*key), long: chacha20poly1305::ChaCha20Poly1305::new(key.into()) }
    }

    fn short(buf: &[u8]) -> bool {
        buf.len() <= SHORT_TEXT_MAX
    }

    /// The key of ratchet epoch `epoch`: keystream of this key under a nonce no frame uses
    /// (ChaCha20 as a PRF). Through the crate, which XORs the keystream straight into the
    /// caller's buffer: the short path would leave a copy of the new key in its keystream
    /// buffer on the stack. Once per `rekey_interval` frames, so its speed does not matter.
    fn next_key(&self, epoch: u64) -> [u8; KEY_LEN] {
        use chacha20poly1305::aead::AeadInPlace as _;
        let mut next = [0u8; KEY_LEN];
        let n = nonce(DOMAIN_RATCHET, epoch);
        // Sealing 32 bytes cannot fail; the tag is not used.
        let _tag = self.long.encrypt_in_place_detached((&n).into(), b"airlock rekey", &mut next);
        next
    }

    /// Encrypts `buf` in place, authenticating `aad` too; returns the tag.
    pub fn encrypt_in_place_detached(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        if Self::short(buf) {
            use poly1305::universal_hash::UniversalHash as _;
            let (path, mac) = ShortPath::start(&self.key, nonce);
            path.apply(buf);
            Ok(authenticate(mac, aad, buf).finalize().into())
        } else {
            use chacha20poly1305::aead::AeadInPlace as _;
            self.long.encrypt_in_place_detached(nonce.into(), aad, buf).map(Into::into).map_err(|_| AeadError)
        }
    }

    /// Checks `tag` over `aad` and the ciphertext in `buf`, then decrypts `buf` in place. On
    /// failure `buf` is left as it was.
    pub fn decrypt_in_place_detached(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        if Self::short(buf) {
            use poly1305::universal_hash::UniversalHash as _;
            let (path, mac) = ShortPath::start(&self.key, nonce);
            // `verify` compares in constant time (`subtle`); no byte of `buf` changes before.
            authenticate(mac, aad, buf).verify(tag.into()).map_err(|_| AeadError)?;
            path.apply(buf);
            Ok(())
        } else {
            use chacha20poly1305::aead::AeadInPlace as _;
            self.long.decrypt_in_place_detached(nonce.into(), aad, buf, tag.into()).map_err(|_| AeadError)
        }
    }
}

/// The AEAD state of one direction of a channel: its key, epoch and next sequence number.
pub struct Direction {
    /// Holds the key.
    cipher: Aead,
    /// The next sequence number to send (tx) or to accept (rx).
    pub next_seq: u64,
    rekey_interval: u64,
    epoch: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction").field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

impl Direction {
    pub fn new(key: Key, rekey_interval: u64) -> Direction {
        let cipher = Aead::new(key.expose());
        Direction { cipher, next_seq: 0, rekey_interval: rekey_interval.max(1), epoch: 0 }
    }

    /// Ratchets the key forward if `seq` starts a new epoch. Called for every frame before it
    /// is sealed or opened, with the frame's own sequence number.
    pub fn ratchet_for(&mut self, seq: u64) {
        let target = seq / self.rekey_interval;
        while self.epoch < target {
            self.epoch += 1;
            let mut next = self.cipher.next_key(self.epoch);
            self.cipher = Aead::new(&next);
            next.zeroize();
        }
    }

    /// Encrypts `buf` in place as frame `seq`, authenticating `header` too.
    pub fn seal_frame(&self, seq: u64, header: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        // Encryption with a 12-byte nonce cannot fail for buffers below 256 GiB.
        self.cipher.encrypt_in_place_detached(&nonce(DOMAIN_FRAME, seq), header, buf).unwrap_or([0; TAG_LEN])
    }

    pub fn open_frame(&self, seq: u64, header: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        self.cipher.decrypt_in_place_detached(&nonce(DOMAIN_FRAME, seq), header, buf, tag).is_ok()
    }

    /// Encrypts a bulk payload that travels with frame `seq`; `len` is bound in too.
    pub fn seal_bulk(&self, seq: u64, buf: &mut [u8]) -> [u8; TAG_LEN] {
        let ad = (buf.len() as u64).to_le_bytes();
        self.cipher.encrypt_in_place_detached(&nonce(DOMAIN_BULK, seq), &ad, buf).unwrap_or([0; TAG_LEN])
    }

    pub fn open_bulk(&self, seq: u64, buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        let ad = (buf.len() as u64).to_le_bytes();
        self.cipher.decrypt_in_place_detached(&nonce(DOMAIN_BULK, seq), &ad, buf, tag).is_ok()
    }

    #[cfg(test)]
    pub(crate) fn key_bytes(&self) -> [u8; KEY_LEN] {
        *self.cipher.key.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }

    /// RFC 8439, section 2.8.2, through both paths (its 114 bytes of text take the short one
    /// through `Aead`; the crate is called directly).
    #[test]
    fn both_paths_give_rfc_8439s_answer() {
        let key: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let nonce: Nonce = hex("070000004041424344454647").try_into().expect("nonce");
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let a = Aead::new(&key);
        assert!(Aead::short(plain));
        let mut short = plain.to_vec();
        let tag = a.encrypt_in_place_detached(&nonce, &aad, &mut short).expect("seal");
        assert_eq!(tag.to_vec(), hex("1ae10b594f09e26a7e902ecbd0600691"));
        assert_eq!(
            short,
            hex(concat!(
                "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca967128",
                "2fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fa",
                "b324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116"
            ))
        );
        use chacha20poly1305::aead::AeadInPlace as _;
        let mut long = plain.to_vec();
        let long_tag = a.long.encrypt_in_place_detached((&nonce).into(), &aad, &mut long).expect("seal long");
        assert_eq!((long.clone(), long_tag.to_vec()), (short, tag.to_vec()));
        a.decrypt_in_place_detached(&nonce, &aad, &mut long, &tag).expect("open");
        assert_eq!(long, plain.to_vec());
    }

    /// Every length around the short path's chunk edges (192, 448) and past its end, with
    /// associated data of 0, 13 and 24 bytes: the same ciphertext and tag as the crate.
    #[test]
    fn the_short_path_agrees_with_the_crate_at_its_edges() {
        use chacha20poly1305::aead::AeadInPlace as _;
        let a = Aead::new(&[0x42; 32]);
        let n = nonce(DOMAIN_FRAME, 77);
        for aad_len in [0usize, 13, 24] {
            let aad = vec![0xa5u8; aad_len];
            for len in 0..=SHORT_TEXT_MAX + 80 {
                let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut x = plain.clone();
                let xt = a.encrypt_in_place_detached(&n, &aad, &mut x).expect("seal");
                let mut y = plain.clone();
                let yt: [u8; TAG_LEN] =
                    a.long.encrypt_in_place_detached((&n).into(), &aad, &mut y).expect("long").into();
                assert_eq!((&x, xt), (&y, yt), "text of {len} bytes, {aad_len} of associated data");
                a.decrypt_in_place_detached(&n, &aad, &mut x, &xt).expect("open");
                assert_eq!(x, plain);
            }
        }
    }

    proptest! {
        /// Either end may seal with one path and open with the other: for every length the
        /// short path takes (one and two keystream chunks, and the edges between them) and
        /// past it, the short path gives the crate's ciphertext and tag, and each opens what
        /// the other sealed.
        #[test]
        fn the_short_path_agrees_with_the_crate_at_every_length(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 12]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..40),
            plain in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            use chacha20poly1305::aead::AeadInPlace as _;
            let a = Aead::new(&key);
            if plain.len() <= SHORT_TEXT_MAX {
                let mut s = plain.clone();
                let (path, mac) = ShortPath::start(&a.key, &nonce);
                path.apply(&mut s);
                let st: [u8; TAG_LEN] = {
                    use poly1305::universal_hash::UniversalHash as _;
                    authenticate(mac, &aad, &s).finalize().into()
                };
                let mut l = plain.clone();
                let lt: [u8; TAG_LEN] = a.long.encrypt_in_place_detached((&nonce).into(), &aad, &mut l).expect("long").into();
                prop_assert_eq!(&s, &l);
                prop_assert_eq!(st, lt);
                a.long.decrypt_in_place_detached((&nonce).into(), &aad, &mut s, (&st).into()).expect("the crate opens short");
                a.decrypt_in_place_detached(&nonce, &aad, &mut l, &lt).expect("short opens the crate's");
                prop_assert_eq!(&s, &plain);
                prop_assert_eq!(&l, &plain);
            }
            // Through `Aead`, whichever path the length takes, against the crate.
            let mut x = plain.clone();
            let xt = a.encrypt_in_place_detached(&nonce, &aad, &mut x).expect("seal");
            let mut y = plain.clone();
            let yt: [u8; TAG_LEN] = a.long.encrypt_in_place_detached((&nonce).into(), &aad, &mut y).expect("long").into();
            prop_assert_eq!((&x, xt), (&y, yt));
        }

        /// A changed bit anywhere (text, associated data or tag) fails on both paths, and the
        /// buffer is left as it was.
        #[test]
        fn a_changed_bit_fails_on_both_paths(
            long in any::<bool>(),
            len in 1usize..460,
            which in 0u8..3,
            bit in any::<usize>(),
        ) {
            let a = Aead::new(&[9; 32]);
            let n = nonce(DOMAIN_FRAME, 5);
            let mut aad = vec![3u8; 16];
            let len = if long { len + SHORT_TEXT_MAX } else { len };
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = plain.clone();
            let mut tag = a.encrypt_in_place_detached(&n, &aad, &mut buf).expect("seal");
            match which {
                0 => buf[bit % len] ^= 1 << (bit % 8),
                1 => aad[bit % 16] ^= 1 << (bit % 8),
                _ => tag[bit % TAG_LEN] ^= 1 << (bit % 8),
            }
            let before = buf.clone();
            prop_assert_eq!(a.decrypt_in_place_detached(&n, &aad, &mut buf, &tag), Err(AeadError));
            prop_assert_eq!(buf, before);
        }
    }

    #[test]
    fn ratchet_changes_key_only_at_epoch_boundaries() {
        let k = Key::from_bytes([7; 32]);
        let mut d = Direction::new(k, 4);
        let k0 = d.key_bytes();
        for seq in 1..4 {
            d.ratchet_for(seq);
            assert_eq!(d.key_bytes(), k0);
        }
        d.ratchet_for(4);
        let k1 = d.key_bytes();
        d.ratchet_for(4);
        assert_eq!(d.key_bytes(), k1, "ratchet is idempotent per epoch");
        assert_ne!(k1, k0);
        // Deterministic: the other side derives the same key.
        let mut e = Direction::new(Key::from_bytes([7; 32]), 4);
        e.ratchet_for(4);
        assert_eq!(e.key_bytes(), k1);
    }

    #[test]
    fn ratchet_never_returns_to_an_earlier_key_and_is_deterministic() {
        let mut d = Direction::new(Key::from_bytes([7; 32]), 1);
        let mut seen = vec![d.key_bytes()];
        for epoch in 1..=4 {
            d.ratchet_for(epoch);
            let k = d.key_bytes();
            // ratchet(k) != k, ratchet(ratchet(k)) != k, and so on: no short cycle.
            assert!(!seen.contains(&k), "epoch {epoch} repeats an earlier key");
            seen.push(k);
        }
        // Jumping straight to epoch 4 walks the same chain.
        let mut e = Direction::new(Key::from_bytes([7; 32]), 1);
        e.ratchet_for(4);
        assert_eq!(e.key_bytes(), seen[4]);
        // One step from the new key is not the old one: the step does not invert itself.
        let mut f = Direction::new(Key::from_bytes(seen[1]), 1);
        f.ratchet_for(1);
        assert_ne!(f.key_bytes(), seen[0]);
    }

    #[test]
    fn key_material_types_zeroize_on_drop() {
        // Compile-time checks: this test does not build if either type stops wiping itself.
        fn assert_zeroize_on_drop<T: ZeroizeOnDrop>() {}
        assert_zeroize_on_drop::<Key>();
        // Each `Direction`'s `Aead` holds a `Key` and the crate's copy of it; the short path's
        // per-message cipher holds it too (Poly1305's one-time key is wiped by its `Drop` with
        // the `zeroize` feature, which has no marker trait).
        assert_zeroize_on_drop::<chacha20poly1305::ChaCha20Poly1305>();
        assert_zeroize_on_drop::<chacha20::ChaCha20>();
    }

    #[test]
    fn key_debug_redacts() {
        let k = Key::from_bytes([0xAB; 32]);
        let s = format!("{k:?}");
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab,"), "{s}");
    }
}
