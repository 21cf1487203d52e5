//! `rate_limits.toml` in the policy directory: requests per second and burst, per action
//! class, for every principal (`[default]`), for one principal (`[principal."ID"]`), and for
//! all members of a role together (`[role."NAME"]`). It is part of the policy: reloaded
//! with it, counted in its version, and checked by `policy check`.

use std::collections::HashMap;

use serde::Deserialize;

use super::bucket::Rate;
use crate::authz::PolicyError;

/// The file's name in the policy directory. Optional: without it nothing is limited.
pub const FILE: &str = "rate_limits.toml";

/// Highest `per_second` and `burst` accepted.
const MAX_RATE: f64 = 1_000_000.0;

/// What a request is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Get, Versions, List, WhoAmI.
    Read,
    /// Put, Delete, Undelete, Destroy.
    Write,
    /// The Admin service.
    Admin,
}

impl Class {
    /// The class's name in the file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A limit per class; a class left out is not limited (at this level).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Classes {
    read: Option<Limit>,
    write: Option<Limit>,
    admin: Option<Limit>,
}

impl Classes {
    /// The limit for `class`, if one is set.
    pub fn get(&self, class: Class) -> Option<Rate> {
        [self.read, self.write, self.admin][class.index()].map(|l| l.0)
    }

    fn is_empty(&self) -> bool {
        self.read.is_none() && self.write.is_none() && self.admin.is_none()
    }
}

/// One `{ per_second = N, burst = M }`, checked when parsed (so the error has a line).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawLimit")]
struct Limit(Rate);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    per_second: f64,
    burst: u32,
}

impl TryFrom<RawLimit> for Limit {
    type Error = String;

