//! Time as policies see it: injected, never read from the system directly.
//!
//! Policies take `now` from a [`Clock`] so that every decision can be replayed. The
//! default [`TokioClock`] follows tokio's clock, so `tokio::time::pause()` controls it in
//! tests, and derives wall time (needed for HTTP-date `Retry-After`) from a fixed origin
//! plus tokio's elapsed time, so paused tests control that too.

use std::fmt;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// A source of monotonic and wall time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Monotonic now, on tokio's clock (pausable in tests).
    fn now(&self) -> Instant;
    /// Wall-clock now, for absolute times such as HTTP dates.
    fn wall(&self) -> SystemTime;
}

/// The default clock: tokio's monotonic clock, and wall time advanced by it.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
    origin_wall: SystemTime,
}

impl TokioClock {
    /// A clock whose wall time starts at the system's current time.
    ///
    /// This is the one place in keel-core that reads the system's wall clock.
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        Self::with_wall(SystemTime::now())
    }

    /// A clock whose wall time starts at `origin_wall`: for replays and tests.
    pub fn with_wall(origin_wall: SystemTime) -> Self {
        Self { origin: Instant::now(), origin_wall }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        self.origin_wall + Instant::now().saturating_duration_since(self.origin)
    }
}

/// Time left until `deadline`, zero when it has passed.
pub fn remaining(now: Instant, deadline: Instant) -> Duration {
    deadline.saturating_duration_since(now)
}
