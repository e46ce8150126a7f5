//! Time as policies see it: injected, never read from the system directly.
//!
//! Policies take `now` from a [`Clock`] so that every decision can be replayed. The
//! default [`TokioClock`] follows tokio's clock, so `tokio::time::pause()` controls it in
//! tests, and derives wall time (needed for HTTP-date `Retry-After`) from a fixed origin
//! plus tokio's elapsed time, so paused tests control that too.
//!
//! It is also the one home of time arithmetic: a deadline is [`deadline_after`] (never
//! `now + d`, which panics past the clock's range), seconds become a `Duration` through
//! [`saturating_secs`], a sleep is [`capped`], and no configured duration may exceed
//! [`MAX_DURATION`].

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

/// The longest duration any policy value may have: 366 days. Config checks refuse
/// longer timeouts, windows and delays ([`crate::PolicyConfig::validate`]); the
/// arithmetic below saturates anyway, for values that were never checked.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A wait this long is forever: a timeout longer than this is no timeout, and a sleep
/// longer than this sleeps this long ([`capped`]). A century.
pub const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `d` after `now`, or `None` ("never") when `d` is longer than
/// [`FOREVER`]: a `Duration::MAX` timeout is no timeout, not a panic.
pub fn deadline_after(now: Instant, d: Duration) -> Option<Instant> {
    if d > FOREVER { None } else { now.checked_add(d) }
}

/// `d`, at most [`FOREVER`]: what a sleep waits (the timer never sees an instant past
/// its range).
pub fn capped(d: Duration) -> Duration {
    d.min(FOREVER)
}

/// `secs` seconds as a `Duration`, saturating: NaN and negatives are zero, values past
/// `Duration::MAX` (or infinite) are `Duration::MAX`.
pub fn saturating_secs(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(deadline_after(now, Duration::MAX), None, "past the range is never");
        assert_eq!(deadline_after(now, FOREVER + Duration::from_secs(1)), None);
        assert_eq!(capped(Duration::MAX), FOREVER);
        assert_eq!(deadline_after(now, Duration::from_secs(1)), Some(now + Duration::from_secs(1)));
        assert_eq!(saturating_secs(f64::NAN), Duration::ZERO);
        assert_eq!(saturating_secs(-3.0), Duration::ZERO);
        assert_eq!(saturating_secs(f64::INFINITY), Duration::MAX);
        assert_eq!(saturating_secs(1e300), Duration::MAX);
        assert_eq!(saturating_secs(Duration::MAX.as_secs_f64()), Duration::MAX);
        assert_eq!(saturating_secs(1.5), Duration::from_millis(1500));
    }
}
