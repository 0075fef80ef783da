//! Which chunks of a component are held: one bit per chunk, persisted as bytes in the
//! ChunkRequest bit order (bit k is byte k / 8, bit k % 8, least significant first).

/// A fixed-size set of chunk indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkBitmap {
    bits: Vec<u8>,
    len: u32,
    held: u32,
}

/// Why stored bytes are not a bitmap of the expected size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bitmap of {got} bytes does not fit {len} chunks")]
pub(crate) struct BitmapSizeError {
    got: usize,
    len: u32,
}

fn bytes_for(len: u32) -> usize {
    (len as usize).div_ceil(8)
}

impl ChunkBitmap {
    /// An empty bitmap for `len` chunks.
    pub(crate) fn new(len: u32) -> Self {
        ChunkBitmap {
            bits: vec![0; bytes_for(len)],
            len,
            held: 0,
        }
    }

    /// Restores a bitmap for `len` chunks from [`ChunkBitmap::as_bytes`]. Bits past `len` must
    /// be clear.
    pub(crate) fn from_bytes(len: u32, bytes: &[u8]) -> Result<Self, BitmapSizeError> {
        let err = BitmapSizeError {
            got: bytes.len(),
            len,
        };
        if bytes.len() != bytes_for(len) {
            return Err(err);
        }
        let tail = len % 8;
        if tail != 0 && bytes.last().is_some_and(|b| b >> tail != 0) {
            return Err(err);
        }
        let held = bytes.iter().map(|b| b.count_ones()).sum();
        Ok(ChunkBitmap {
            bits: bytes.to_vec(),
            len,
            held,
        })
    }

    /// The persistent form.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Chunks held.
    pub(crate) fn held(&self) -> u32 {
        self.held
    }

    /// Whether every chunk is held.
    pub(crate) fn is_complete(&self) -> bool {
        self.held == self.len
    }

    /// Whether chunk `i` is held (false out of range).
    pub(crate) fn has(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Marks chunk `i` held; false if out of range or already held.
    pub(crate) fn set(&mut self, i: u32) -> bool {
        if i >= self.len || self.has(i) {
            return false;
        }
        self.bits[(i / 8) as usize] |= 1 << (i % 8);
        self.held += 1;
        true
    }

    /// Missing chunks from `from` on, in order.
    pub(crate) fn missing_from(&self, from: u32) -> impl Iterator<Item = u32> + '_ {
        (from..self.len).filter(move |i| !self.has(*i))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_refuses_wrong_sizes() {
        let mut b = ChunkBitmap::new(10);
        assert!(b.set(0) && b.set(9) && !b.set(9) && !b.set(10));
        assert_eq!(b.as_bytes(), &[0b0000_0001, 0b0000_0010]);
        let r = ChunkBitmap::from_bytes(10, b.as_bytes()).unwrap();
        assert_eq!(r, b);
        assert_eq!(r.held(), 2);
        assert!(ChunkBitmap::from_bytes(10, &[0]).is_err());
        assert!(
            ChunkBitmap::from_bytes(10, &[0, 0b0000_0100]).is_err(),
            "bit 10 set"
        );
        assert_eq!(b.missing_from(0).take(3).collect::<Vec<_>>(), [1, 2, 3]);
    }

    proptest! {
        #[test]
        fn held_counts_the_set_bits(len in 0u32..300, picks in proptest::collection::vec(0u32..320, 0..400)) {
            let mut b = ChunkBitmap::new(len);
            let mut want = std::collections::BTreeSet::new();
            for p in picks {
                prop_assert_eq!(b.set(p), p < len && want.insert(p));
            }
            prop_assert_eq!(b.held() as usize, want.len());
            prop_assert_eq!(b.is_complete(), want.len() == len as usize);
            let back = ChunkBitmap::from_bytes(len, b.as_bytes()).unwrap();
            prop_assert_eq!(back, b.clone());
            let missing: Vec<u32> = b.missing_from(0).collect();
            prop_assert_eq!(missing.len() + want.len(), len as usize);
        }
    }
}
