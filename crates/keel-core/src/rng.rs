//! Randomness as policies see it: one seedable generator, shared.
//!
//! Jitter and fault injection draw from a [`SharedRng`]; with a seed, every draw and so
//! every policy decision can be replayed exactly.

use std::sync::Mutex;

/// A seedable random generator safe to share between tasks.
///
/// The lock is held only for one draw, never across an `.await`.
#[derive(Debug)]
pub struct SharedRng(Mutex<fastrand::Rng>);

impl SharedRng {
    /// A generator seeded with `seed`, or from the system's entropy when `None`.
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Self(Mutex::new(rng))
    }

    /// A uniform draw in `[0, 1)`.
    pub fn f64(&self) -> f64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).f64()
    }

    /// A uniform draw in `0..n` (`n > 0`).
    pub fn below(&self, n: usize) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).usize(..n.max(1))
    }
}

impl Default for SharedRng {
    fn default() -> Self {
        Self::new(None)
    }
}