    fn try_from(raw: RawLimit) -> Result<Self, String> {
        if !(raw.per_second > 0.0 && raw.per_second <= MAX_RATE) {
            return Err(format!("per_second must be more than 0 and at most {MAX_RATE}"));
        }
        if raw.burst == 0 || f64::from(raw.burst) > MAX_RATE {
            return Err(format!("burst must be 1 to {MAX_RATE}"));
        }
        Ok(Self(Rate { per_second: raw.per_second, burst: raw.burst }))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    default: Classes,
    #[serde(default)]
    principal: HashMap<String, Classes>,
    #[serde(default)]
    role: HashMap<String, Classes>,
}

/// The limits in force, resolved against the policy's role memberships.
#[derive(Debug, Default)]
pub struct RateLimits {
    default: Classes,
    principals: HashMap<String, Classes>,
    /// Every subject of a `g` line that is (directly or through other roles) a member of a
    /// limited role, with those roles and their limits.
    members: HashMap<String, Vec<(String, Classes)>>,
    roles: HashMap<String, Classes>,
    empty: bool,
}

/// One bucket a request must take a token from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Applies<'a> {
    /// The principal's own bucket (`[principal."ID"]`, else `[default]`).
    Principal(Rate),
    /// The bucket shared by all members of a role.
    Role(&'a str, Rate),
}

impl RateLimits {
    /// Parses `text` (the file `file`); `role_members` gives, for a role name, whether any
    /// `g` line names it, and `subjects` every subject with its roles (closure).
    pub(crate) fn parse<'p>(
        text: &str,
        file: &str,
        is_role: impl Fn(&str) -> bool,
        subjects: impl Iterator<Item = (&'p str, Vec<&'p str>)>,
    ) -> Result<Self, PolicyError> {
        let syntax = |line: usize, reason: String| PolicyError::Syntax {
            file: file.to_owned(),
            line,
            reason,
        };
        let parsed: File = toml::from_str(text)
            .map_err(|e| syntax(crate::text::toml_error_line(text, &e), e.message().to_owned()))?;
        let line_of = |name: &str| text.lines().position(|l| l.contains(name)).map_or(1, |i| i + 1);
        for name in parsed.role.keys() {
            if !is_role(name) {
                return Err(syntax(
                    line_of(name),
                    format!("{name:?} is not a role: no `g` line in policy.csv names it"),
                ));
            }
        }
        for name in parsed.principal.keys() {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(syntax(line_of(name), format!("principal {name:?} is not a name")));
            }
        }
        let role: HashMap<String, Classes> =
            parsed.role.into_iter().filter(|(_, c)| !c.is_empty()).collect();
        let mut members = HashMap::new();
        if !role.is_empty() {
            for (subject, roles) in subjects {
                let limited: Vec<(String, Classes)> = roles
                    .into_iter()
                    .filter_map(|r| role.get(r).map(|c| (r.to_owned(), *c)))
                    .collect();
                if !limited.is_empty() {
                    members.insert(subject.to_owned(), limited);
                }
            }
        }
        let empty = parsed.default.is_empty()
            && parsed.principal.values().all(Classes::is_empty)
            && members.is_empty();
        Ok(Self {
            default: parsed.default,
            principals: parsed.principal,
            members,
            roles: role,
            empty,
        })
    }

    /// Whether nothing at all is limited.
    pub fn is_empty(&self) -> bool {
        self.empty
    }

    /// The shared limit of `role` for `class`, if it has one.
    pub fn role_rate(&self, role: &str, class: Class) -> Option<Rate> {
        self.roles.get(role).and_then(|c| c.get(class))
    }

    /// The buckets a `class` request of `principal` takes a token from.
    pub fn applying<'a>(
        &'a self,
        principal: &str,
        class: Class,
    ) -> impl Iterator<Item = Applies<'a>> + 'a {
        let own = self.principals.get(principal).and_then(|c| c.get(class));
        let own = own.or_else(|| self.default.get(class)).map(Applies::Principal);
        let roles = self.members.get(principal).into_iter().flatten();
        own.into_iter()
            .chain(roles.filter_map(move |(r, c)| c.get(class).map(|rate| Applies::Role(r, rate))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RateLimits, PolicyError> {
        let subjects = vec![
            ("spiffe://x/ci-1", vec!["role:ci", "role:all"]),
            ("spiffe://x/ci-2", vec!["role:ci"]),
            ("spiffe://x/app", vec!["role:all"]),
        ];
        RateLimits::parse(text, FILE, |r| r == "role:ci" || r == "role:all", subjects.into_iter())
    }

    const EXAMPLE: &str = r#"
[default]
read = { per_second = 100, burst = 200 }
write = { per_second = 10, burst = 20 }

[principal."spiffe://x/batch"]
read = { per_second = 1000, burst = 1000 }

[role."role:ci"]
write = { per_second = 5, burst = 5 }
"#;

    #[test]
    fn a_principal_entry_replaces_the_default_per_class_and_roles_add_shared_buckets() {
        let limits = parse(EXAMPLE).unwrap();
        let rate = |per_second, burst| Rate { per_second, burst };
        let of = |p, c| limits.applying(p, c).collect::<Vec<_>>();
        assert_eq!(of("spiffe://x/batch", Class::Read), [Applies::Principal(rate(1000.0, 1000))]);
        assert_eq!(of("spiffe://x/batch", Class::Write), [Applies::Principal(rate(10.0, 20))]);
        assert_eq!(
            of("spiffe://x/ci-1", Class::Write),
            [Applies::Principal(rate(10.0, 20)), Applies::Role("role:ci", rate(5.0, 5))]
        );
        assert_eq!(of("spiffe://x/app", Class::Admin), []);
        assert!(!limits.is_empty());
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn mistakes_are_refused_with_their_line() {
        let cases = [
            ("[default]\nread = { per_second = 0, burst = 1 }\n", 2, "per_second"),
            ("[default]\nread = { per_second = 5, burst = 0 }\n", 2, "burst"),
            ("[default]\nreed = { per_second = 5, burst = 1 }\n", 2, "unknown field"),
            ("\n[role.\"role:typo\"]\nread = { per_second = 5, burst = 1 }\n", 2, "not a role"),
            ("[principal.\"a\\u0007b\"]\nread = { per_second = 5, burst = 1 }\n", 1, "not a name"),
        ];
        for (text, line, says) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{FILE}:{line}: ")), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }
}
