//! Quiet hours: a daily period, on a fixed UTC offset, during which incidents below
//! `critical` page nobody. Their triggers are held and sent when the period ends if
//! the incident is still open; a resolve inside the period cancels the held trigger.
//!
//! Why fixed offsets and no time-zone database: a period is read off the injected
//! wall clock with integer arithmetic, so a test sets the clock to 23:00 and knows
//! what happens; a summer-time change moves the period by an hour, which the operator
//! who wrote `+02:00` can see in the config. Pure: takes `wall`, never reads a clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const DAY_MIN: i64 = 24 * 60;

/// `quiet_hours = { from = "22:00", to = "07:00", tz = "+01:00" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursConfig {
    /// When the quiet period starts, `HH:MM` (24-hour) in `tz`.
    pub from: String,
    /// When it ends, `HH:MM` in `tz`; before `from`: the period spans midnight.
    pub to: String,
    /// The offset the times are in: `"UTC"` (default) or `"+HH:MM"`/`"-HH:MM"`.
    #[serde(default = "utc")]
    pub tz: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// A checked quiet period: minutes of the local day, and the offset from UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// First quiet minute of the local day (0..1440).
    pub from: u16,
    /// First minute that is no longer quiet (0..1440), never equal to `from`.
    pub to: u16,
    /// Local time minus UTC, in minutes.
    pub offset: i16,
}

impl QuietHoursConfig {
    /// Checks the three values; each problem as (key, message), the key relative to
    /// the `quiet_hours` table (`from`, `to`, `tz`).
    ///
    /// # Errors
    /// A time that is not `HH:MM`, an offset that is neither `UTC` nor `±HH:MM` (at
    /// most 14 hours), or `from` equal to `to` (an empty period).
    pub fn resolve(&self) -> Result<QuietHours, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let from = parse_hhmm(&self.from);
        if from.is_none() {
            problems.push((
                "from",
                format!("`{}` is not a time of day as \"HH:MM\" (00:00 to 23:59)", self.from),
            ));
        }
        let to = parse_hhmm(&self.to);
        if to.is_none() {
            problems
                .push(("to", format!("`{}` is not a time of day as \"HH:MM\" (00:00 to 23:59)", self.to)));
        }
        let offset = parse_offset(&self.tz);
        if offset.is_none() {
            problems.push((
                "tz",
                format!("`{}` is not \"UTC\" or an offset as \"+HH:MM\"/\"-HH:MM\" (at most 14:00)", self.tz),
            ));
        }
        if let (Some(f), Some(t)) = (from, to) {
            if f == t {
                problems.push(("to", "must differ from `from` (the period would be empty)".to_owned()));
            }
        }
        match (from, to, offset) {
            (Some(from), Some(to), Some(offset)) if problems.is_empty() => {
                Ok(QuietHours { from, to, offset })
            }
            _ => Err(problems),
        }
    }
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn parse_offset(s: &str) -> Option<i16> {
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let minutes = i16::try_from(parse_hhmm(rest)?).ok()?;
    (minutes <= 14 * 60).then_some(sign * minutes)
}

impl QuietHours {
    /// Minutes into the local day at `wall`, and seconds into that minute.
    fn local(&self, wall: SystemTime) -> (i64, u64) {
        let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
        let minute = (secs / 60 + i64::from(self.offset)).rem_euclid(DAY_MIN);
        (minute, since.as_secs() % 60)
    }

    /// Whether `wall` falls in the quiet period.
    pub fn contains(&self, wall: SystemTime) -> bool {
        let (m, _) = self.local(wall);
        let (from, to) = (i64::from(self.from), i64::from(self.to));
        if from < to { from <= m && m < to } else { m >= from || m < to }
    }

    /// When the period that `wall` is in ends (`wall` itself when it is not quiet).
    pub fn end_after(&self, wall: SystemTime) -> SystemTime {
        if !self.contains(wall) {
            return wall;
        }
        let (m, s) = self.local(wall);
        let minutes = (i64::from(self.to) - m).rem_euclid(DAY_MIN);
        let left = u64::try_from(minutes).unwrap_or(0) * 60;
        let sub = wall.duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        wall + Duration::from_secs(left) - Duration::from_secs(s) - Duration::from_nanos(u64::from(sub))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(from: &str, to: &str, tz: &str) -> QuietHours {
        QuietHoursConfig { from: from.into(), to: to.into(), tz: tz.into() }.resolve().unwrap()
    }

    /// 2026-12-03 (a Thursday) at `hh:mm:ss` UTC.
    fn at(h: u64, m: u64, s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_796_256_000 + h * 3600 + m * 60 + s)
    }

    #[test]
    fn a_period_across_midnight() {
        let night = q("22:00", "07:00", "UTC");
        for (t, quiet) in [
            (at(21, 59, 59), false),
            (at(22, 0, 0), true),
            (at(23, 30, 0), true),
            (at(0, 0, 0), true),
            (at(6, 59, 59), true),
            (at(7, 0, 0), false),
            (at(12, 0, 0), false),
        ] {
            assert_eq!(night.contains(t), quiet, "{t:?}");
        }
        assert_eq!(night.end_after(at(23, 30, 17)), at(7, 0, 0) + Duration::from_secs(86_400));
        assert_eq!(night.end_after(at(3, 0, 1)), at(7, 0, 0));
        assert_eq!(night.end_after(at(12, 0, 0)), at(12, 0, 0));
    }

    #[test]
    fn a_period_within_a_day_and_offsets() {
        let lunch = q("12:00", "13:00", "+02:00");
        assert!(lunch.contains(at(10, 30, 0)));
        assert!(!lunch.contains(at(12, 30, 0)));
        assert_eq!(lunch.end_after(at(10, 15, 0)), at(11, 0, 0));
        let west = q("22:00", "07:00", "-05:00");
        assert!(west.contains(at(3, 0, 0)), "22:00 local");
        assert!(!west.contains(at(12, 0, 0)), "07:00 local");
        assert!(q("00:00", "23:59", "Z").contains(at(0, 0, 0)));
    }

    #[test]
    fn bad_values_name_their_key() {
        let check = |from: &str, to: &str, tz: &str, key: &str| {
            let got = QuietHoursConfig { from: from.into(), to: to.into(), tz: tz.into() }.resolve();
            let problems = got.err().unwrap_or_else(|| panic!("accepted {from} {to} {tz}"));
            assert!(problems.iter().any(|(k, _)| *k == key), "{from} {to} {tz}: {problems:?}");
        };
        check("24:00", "07:00", "UTC", "from");
        check("7:00", "07:00", "UTC", "from");
        check("22:00", "07:60", "UTC", "to");
        check("22:00", "", "UTC", "to");
        check("22:00", "22:00", "UTC", "to");
        check("22:00", "07:00", "Europe/Paris", "tz");
        check("22:00", "07:00", "+15:00", "tz");
        check("22:00", "07:00", "+1", "tz");
        check("ab:cd", "07:00", "UTC", "from");
    }
}
