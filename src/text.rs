//! Small helpers for text the gateway reads from files and reports back to people.

/// The 1-based line of a TOML parse error in `text` (1 when toml gives no position). Counts
/// newlines in the bytes before the error, so an error at the start of a line names that
/// line, and a position inside a multi-byte character cannot panic. Used instead of toml's
/// own `Display`, which quotes the offending line (a keyring line holds key material).
pub(crate) fn toml_error_line(text: &str, error: &toml::de::Error) -> usize {
    let at = error.span().map_or(0, |s| s.start.min(text.len()));
    text.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1
}
