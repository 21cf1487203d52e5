//! A policy directory (`model.conf`, `policy.csv`, `tests/*.toml`), parsed and indexed.
//!
//! The model is fixed (RBAC with role hierarchy, deny overrides allow, no match means
//! deny, our segment-wise `pathMatch`): `model.conf` must be exactly that model, so the
//! index below answers what casbin's `Enforcer` answers for the same files. A differential
//! test checks that on 100,000 generated requests over generated policies.
//!
//! The index: rules grouped by their subject (a principal or a role), each group a trie over
//! pattern segments. A decision walks the caller's role closure (breadth first, at most
//! [`MAX_ROLE_DEPTH`] links, as casbin's default role manager) and, for each subject, only
//! the trie branches the request path can match — so its cost depends on the caller's roles
//! and the path's depth, not on the number of rules.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
};

use super::{
    Action, Object,
    pattern::{Pattern, Segment},
};
use crate::{
    limits::RateLimits,
    path::{PathPrefix, Target},
};

/// Role links followed at most. casbin's default role manager is created with a maximum
/// hierarchy level of 10, which its breadth-first search turns into at most 9 links from
/// the subject (measured against casbin by `role_chains_around_the_depth_limit_agree_with_casbin`).
pub const MAX_ROLE_DEPTH: usize = 9;

/// The model this gateway implements; `model.conf` must say exactly this (comments and
/// whitespace aside).
pub const MODEL: &str = "[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act, eft

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub) && pathMatch(r.obj, p.obj) && (r.act == p.act || p.act == \"*\")
";

/// Allow or deny: a rule's effect, and the decision an audit record notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Grants.
    Allow,
    /// Refuses, whatever else grants.
    Deny,
}

/// One `p` line.
#[derive(Debug, Clone)]
pub struct Rule {
    /// 1-based line in `policy.csv`.
    pub line: usize,
    /// Principal or role.
    pub subject: String,
    /// Path pattern.
    pub pattern: Pattern,
    /// The action, or `None` for `*`.
    pub action: Option<Action>,
    /// Allow or deny.
    pub effect: Effect,
}

/// The outcome of a decision, with the rule that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the allow rule at this line (the first that matched; no deny matched).
    Allow {
        /// 1-based line in `policy.csv`.
        rule_line: usize,
    },
    /// Refused by the deny rule at this line (the first deny that matched), or by default
    /// (`None`: no rule matched).
    Deny {
        /// 1-based line in `policy.csv`, `None` for the default deny.
        rule_line: Option<usize>,
    },
}

impl Effect {
    /// `allow` or `deny`, as in policies and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl Decision {
    /// Allow or deny.
    pub fn effect(self) -> Effect {
        if self.is_allow() { Effect::Allow } else { Effect::Deny }
    }

    /// Whether the request is allowed.
    pub fn is_allow(self) -> bool {
        matches!(self, Self::Allow { .. })
    }

    /// The deciding rule's line; `None` for the default deny.
    pub fn rule_line(self) -> Option<usize> {
        match self {
            Self::Allow { rule_line } => Some(rule_line),
            Self::Deny { rule_line } => rule_line,
        }
    }

    /// The deciding rule as the audit log and `policy explain` name it: `policy.csv:LINE`,
    /// or `default deny`.
    pub fn rule(self) -> String {
        self.rule_line().map_or_else(|| "default deny".to_owned(), |l| format!("policy.csv:{l}"))
    }
}

/// A loaded policy.
pub struct Policy {
    rules: Vec<Rule>,
    roles: HashMap<String, Vec<String>>,
    index: HashMap<String, Node>,
    tests: Vec<TestCase>,
    version: String,
    lines: Vec<String>,
    rate_limits: RateLimits,
}

/// One table test from `tests/*.toml`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// Principal or role asking.
    pub subject: String,
    /// Request path (`/` for whole-store actions).
    pub path: String,
    /// Action name.
    pub action: String,
    /// `allow` or `deny`.
    pub expect: String,
    /// Where it came from (file and case number), filled in on load.
    #[serde(skip)]
    pub origin: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    case: Vec<TestCase>,
}

/// Why a policy directory cannot be used. Never includes more than the offending line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file cannot be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `model.conf` is not the supported model.
    #[error(
        "{file}: not the secretgate model (RBAC, deny overrides, pathMatch); see policies/README.md"
    )]
    Model {
        /// The file.
        file: String,
    },
    /// A syntax or value error at a line.
    #[error("{file}:{line}: {reason}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The policy's own table tests fail.
    #[error("policy tests fail: {}", .0.join("; "))]
    TestsFail(Vec<String>),
}

#[derive(Default)]
struct Node {
    literal: HashMap<String, Node>,
    one: Option<Box<Node>>,
    /// Rules whose pattern ends here.
    here: Vec<u32>,
    /// Rules whose pattern ends with `**` here.
    rest: Vec<u32>,
}

