//! Path patterns for policies, matched segment by segment.
//!
//! casbin-rs's `keyMatch` compares text before the first `*`, so `/app*` matches
//! `/app-evil/x`, `/app/*` matches `/app/../root`, and a multi-byte character in the request
//! panics it. Our patterns are made of whole segments instead:
//!
//! | segment | matches |
//! | --- | --- |
//! | `name` | exactly that segment |
//! | `*` | exactly one segment, any name |
//! | `**` (last segment only) | zero or more trailing segments |
//!
//! So `/apps/*/db` matches `/apps/billing/db` but not `/apps/billing/x/db`, and `/apps/billing/**`
//! matches `/apps/billing` and everything below it, never `/apps/billing-evil`. `/**` matches
//! every path. Patterns are checked when a policy is loaded; requests are canonical
//! [`Target`]s (a [`SecretPath`](crate::SecretPath), or `/` for whole-store operations), so there is no
//! `..` or `//` to confuse the matcher, and it works on whole `str` segments, so it cannot
//! split a multi-byte character.

use std::fmt;

use crate::path::Target;

/// A parsed, valid policy path pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A literal segment name.
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**`: any number of trailing segments (only last).
    Rest,
}

/// Why a pattern is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Does not start with `/`.
    #[error("pattern {0:?} must start with '/'")]
    NotAbsolute(String),
    /// Empty, `.` or `..` segment.
    #[error("pattern {0:?} has an empty, '.' or '..' segment")]
    BadSegment(String),
    /// `**` before the end.
    #[error("pattern {0:?} uses '**' before the last segment; '**' may only end a pattern")]
    RestNotLast(String),
    /// `*` mixed with other characters, or another disallowed character.
    #[error(
        "pattern {0:?}: segments are names of A-Z a-z 0-9 . _ -, or exactly '*' or '**' ('app*' is not allowed)"
    )]
    BadCharacter(String),
    /// Longer than any path.
    #[error("pattern is longer than 512 bytes")]
    TooLong,
}

impl Pattern {
    /// Parses a pattern such as `/apps/*/db` or `/apps/billing/**`.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let shown = || text.chars().take(80).collect::<String>();
        if text.len() > crate::path::MAX_PATH_BYTES {
            return Err(PatternError::TooLong);
        }
        let rest = text.strip_prefix('/').ok_or_else(|| PatternError::NotAbsolute(shown()))?;
        let raw: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            let seg = match *s {
                "**" if i + 1 == raw.len() => Segment::Rest,
                "**" => return Err(PatternError::RestNotLast(shown())),
                "*" => Segment::One,
                "" | "." | ".." => return Err(PatternError::BadSegment(shown())),
                name if name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
                {
                    Segment::Literal(name.to_owned())
                }
                _ => return Err(PatternError::BadCharacter(shown())),
            };
            segments.push(seg);
        }
        Ok(Self { text: text.to_owned(), segments })
    }

    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether `target` matches.
    pub fn matches(&self, target: &Target) -> bool {
        self.matches_segments(target.segments())
    }

    /// Whether a canonical path, given as its segments, matches.
    pub(crate) fn matches_segments<'a>(&self, mut path: impl Iterator<Item = &'a str>) -> bool {
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => {
                    if path.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(name) => {
                    if path.next() != Some(name.as_str()) {
                        return false;
                    }
                }
            }
        }
        path.next().is_none()
    }
}

/// `pathMatch(request_path, pattern)` for casbin's matcher (the reference, see
/// [`super::reference`]): false for an invalid pattern, and for a request path that is not
/// canonical, which authorization never sees (requests are parsed into a [`Target`] first).
pub fn path_match(path: &str, pattern: &str) -> bool {
    match (Target::parse(path), Pattern::parse(pattern)) {
        (Ok(target), Ok(pattern)) => pattern.matches(&target),
        _ => false,
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_star_is_not_a_text_prefix() {
        // keyMatch's foot-gun: `/app*` would match `/app-evil/x`. Ours refuses the pattern,
        // and the segment forms do not leak into siblings.
        assert!(matches!(Pattern::parse("/secret/app*"), Err(PatternError::BadCharacter(_))));
        assert!(!path_match("/secret/app-evil/x", "/secret/app/**"));
        assert!(!path_match("/secret/app-evil", "/secret/app/*"));
        assert!(path_match("/secret/app/x", "/secret/app/**"));
    }

    #[test]
    fn traversal_never_matches() {
        // `/app/*` must not match `/app/../root`: dot segments are not canonical paths,
        // and segment-wise matching gives `..` no special meaning either.
        assert!(!path_match("/app/../root", "/app/*"));
        assert!(crate::SecretPath::parse("/app/../root").is_err());
    }

    #[test]
    fn multibyte_input_does_not_panic() {
        assert!(!path_match("/sé", "/sx/**"));
        assert!(!path_match("/sé", "/s*"));
        // Not a canonical path, so it never reaches a decision (SecretPath::parse refuses it
        // first); the matcher refuses it too rather than guessing at its segments.
        assert!(!path_match("/sé", "/*"));
        assert!(path_match("/s", "/*"), "segment-wise, any one segment");
    }

    #[test]
    fn segment_semantics() {
        assert!(path_match("/a/b/c", "/a/*/c"));
        assert!(!path_match("/a/b/x/c", "/a/*/c"));
        assert!(!path_match("/a/b/write", "/a/*/read"));
        assert!(path_match("/a", "/a/**"));
        assert!(path_match("/a/b/c/d", "/a/**"));
        assert!(!path_match("/ab", "/a/**"));
        assert!(path_match("/", "/**"));
        assert!(path_match("/x/y", "/**"));
        assert!(!path_match("/a", "/a/*"));
        assert!(path_match("/a/b", "/a/b"));
        assert!(!path_match("/a/b/c", "/a/b"));
        assert!(!path_match("/a/b", "/a/b/c"));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in ["", "a/b", "/a//b", "/a/../b", "/a/**/b", "/a/b*", "/a b", "/é"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
            assert!(!path_match("/a/b", bad));
        }
    }

    proptest! {
        #[test]
        fn matcher_never_panics(path in "\\PC{0,40}", pattern in "\\PC{0,40}|(/(\\*|\\*\\*|[a-cé]{1,2})){0,5}") {
            let _ = path_match(&path, &pattern);
        }

        #[test]
        fn literal_patterns_match_only_themselves(a in "(/[a-c]{1,2}){1,4}", b in "(/[a-c]{1,2}){1,4}") {
            prop_assert_eq!(path_match(&a, &b), a == b);
        }
    }
}
