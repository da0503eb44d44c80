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

/// Inputs (associated data and text together) up to this many bytes take the narrow build;
/// longer ones the wide build. Measured on the reference machine (`docs/performance.md`,
/// "The AEAD by size"): the portable ChaCha20 is faster up to 192 bytes, the AVX2 one from
/// 256.
pub const NARROW_AEAD_MAX: usize = 224;

/// The authentication failed (or the text is too long for one key and nonce).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

/// ChaCha20-Poly1305 (RFC 8439) under one key, in two builds of RustCrypto's
/// `chacha20poly1305`, chosen by length. Both compute the same function, so either end may
/// use either build for any input; only the speed differs.
///
/// - **Narrow** (0.11, imported as `chacha20poly1305_narrow`, with the portable ChaCha20 and
///   Poly1305 backends: `chacha20_backend="soft"`, `poly1305_backend="soft"` in
///   `.cargo/config.toml`): one keystream block per call. Control frames are mostly one to
///   three blocks, where the AVX2 backend computes four blocks for every one it uses.
/// - **Wide** (0.10, `chacha20poly1305`, with ChaCha20's AVX2 backend detected at run time
///   and the portable Poly1305, `poly1305_force_soft`): batch frames, bulk payloads, stream
///   and region records of any size.
///
/// Each build's cfg flags are read by that build's crates only (chacha20 0.9 and poly1305
/// 0.8 for the wide one, chacha20 0.10 and poly1305 0.9 for the narrow one), so neither
/// setting leaks into the other.
#[derive(Clone)]
pub struct Aead {
    narrow: chacha20poly1305_narrow::ChaCha20Poly1305,
    wide: chacha20poly1305::ChaCha20Poly1305,
}

impl std::fmt::Debug for Aead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aead(..)")
    }
}

impl Aead {
    pub fn new(key: &[u8; KEY_LEN]) -> Aead {
        use chacha20poly1305::aead::KeyInit as _;
        use chacha20poly1305_narrow::aead::KeyInit as _;
        Aead {
            narrow: chacha20poly1305_narrow::ChaCha20Poly1305::new(&(*key).into()),
            wide: chacha20poly1305::ChaCha20Poly1305::new(key.into()),
        }
    }

    fn narrow(aad: &[u8], buf: &[u8]) -> bool {
        aad.len() + buf.len() <= NARROW_AEAD_MAX
    }

    /// Encrypts `buf` in place, authenticating `aad` too; returns the tag.
    pub fn encrypt_in_place_detached(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        if Self::narrow(aad, buf) {
            use chacha20poly1305_narrow::aead::AeadInOut as _;
            self.narrow.encrypt_inout_detached(&(*nonce).into(), aad, buf.into()).map(Into::into).map_err(|_| AeadError)
        } else {
            use chacha20poly1305::aead::AeadInPlace as _;
            self.wide.encrypt_in_place_detached(nonce.into(), aad, buf).map(Into::into).map_err(|_| AeadError)
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
        if Self::narrow(aad, buf) {
            use chacha20poly1305_narrow::aead::AeadInOut as _;
            self.narrow.decrypt_inout_detached(&(*nonce).into(), aad, buf.into(), &(*tag).into()).map_err(|_| AeadError)
        } else {
            use chacha20poly1305::aead::AeadInPlace as _;
            self.wide.decrypt_in_place_detached(nonce.into(), aad, buf, tag.into()).map_err(|_| AeadError)
        }
    }
}

/// The AEAD state of one direction of a channel: its key, epoch and next sequence number.
pub struct Direction {
    cipher: Aead,
    key: Key,
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
        Direction { cipher, key, next_seq: 0, rekey_interval: rekey_interval.max(1), epoch: 0 }
    }

