//! Keys and the per-direction AEAD state.
//!
//! One 256-bit ChaCha20-Poly1305 key per direction. The nonce is `domain (4 bytes) || sequence
//! (8 bytes)`, so a (key, nonce) pair is never reused: frames use domain 0, bulk payloads domain
//! 1, and the key ratchet domain 2; stream records (`crate::stream`, under a per-stream key of
//! their own) use domain 3, and the requests and answers of region calls (`crate::region`, under
//! a per-region key) domains 4 and 5. Every `rekey_interval` frames both sides replace the key
//! with `ChaCha20(key, nonce = 2 || epoch)` keystream, a one-way step: a captured new key does
//! not reveal the old one. Keys are zeroized when replaced or dropped and never formatted.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
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
    Nonce::from(n)
}

/// The AEAD state of one direction of a channel: its key, epoch and next sequence number.
pub struct Direction {
    cipher: ChaCha20Poly1305,
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
        let cipher = ChaCha20Poly1305::new(key.expose().into());
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
            self.cipher = ChaCha20Poly1305::new(self.key.expose().into());
        }
    }

    /// Encrypts `buf` in place as frame `seq`, authenticating `header` too.
    pub fn seal_frame(&self, seq: u64, header: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        // Encryption with a 12-byte nonce cannot fail for buffers below 256 GiB.
        match self.cipher.encrypt_in_place_detached(&nonce(DOMAIN_FRAME, seq), header, buf) {
            Ok(tag) => tag.into(),
            Err(_) => [0; TAG_LEN],
        }
    }

    pub fn open_frame(&self, seq: u64, header: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        self.cipher.decrypt_in_place_detached(&nonce(DOMAIN_FRAME, seq), header, buf, Tag::from_slice(tag)).is_ok()
    }

    /// Encrypts a bulk payload that travels with frame `seq`; `len` is bound in too.
    pub fn seal_bulk(&self, seq: u64, buf: &mut [u8]) -> [u8; TAG_LEN] {
        let ad = (buf.len() as u64).to_le_bytes();
        match self.cipher.encrypt_in_place_detached(&nonce(DOMAIN_BULK, seq), &ad, buf) {
            Ok(tag) => tag.into(),
            Err(_) => [0; TAG_LEN],
        }
    }

    pub fn open_bulk(&self, seq: u64, buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        let ad = (buf.len() as u64).to_le_bytes();
        self.cipher.decrypt_in_place_detached(&nonce(DOMAIN_BULK, seq), &ad, buf, Tag::from_slice(tag)).is_ok()
    }

    #[cfg(test)]
    pub(crate) fn key_bytes(&self) -> [u8; KEY_LEN] {
        *self.key.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // The cipher of each `Direction` holds an expanded copy of the key.
        assert_zeroize_on_drop::<ChaCha20Poly1305>();
    }

    #[test]
    fn key_debug_redacts() {
        let k = Key::from_bytes([0xAB; 32]);
        let s = format!("{k:?}");
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab,"), "{s}");
    }
}
