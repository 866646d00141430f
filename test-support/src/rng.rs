//! Seeded pseudo-random numbers and byte patterns for tests: one generator, so that a seed
//! names the same data in every test of the workspace.

/// xorshift64* (Vigna): fast and deterministic, ample for offsets, lengths and data; not for
/// anything secret.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The generator of `seed`. Any seed is valid (0 too); nearby seeds give unrelated
    /// streams, because the seed is spread over all 64 bits first.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // an endless stream: no `Option` to return
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// `len_bytes` random bytes of the stream of `seed`: the same for the same seed everywhere.
pub fn pattern(seed: u64, len_bytes: usize) -> Vec<u8> {
    let mut data = vec![0u8; len_bytes];
    Rng::new(seed).fill(&mut data);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_one_stream() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert!((0..100).all(|_| a.next() == b.next()));
        assert_ne!(Rng::new(7).next(), Rng::new(8).next());
        assert_ne!(Rng::new(0).next(), 0);
    }

    #[test]
    fn patterns_are_prefixes_of_one_another() {
        let long = pattern(3, 100);
        assert_eq!(pattern(3, 13), long[..13]);
        assert_ne!(pattern(4, 100), long);
    }

    #[test]
    fn below_stays_below() {
        let mut rng = Rng::new(1);
        assert!((0..1000).all(|_| rng.below(10) < 10));
        assert_eq!(rng.below(0), 0);
    }
}