    /// Ratchets the key forward if `seq` starts a new epoch. Called for every frame before it
    /// is sealed or opened, with the frame's own sequence number.
    pub fn ratchet_for(&mut self, seq: u64) {
        let target = seq / self.rekey_interval;
        while self.epoch < target {
            self.epoch += 1;
            let mut next = [0u8; KEY_LEN];
            // Keystream of the old key under a nonce no frame uses: ChaCha20 as a PRF.
            let _tag =
                self.cipher.encrypt_in_place_detached(&nonce(DOMAIN_RATCHET, self.epoch), b"airlock rekey", &mut next);
            self.key = Key::from_bytes(next);
            next.zeroize();
            self.cipher = Aead::new(self.key.expose());
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
        *self.key.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }

    /// RFC 8439, section 2.8.2, through both builds (its 126 bytes of input take the narrow
    /// one through `Aead`; the wide one is called directly).
    #[test]
    fn both_builds_give_rfc_8439s_answer() {
        let key: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let nonce: Nonce = hex("070000004041424344454647").try_into().expect("nonce");
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let a = Aead::new(&key);
        assert!(Aead::narrow(&aad, plain));
        let mut narrow = plain.to_vec();
        let tag = a.encrypt_in_place_detached(&nonce, &aad, &mut narrow).expect("seal");
        assert_eq!(tag.to_vec(), hex("1ae10b594f09e26a7e902ecbd0600691"));
        assert_eq!(narrow[..16].to_vec(), hex("d31a8d34648e60db7b86afbc53ef7ec2"));
        use chacha20poly1305::aead::AeadInPlace as _;
        let mut wide = plain.to_vec();
        let wide_tag = a.wide.encrypt_in_place_detached((&nonce).into(), &aad, &mut wide).expect("seal wide");
        assert_eq!((wide.clone(), wide_tag.to_vec()), (narrow, tag.to_vec()));
        a.decrypt_in_place_detached(&nonce, &aad, &mut wide, &tag).expect("open");
        assert_eq!(wide, plain.to_vec());
    }

    proptest! {
        /// Either end may seal with one build and open with the other: for lengths around the
        /// threshold and well past it, both builds give the same ciphertext and tag, and each
        /// opens what the other sealed.
        #[test]
        fn the_builds_agree_at_every_length(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 12]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..40),
            plain in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            use chacha20poly1305::aead::AeadInPlace as _;
            use chacha20poly1305_narrow::aead::AeadInOut as _;
            let a = Aead::new(&key);
            let mut n = plain.clone();
            let nt: [u8; TAG_LEN] =
                a.narrow.encrypt_inout_detached(&nonce.into(), &aad, n.as_mut_slice().into()).expect("narrow").into();
            let mut w = plain.clone();
            let wt: [u8; TAG_LEN] = a.wide.encrypt_in_place_detached((&nonce).into(), &aad, &mut w).expect("wide").into();
            prop_assert_eq!(&n, &w);
            prop_assert_eq!(nt, wt);
            a.wide.decrypt_in_place_detached((&nonce).into(), &aad, &mut n, (&nt).into()).expect("wide opens narrow");
            a.narrow.decrypt_inout_detached(&nonce.into(), &aad, w.as_mut_slice().into(), &wt.into()).expect("narrow opens wide");
            prop_assert_eq!(&n, &plain);
            prop_assert_eq!(&w, &plain);
        }

        /// A changed bit anywhere (text, associated data or tag) fails on both paths, and the
        /// buffer is left as it was.
        #[test]
        fn a_changed_bit_fails_on_both_paths(
            long in any::<bool>(),
            len in 1usize..200,
            which in 0u8..3,
            bit in any::<usize>(),
        ) {
            let a = Aead::new(&[9; 32]);
            let n = nonce(DOMAIN_FRAME, 5);
            let mut aad = vec![3u8; 16];
            let len = if long { len + NARROW_AEAD_MAX } else { len };
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
        // Both builds in each `Direction`'s `Aead` hold a copy of the key.
        assert_zeroize_on_drop::<chacha20poly1305::ChaCha20Poly1305>();
        assert_zeroize_on_drop::<chacha20poly1305_narrow::ChaCha20Poly1305>();
    }

    #[test]
    fn key_debug_redacts() {
        let k = Key::from_bytes([0xAB; 32]);
        let s = format!("{k:?}");
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab,"), "{s}");
    }
}
