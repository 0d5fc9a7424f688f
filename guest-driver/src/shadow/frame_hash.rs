//! A fast keyed hash for frame-number map keys.
//!
//! `std`'s SipHash costs more than the rest of a trapped-write sync. Frame
//! numbers come from the guest, so the multiplier is mixed with a per-map
//! random key (from `RandomState`) to keep collisions hard to aim at.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// Builds [`FrameHasher`]s sharing one random key.
#[derive(Clone, Debug)]
pub(super) struct FrameHashBuilder {
    key: u64,
}

impl Default for FrameHashBuilder {
    fn default() -> Self {
        FrameHashBuilder {
            key: RandomState::new().hash_one(0x5eed_u64) | 1,
        }
    }
}

impl BuildHasher for FrameHashBuilder {
    type Hasher = FrameHasher;
    fn build_hasher(&self) -> FrameHasher {
        FrameHasher {
            key: self.key,
            h: 0,
        }
    }
}

/// Multiply-xorshift hasher for `u64` keys.
pub(super) struct FrameHasher {
    key: u64,
    h: u64,
}

impl Hasher for FrameHasher {
    fn finish(&self) -> u64 {
        self.h
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        let x = (self.h ^ v ^ self.key).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.h = x ^ (x >> 29) ^ self.key.rotate_left(17);
    }
}

/// A map keyed by frame numbers.
pub(super) type FrameMap<K, V> = HashMap<K, V, FrameHashBuilder>;
