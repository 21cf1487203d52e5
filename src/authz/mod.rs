//! Authorization: casbin RBAC policies from `policies/`, decided in microseconds.
//!
//! Every request needs a [`Permit`] for its (principal, target, action) before it can reach
//! the store or the keyring: [`Authorizer::authorize`] is the only way to get one, and the
//! permit carries its target and (as its type) its action, so no handler can skip the check
//! or use one permit for something else. Decisions come from [`Policy`], an index over the policy
//! files that answers exactly what casbin's `Enforcer` answers for them (see
//! [`reference`] and the differential test), in microseconds instead of milliseconds.
//! Policies reload when their files change; a new policy that does not parse, or fails its
//! own table tests, is refused and the last good one stays in force.

pub mod pattern;
mod permit;
pub mod policy;
pub mod reference;

use std::{fmt, path::Path, sync::Arc};

pub use pattern::{Pattern, PatternError, path_match};
pub use permit::{Act, Object, Permit, WholeStore, act};
pub use policy::{Decision, Effect, Policy, PolicyError, PolicyFiles, Rule};

use crate::{
    identity::Principal,
    path::{PathPrefix, SecretPath},
    reload::Reloadable,
};

/// What a request does to a secret. Written in audit records by its policy name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Get, Versions.
    Read,
    /// Put.
    Write,
    /// Delete, Undelete.
    Delete,
    /// Destroy: remove a version's value for good (its own action: it cannot be undone).
    Destroy,
    /// List.
    List,
    /// Operator actions (key status, rewrap) on `/`.
    Admin,
}

impl Action {
    /// Every action, in policy order.
    pub const ALL: [Self; 6] =
        [Self::Read, Self::Write, Self::Delete, Self::Destroy, Self::List, Self::Admin];

    /// Parses `read`, `write`, `delete`, `destroy`, `list` or `admin`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read" => Self::Read,
            "write" => Self::Write,
            "delete" => Self::Delete,
            "destroy" => Self::Destroy,
            "list" => Self::List,
            "admin" => Self::Admin,
            _ => return None,
        })
    }

    /// The policy name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Delete => "delete",
            Self::Destroy => "destroy",
            Self::List => "list",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: says what was refused, never which rule or what the policy says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: {principal} may not {action} {target}")]
pub struct Denied {
    /// Who asked.
    pub principal: String,
    /// What for.
    pub action: Action,
    /// On what.
    pub target: String,
    /// The deciding rule's line, for the internal log and audit only.
    pub rule_line: Option<usize>,
}

/// The policy in force, reloaded when its files change.
pub type PolicyHandle = Arc<Reloadable<Policy>>;

/// Decides requests against the policy in force.
#[derive(Clone)]
pub struct Authorizer {
    policy: PolicyHandle,
}

impl Authorizer {
    /// Loads the policy directory (refusing it if it fails its own tests).
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let policy = Policy::load(dir)?;
        Ok(Self { policy: Reloadable::new(policy, dir, "policy") })
    }

    /// Decides with the policy in force in `handle` (kept up to date by its owner: the
    /// policy kept in the store).
    pub fn from_handle(handle: PolicyHandle) -> Self {
        Self { policy: handle }
    }

    /// The reloadable policy, for the watcher.
    pub fn handle(&self) -> &PolicyHandle {
        &self.policy
    }

    /// Authorizes `principal` to do `A` on `on`: a permit that holds `on`, or why not.
    pub fn authorize<A: Act>(&self, principal: &Principal, on: A::On) -> Result<Permit<A>, Denied> {
        let policy = self.policy.current();
        match policy.decide(principal.as_str(), &on, A::ACTION) {
            Decision::Allow { rule_line } => {
                Ok(Permit::new(on, rule_line, policy.version().to_owned()))
            }
            Decision::Deny { rule_line } => Err(Denied {
                principal: principal.to_string(),
                action: A::ACTION,
                target: on.to_string(),
                rule_line,
            }),
        }
    }

    /// Whether `principal` may do any of `actions` on `path` (List filtering).
    pub fn allows_any(&self, principal: &Principal, path: &SecretPath, actions: &[Action]) -> bool {
        let policy = self.policy.current();
        actions.iter().any(|a| policy.decide(principal.as_str(), path, *a).is_allow())
    }

    /// Whether the policy in force could let `principal` list or read anything at or below
    /// `prefix` (see [`Policy::may_allow_under`]).
    pub fn may_list_under(&self, principal: &Principal, prefix: &PathPrefix) -> bool {
        let policy = self.policy.current();
        policy.may_allow_under(principal.as_str(), prefix, &[Action::List, Action::Read])
    }

    /// Whether the policy in force could let `principal` read anything at or below `prefix`:
    /// what keeps a Watch stream open.
    pub fn may_read_under(&self, principal: &Principal, prefix: &PathPrefix) -> bool {
        let policy = self.policy.current();
        policy.may_allow_under(principal.as_str(), prefix, &[Action::Read])
    }

    /// The roles of `principal` and the policy version in force.
    pub fn roles(&self, principal: &Principal) -> (Vec<String>, String) {
        let policy = self.policy.current();
        (policy.roles_of(principal.as_str()), policy.version().to_owned())
    }
}