impl Policy {
    /// Parses `rate_limits.toml` text against this policy's roles.
    pub fn parse_rate_limits(&self, text: &str, file: &str) -> Result<RateLimits, PolicyError> {
        let is_role = |name: &str| self.roles.values().flatten().any(|r| r == name);
        let subjects = self.roles.keys().map(|s| (s.as_str(), self.subjects(s)));
        RateLimits::parse(text, file, is_role, subjects)
    }

    /// The rate limits in force with this policy (none without `rate_limits.toml`).
    pub fn rate_limits(&self) -> &RateLimits {
        &self.rate_limits
    }

    /// Parses `policy.csv` text.
    pub fn from_csv(
        csv: &str,
        file: &str,
        tests: Vec<TestCase>,
        version: String,
    ) -> Result<Self, PolicyError> {
        let mut rules = Vec::new();
        let mut roles: HashMap<String, Vec<String>> = HashMap::new();
        let err = |line: usize, reason: String| PolicyError::Syntax {
            file: file.to_owned(),
            line,
            reason,
        };
        for (i, raw) in csv.lines().enumerate() {
            let line = i + 1;
            let text = raw.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = text.split(',').map(str::trim).collect();
            match fields.as_slice() {
                ["p", sub, obj, act, eft] => {
                    check_subject(sub).map_err(|r| err(line, r))?;
                    let pattern = Pattern::parse(obj).map_err(|e| err(line, e.to_string()))?;
                    let action = match *act {
                        "*" => None,
                        a => Some(Action::parse(a).ok_or_else(|| {
                            err(line, format!("unknown action {a:?}; use read, write, delete, destroy, list, admin or *"))
                        })?),
                    };
                    let effect = match *eft {
                        "allow" => Effect::Allow,
                        "deny" => Effect::Deny,
                        e => return Err(err(line, format!("effect {e:?} must be allow or deny"))),
                    };
                    rules.push(Rule { line, subject: (*sub).to_owned(), pattern, action, effect });
                }
                ["g", member, role] => {
                    check_subject(member).map_err(|r| err(line, r))?;
                    check_subject(role).map_err(|r| err(line, r))?;
                    roles.entry((*member).to_owned()).or_default().push((*role).to_owned());
                }
                ["p", ..] => {
                    return Err(err(
                        line,
                        "a p line has 4 fields: p, subject, path pattern, action, allow|deny"
                            .into(),
                    ));
                }
                ["g", ..] => {
                    return Err(err(line, "a g line has 2 fields: g, member, role".into()));
                }
                _ => return Err(err(line, "lines start with p or g".into())),
            }
        }
        let mut index: HashMap<String, Node> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            let mut node = index.entry(rule.subject.clone()).or_default();
            let idx = u32::try_from(i).map_err(|_| err(rule.line, "too many rules".into()))?;
            let segments = rule.pattern.segments();
            for (j, seg) in segments.iter().enumerate() {
                match seg {
                    Segment::Literal(name) => node = node.literal.entry(name.clone()).or_default(),
                    Segment::One => node = node.one.get_or_insert_with(Box::default),
                    Segment::Rest => {
                        debug_assert_eq!(j + 1, segments.len());
                        node.rest.push(idx);
                    }
                }
            }
            if !matches!(segments.last(), Some(Segment::Rest)) {
                node.here.push(idx);
            }
        }
        let lines = csv.lines().map(str::to_owned).collect();
        let rate_limits = RateLimits::default();
        Ok(Self { rules, roles, index, tests, version, lines, rate_limits })
    }

    /// Decides whether `subject` may do `action` on `target` (a [`Target`], a secret path or
    /// the whole store).
    pub fn decide(&self, subject: &str, target: &impl Object, action: Action) -> Decision {
        let segments: Vec<&str> = target.segments().collect();
        let mut matched: Vec<u32> = Vec::new();
        for s in self.subjects(subject) {
            if let Some(root) = self.index.get(s) {
                collect(root, &segments, &mut matched);
            }
        }
        let mut allow: Option<usize> = None;
        let mut deny: Option<usize> = None;
        for i in matched {
            let rule = &self.rules[i as usize];
            if rule.action.is_some_and(|a| a != action) {
                continue;
            }
            let slot = match rule.effect {
                Effect::Allow => &mut allow,
                Effect::Deny => &mut deny,
            };
            *slot = Some(slot.map_or(rule.line, |l| l.min(rule.line)));
        }
        match (deny, allow) {
            (Some(line), _) => Decision::Deny { rule_line: Some(line) },
            (None, Some(line)) => Decision::Allow { rule_line: line },
            (None, None) => Decision::Deny { rule_line: None },
        }
    }

    /// Whether an allow rule of `subject` (or of its roles) for one of `actions` could match
    /// `prefix` or a path below it. When none can, nothing under `prefix` can be shown to
    /// `subject`, whatever the store holds (deny rules are not looked at: this is an upper
    /// bound on what could be allowed).
    pub fn may_allow_under(&self, subject: &str, prefix: &PathPrefix, actions: &[Action]) -> bool {
        let segments: Vec<&str> = match prefix {
            PathPrefix::Root => Vec::new(),
            PathPrefix::Path(p) => p.segments().collect(),
        };
        let mut matched: Vec<u32> = Vec::new();
        for s in self.subjects(subject) {
            if let Some(root) = self.index.get(s) {
                collect_under(root, &segments, &mut matched);
            }
        }
        matched.into_iter().any(|i| {
            let rule = &self.rules[i as usize];
            rule.effect == Effect::Allow && rule.action.is_none_or(|a| actions.contains(&a))
        })
    }

    /// The subject itself and every role it reaches within [`MAX_ROLE_DEPTH`] links.
    pub fn subjects<'a>(&'a self, subject: &'a str) -> Vec<&'a str> {
        let mut out = vec![subject];
        let mut seen: HashSet<&str> = HashSet::from([subject]);
        let mut queue: VecDeque<(&str, usize)> = VecDeque::from([(subject, 0)]);
        while let Some((s, depth)) = queue.pop_front() {
            if depth >= MAX_ROLE_DEPTH {
                continue;
            }
            for role in self.roles.get(s).into_iter().flatten() {
                if seen.insert(role) {
                    out.push(role);
                    queue.push_back((role, depth + 1));
                }
            }
        }
        out
    }

    /// The roles of `subject` (without itself).
    pub fn roles_of(&self, subject: &str) -> Vec<String> {
        self.subjects(subject).into_iter().skip(1).map(str::to_owned).collect()
    }

    /// The text of `policy.csv` line `line` (1-based), for explanations.
    pub fn line_text(&self, line: usize) -> Option<&str> {
        self.lines.get(line.checked_sub(1)?).map(|l| l.trim())
    }

    /// Runs the table tests; returns one message per failure.
    pub fn run_tests(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for t in &self.tests {
            let Some(action) = Action::parse(&t.action) else {
                failures.push(format!("{}: unknown action {:?}", t.origin, t.action));
                continue;
            };
            let expect_allow = match t.expect.as_str() {
                "allow" => true,
                "deny" => false,
                other => {
                    failures.push(format!("{}: expect {other:?} must be allow or deny", t.origin));
                    continue;
                }
            };
            let target = match Target::parse(&t.path) {
                Ok(target) => target,
                Err(e) => {
                    failures.push(format!("{}: path {:?}: {e}", t.origin, t.path));
                    continue;
                }
            };
            let d = self.decide(&t.subject, &target, action);
            if d.is_allow() != expect_allow {
                failures.push(format!(
                    "{}: {} {} {} expected {} but got {}{}",
                    t.origin,
                    t.subject,
                    t.action,
                    t.path,
                    t.expect,
                    if d.is_allow() { "allow" } else { "deny" },
                    d.rule_line().map(|l| format!(" (policy.csv:{l})")).unwrap_or_default()
                ));
            }
        }
        failures
    }

    /// Number of table tests.
    pub fn test_count(&self) -> usize {
        self.tests.len()
    }

    /// Number of `p` rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Number of `g` links.
    pub fn link_count(&self) -> usize {
        self.roles.values().map(Vec::len).sum()
    }

    /// The same policy labelled as stored version `n`: its version becomes `n:FINGERPRINT`.
    pub fn numbered(mut self, n: u64) -> Self {
        self.version = format!("{n}:{}", self.version);
        self
    }

    /// A short fingerprint of the files in force (`N:FINGERPRINT` for stored version N).
    pub fn version(&self) -> &str {
        &self.version
    }
}

