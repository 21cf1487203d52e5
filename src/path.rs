//! Secret paths: the only way a path from a request reaches the rest of the gateway.
//!
//! `SecretPath::parse` is the single gate. A `SecretPath` is canonical by construction —
//! `/seg/seg/...`, each segment of `[A-Za-z0-9._-]`, no empty, `.` or `..` segments, at most
//! [`MAX_PATH_BYTES`] bytes and [`MAX_SEGMENTS`] segments — so code that holds one never
//! checks it again, and a pattern matcher or store key built from it cannot be confused by
//! traversal, separators or non-ASCII input. Bad input is refused, never repaired: a client
//! that sends `/a//b` learns that, instead of silently reading `/a/b`.

use std::fmt;

/// Longest accepted path, in bytes.
pub const MAX_PATH_BYTES: usize = 512;
/// Most segments a path may have.
pub const MAX_SEGMENTS: usize = 32;

/// A canonical secret path such as `/payments/db/password`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretPath(String);

/// Serialized as its text; deserialized by parsing, so a stored path that is not canonical
/// is refused, never used.
impl serde::Serialize for SecretPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SecretPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A `List` prefix: either the root (`/`) or a secret path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPrefix {
    /// Everything.
    Root,
    /// The path itself and everything below it.
    Path(SecretPath),
}

/// What a request acts on: one secret, or the whole store (`/`, for operator actions).
///
/// The only inputs authorization decides on; like [`SecretPath`], a `Target` is canonical
/// by construction, so the policy's pattern matcher never sees anything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The whole store: `/`.
    Root,
    /// One secret.
    Secret(SecretPath),
}

/// Why a path was refused. Messages name the rule and echo at most a short, sanitized
/// excerpt of the input (paths are not secret, but they are attacker-controlled text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is the empty string.
    #[error("path is empty")]
    Empty,
    /// The path does not begin with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// The path is longer than [`MAX_PATH_BYTES`].
    #[error("path is {0} bytes long; the limit is {MAX_PATH_BYTES}")]
    TooLong(usize),
    /// The path has more than [`MAX_SEGMENTS`] segments.
    #[error("path has more than {MAX_SEGMENTS} segments")]
    TooManySegments,
    /// `//` or a trailing `/`.
    #[error("path has an empty segment (at segment {0}; '//' or a trailing '/')")]
    EmptySegment(usize),
    /// A `.` or `..` segment.
    #[error("path segment {0} is '.' or '..'; relative segments are not allowed")]
    DotSegment(usize),
    /// A byte outside `[A-Za-z0-9._-]`.
    #[error(
        "path segment {segment} has a character that is not allowed ({found}); use A-Z a-z 0-9 . _ -"
    )]
    BadCharacter {
        /// 1-based segment number.
        segment: usize,
        /// A printable description of the offending character.
        found: String,
    },
    /// `/` where a secret path was required.
    #[error("path '/' names no secret; give a path such as /app/db/password")]
    Root,
}

impl SecretPath {
    /// Parses and checks a path. See the module docs for the rules.
    pub fn parse(input: &str) -> Result<Self, PathError> {
        if input.is_empty() {
            return Err(PathError::Empty);
        }
        if input.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(input.len()));
        }
        let Some(rest) = input.strip_prefix('/') else {
            return Err(PathError::NotAbsolute);
        };
        if rest.is_empty() {
            return Err(PathError::Root);
        }
        let mut count = 0;
        for (i, segment) in rest.split('/').enumerate() {
            let n = i + 1;
            count = n;
            if n > MAX_SEGMENTS {
                return Err(PathError::TooManySegments);
            }
            check_segment(segment, n)?;
        }
        debug_assert!(count >= 1);
        Ok(Self(input.to_owned()))
    }

    /// The canonical text, always starting with `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0[1..].split('/')
    }

    /// Whether `self` is `prefix` or lies below it (segment-wise: `/app` is not a prefix of
    /// `/apple`).
    pub fn starts_with(&self, prefix: &PathPrefix) -> bool {
        match prefix {
            PathPrefix::Root => true,
            PathPrefix::Path(p) => {
                self.0 == p.0
                    || (self.0.starts_with(&p.0) && self.0.as_bytes().get(p.0.len()) == Some(&b'/'))
            }
        }
    }
}

impl PathPrefix {
    /// Parses a list prefix: `/`, or a secret path, optionally with one trailing `/`.
    pub fn parse(input: &str) -> Result<Self, PathError> {
        if input == "/" {
            return Ok(Self::Root);
        }
        let trimmed = match input.strip_suffix('/') {
            Some(t) if !t.is_empty() && !t.ends_with('/') => t,
            _ => input,
        };
        SecretPath::parse(trimmed).map(Self::Path)
    }

    /// The canonical text: `/` or the path.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Root => "/",
            Self::Path(p) => p.as_str(),
        }
    }
}

impl Target {
    /// Parses `/` or a canonical secret path.
    pub fn parse(input: &str) -> Result<Self, PathError> {
        match SecretPath::parse(input) {
            Ok(p) => Ok(Self::Secret(p)),
            Err(PathError::Root) => Ok(Self::Root),
            Err(e) => Err(e),
        }
    }

