//! Small helpers for text the gateway reads from files and reports back to people.

/// The 1-based line of a TOML parse error in `text` (1 when toml gives no position). Counts
/// newlines in the bytes before the error, so an error at the start of a line names that
/// line, and a position inside a multi-byte character cannot panic. Used instead of toml's
/// own `Display`, which quotes the offending line (a keyring line holds key material).
pub(crate) fn toml_error_line(text: &str, error: &toml::de::Error) -> usize {
    let at = error.span().map_or(0, |s| s.start.min(text.len()));
    text.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1
}

/// `text` with every control or invisible formatting character escaped (`\n`, `\r`, `\t`,
/// `\u{1b}`, `\u{202e}`, …), for output read by people: an attacker-controlled string (a
/// path, a principal, a log line) cannot move the cursor, clear the screen, retitle the
/// terminal, reorder text or forge a line. Backslashes are doubled, so an escape cannot be
/// faked either.
pub fn escaped(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_escaped(&mut out, c, false);
    }
    std::borrow::Cow::Owned(out)
}

/// A secret value for a terminal: its text as is, line breaks and tabs kept (a PEM key stays
/// readable), every other control or invisible formatting character escaped as in
/// [`escaped`], and bytes that are not UTF-8 as `\xNN`.
pub fn for_terminal(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for chunk in value.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_escaped(&mut out, c, true);
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_invisible_format(c)
}

/// Zero-width and bidirectional formatting characters (Trojan Source, CVE-2021-42574).
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

fn push_escaped(out: &mut String, c: char, keep_lines: bool) {
    match c {
        '\n' | '\t' if keep_lines => out.push(c),
        '\\' if !keep_lines => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if c.is_control() || is_invisible_format(c) => {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert!(matches!(escaped("/app/db"), std::borrow::Cow::Borrowed(_)));
        let attack = "/x\x1b[2J\r\nseq 1 admin allow OK\x1b]0;pwned\x07\u{202e}\u{9b}";
        let shown = escaped(attack);
        assert_eq!(
            shown,
            "/x\\u{1b}[2J\\r\\nseq 1 admin allow OK\\u{1b}]0;pwned\\u{7}\\u{202e}\\u{9b}"
        );
        assert!(!shown.chars().any(|c| c.is_control()));
        assert_eq!(escaped("a\\u{1b}"), "a\\\\u{1b}", "a literal escape is not an escape");
    }

    #[test]
    fn values_for_a_terminal_keep_lines_and_escape_the_rest() {
        let v = b"-----BEGIN-----\n\tkey\x1b]0;x\x07\r\xff\n";
        assert_eq!(for_terminal(v), "-----BEGIN-----\n\tkey\\u{1b}]0;x\\u{7}\\r\\xff\n");
        assert_eq!(for_terminal("é✓".as_bytes()), "é✓");
    }
}