fn collect(node: &Node, segments: &[&str], out: &mut Vec<u32>) {
    out.extend_from_slice(&node.rest);
    let Some((first, rest)) = segments.split_first() else {
        out.extend_from_slice(&node.here);
        return;
    };
    if let Some(child) = node.literal.get(*first) {
        collect(child, rest, out);
    }
    if let Some(child) = &node.one {
        collect(child, rest, out);
    }
}

/// The rules whose pattern matches a path that is `segments` or lies below it.
fn collect_under(node: &Node, segments: &[&str], out: &mut Vec<u32>) {
    out.extend_from_slice(&node.rest);
    let Some((first, rest)) = segments.split_first() else {
        collect_subtree(node, out);
        return;
    };
    if let Some(child) = node.literal.get(*first) {
        collect_under(child, rest, out);
    }
    if let Some(child) = &node.one {
        collect_under(child, rest, out);
    }
}

/// Every rule at or below `node`.
fn collect_subtree(node: &Node, out: &mut Vec<u32>) {
    out.extend_from_slice(&node.here);
    out.extend_from_slice(&node.rest);
    for child in node.literal.values().chain(node.one.as_deref()) {
        collect_subtree(child, out);
    }
}

fn check_subject(s: &str) -> Result<(), String> {
    let ok =
        !s.is_empty() && s.len() <= 1024 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "subject {:?} is empty or has control characters",
            s.chars().take(80).collect::<String>()
        ))
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.version)
            .field("rules", &self.rules.len())
            .field("links", &self.link_count())
            .finish()
    }
}

mod files;

pub use files::PolicyFiles;

#[cfg(test)]
mod tests;