    /// The canonical text: `/` or the path.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Root => "/",
            Self::Secret(p) => p.as_str(),
        }
    }

    /// The segments, in order; `/` has none.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        let path = match self {
            Self::Root => None,
            Self::Secret(p) => Some(p.segments()),
        };
        path.into_iter().flatten()
    }
}

impl From<SecretPath> for Target {
    fn from(p: SecretPath) -> Self {
        Self::Secret(p)
    }
}

fn check_segment(segment: &str, n: usize) -> Result<(), PathError> {
    if segment.is_empty() {
        return Err(PathError::EmptySegment(n));
    }
    if segment == "." || segment == ".." {
        return Err(PathError::DotSegment(n));
    }
    if let Some(c) =
        segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        let found = if c.is_ascii_graphic() || c == ' ' {
            format!("'{c}'")
        } else {
            format!("U+{:04X}", c as u32)
        };
        return Err(PathError::BadCharacter { segment: n, found });
    }
    Ok(())
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretPath({})", self.0)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_canonical_paths() {
        for p in ["/a", "/payments/db/password", "/A-b_c.d/0", "/x/.hidden", "/a/..b"] {
            assert_eq!(SecretPath::parse(p).unwrap().as_str(), p);
        }
    }

    #[test]
    fn refuses_each_rule_with_its_own_error() {
        assert_eq!(SecretPath::parse(""), Err(PathError::Empty));
        assert_eq!(SecretPath::parse("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(SecretPath::parse("/"), Err(PathError::Root));
        assert_eq!(SecretPath::parse("/a//b"), Err(PathError::EmptySegment(2)));
        assert_eq!(SecretPath::parse("/a/"), Err(PathError::EmptySegment(2)));
        assert_eq!(SecretPath::parse("/a/../b"), Err(PathError::DotSegment(2)));
        assert_eq!(SecretPath::parse("/."), Err(PathError::DotSegment(1)));
        assert!(matches!(
            SecretPath::parse("/a/b c"),
            Err(PathError::BadCharacter { segment: 2, .. })
        ));
        assert!(matches!(
            SecretPath::parse("/sé"),
            Err(PathError::BadCharacter { segment: 1, ref found }) if found == "U+00E9"
        ));
        assert!(matches!(
            SecretPath::parse("/a\n"),
            Err(PathError::BadCharacter { ref found, .. }) if found == "U+000A"
        ));
        assert!(matches!(SecretPath::parse("/a\\b"), Err(PathError::BadCharacter { .. })));
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(SecretPath::parse(&long), Err(PathError::TooLong(MAX_PATH_BYTES + 1)));
        let deep = "/a".repeat(MAX_SEGMENTS + 1);
        assert_eq!(SecretPath::parse(&deep), Err(PathError::TooManySegments));
        assert!(SecretPath::parse(&"/a".repeat(MAX_SEGMENTS)).is_ok());
    }

    #[test]
    fn error_messages_do_not_echo_control_characters() {
        let msg = SecretPath::parse("/a\x1b[31m").unwrap_err().to_string();
        assert!(!msg.contains('\x1b'), "{msg}");
    }

    #[test]
    fn prefix_matching_is_segment_wise() {
        let app = PathPrefix::parse("/app").unwrap();
        assert!(SecretPath::parse("/app").unwrap().starts_with(&app));
        assert!(SecretPath::parse("/app/db").unwrap().starts_with(&app));
        assert!(!SecretPath::parse("/apple").unwrap().starts_with(&app));
        assert!(!SecretPath::parse("/app-evil/x").unwrap().starts_with(&app));
        assert!(SecretPath::parse("/z").unwrap().starts_with(&PathPrefix::Root));
        assert_eq!(PathPrefix::parse("/app/").unwrap(), app);
        assert!(PathPrefix::parse("/app//").is_err());
        assert!(PathPrefix::parse("").is_err());
    }

    #[test]
    fn targets_are_the_root_or_a_secret_path() {
        assert_eq!(Target::parse("/").unwrap(), Target::Root);
        assert_eq!(Target::Root.segments().count(), 0);
        let t = Target::parse("/a/b").unwrap();
        assert_eq!(t.as_str(), "/a/b");
        assert_eq!(t.segments().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(Target::parse("//"), Err(PathError::EmptySegment(1)));
        assert_eq!(Target::parse("a"), Err(PathError::NotAbsolute));
        assert_eq!(Target::parse(""), Err(PathError::Empty));
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_accepted_paths_are_canonical(s in "\\PC{0,80}|[/a.]{0,20}") {
            if let Ok(p) = SecretPath::parse(&s) {
                prop_assert_eq!(p.as_str(), s.as_str());
                prop_assert!(p.segments().all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
                let rejoined = format!("/{}", p.segments().collect::<Vec<_>>().join("/"));
                prop_assert_eq!(SecretPath::parse(&rejoined).unwrap(), p);
            }
        }

        #[test]
        fn generated_good_paths_parse(segs in proptest::collection::vec("[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", 1..10)) {
            let s = format!("/{}", segs.join("/"));
            prop_assert!(SecretPath::parse(&s).is_ok(), "{}", s);
        }
    }
}
