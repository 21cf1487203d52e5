//! Whole-number settings with a range, checked when the file or an environment override is
//! read: a [`Ranged`] outside its range cannot exist, so nothing downstream checks it again.
//! The unit is in the field's name (`_secs`, `_ms`, `_us`, `_bytes`).

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};

/// A whole number in `MIN..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Ranged<const MIN: u64, const MAX: u64>(u64);

/// How every refusal of a [`Ranged`] begins (see [`is_refusal`]).
const REFUSAL: &str = "must be ";

/// Whether a deserializer's message is a [`Ranged`] refusal.
pub(super) fn is_refusal(message: &str) -> bool {
    message.starts_with(REFUSAL)
}

impl<const MIN: u64, const MAX: u64> Ranged<MIN, MAX> {
    /// `value`, if it is in range.
    pub const fn new(value: u64) -> Option<Self> {
        if value >= MIN && value <= MAX { Some(Self(value)) } else { None }
    }

    /// A constant in range (checked at compile time): for defaults.
    pub const fn of<const V: u64>() -> Self {
        const { assert!(V >= MIN && V <= MAX, "constant out of range") };
        Self(V)
    }

    /// Any number, in range or not: for the audit writer's unit tests, which rotate files
    /// far smaller than a deployment may ask for.
    #[cfg(test)]
    pub(crate) const fn unchecked(value: u64) -> Self {
        Self(value)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The number as seconds.
    pub const fn secs(self) -> Duration {
        Duration::from_secs(self.0)
    }

    /// The number as milliseconds.
    pub const fn millis(self) -> Duration {
        Duration::from_millis(self.0)
    }

    /// The number as microseconds.
    pub const fn micros(self) -> Duration {
        Duration::from_micros(self.0)
    }

    fn out_of_range(value: u64) -> String {
        if MAX == u64::MAX {
            format!("{REFUSAL}at least {MIN} (got {value})")
        } else {
            format!("{REFUSAL}between {MIN} and {MAX} (got {value})")
        }
    }
}

impl<const MIN: u64, const MAX: u64> TryFrom<u64> for Ranged<MIN, MAX> {
    type Error = String;

    fn try_from(value: u64) -> Result<Self, String> {
        Self::new(value).ok_or_else(|| Self::out_of_range(value))
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Ranged<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(d)?;
        Self::try_from(value).map_err(D::Error::custom)
    }
}

impl<const MIN: u64, const MAX: u64> fmt::Display for Ranged<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The dotted field (`section.key`) whose value is at byte `at` of a TOML file of
/// `[section]` tables, for an error that toml reports only by position.
pub(super) fn field_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let section = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find_map(|l| l.strip_prefix('[').and_then(|l| l.strip_suffix(']')).map(str::trim));
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_out_of_range_are_refused_naming_the_range() {
        type Secs = Ranged<1, 300>;
        assert_eq!(Secs::new(1).unwrap().secs(), Duration::from_secs(1));
        assert!(Secs::new(0).is_none() && Secs::new(301).is_none());
        assert_eq!(Secs::try_from(0).unwrap_err(), "must be between 1 and 300 (got 0)");
        assert_eq!(
            Ranged::<1, { u64::MAX }>::try_from(0).unwrap_err(),
            "must be at least 1 (got 0)"
        );
        assert_eq!(Secs::of::<10>().get(), 10);
    }

    #[test]
    fn the_field_at_an_error_is_named_with_its_section() {
        let text = "listen = \"x\"\n[tls]\ncert = \"a\"\n\n[limits]\nmax_versions = 0\n";
        let at = text.find('0').unwrap();
        assert_eq!(field_at(text, at).as_deref(), Some("limits.max_versions"));
        assert_eq!(field_at(text, 3).as_deref(), Some("listen"));
        assert_eq!(field_at("[a]\n\"q k\" = 1\n", 12), None);
    }
}
