//! Permits: proof that the policy in force allowed one action on one target.
//!
//! A [`Permit<A>`] holds what it permits: the action is its type parameter (one of the
//! markers in [`act`]) and the target is inside it. Only [`Authorizer::authorize`] makes one,
//! permits cannot be cloned, and the vault takes the path *from* the permit, so a handler
//! cannot use a permit for one secret on another, or a read permit for a write.
//!
//! [`Authorizer::authorize`]: super::Authorizer::authorize

use std::{fmt, marker::PhantomData};

use super::Action;
use crate::path::{SecretPath, Target};

/// The actions a permit can be for, as types.
pub mod act {
    use super::{Act, Action, SecretPath, WholeStore, sealed::Sealed};

    /// `read` on one secret (Get, Versions).
    #[derive(Debug)]
    pub struct Read;
    /// `write` on one secret (Put).
    #[derive(Debug)]
    pub struct Write;
    /// `delete` on one secret (Delete, Undelete).
    #[derive(Debug)]
    pub struct Delete;
    /// `destroy` on one secret (Destroy).
    #[derive(Debug)]
    pub struct Destroy;
    /// `admin` on the whole store (key status, audit status, rewrap).
    #[derive(Debug)]
    pub struct Admin;

    impl Sealed for Read {}
    impl Sealed for Write {}
    impl Sealed for Delete {}
    impl Sealed for Destroy {}
    impl Sealed for Admin {}

    impl Act for Read {
        const ACTION: Action = Action::Read;
        type On = SecretPath;
    }
    impl Act for Write {
        const ACTION: Action = Action::Write;
        type On = SecretPath;
    }
    impl Act for Delete {
        const ACTION: Action = Action::Delete;
        type On = SecretPath;
    }
    impl Act for Destroy {
        const ACTION: Action = Action::Destroy;
        type On = SecretPath;
    }
    impl Act for Admin {
        const ACTION: Action = Action::Admin;
        type On = WholeStore;
    }
}

/// An action a permit can be for: one of the markers in [`act`].
pub trait Act: sealed::Sealed {
    /// The policy action.
    const ACTION: Action;
    /// What the action is done on: a [`SecretPath`], or the [`WholeStore`].
    type On: Object;
}

/// Something authorization decides on: a secret, the whole store, or either ([`Target`]).
/// Canonical by construction, so the policy's matcher sees only canonical segments.
pub trait Object: sealed::Sealed + fmt::Display {
    /// The segments, in order; the whole store has none.
    fn segments(&self) -> impl Iterator<Item = &str>;
}

/// The whole store (`/`): what operator actions act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WholeStore;

impl fmt::Display for WholeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("/")
    }
}

impl sealed::Sealed for WholeStore {}
impl sealed::Sealed for SecretPath {}
impl sealed::Sealed for Target {}

impl Object for WholeStore {
    fn segments(&self) -> impl Iterator<Item = &str> {
        std::iter::empty()
    }
}

impl Object for SecretPath {
    fn segments(&self) -> impl Iterator<Item = &str> {
        SecretPath::segments(self)
    }
}

impl Object for Target {
    fn segments(&self) -> impl Iterator<Item = &str> {
        Target::segments(self)
    }
}

/// Proof that a principal may do `A` on [`Permit::on`]. Only
/// [`Authorizer::authorize`](super::Authorizer::authorize) makes one; it is not `Clone`.
pub struct Permit<A: Act> {
    on: A::On,
    rule_line: usize,
    policy_version: String,
    action: PhantomData<A>,
}

impl<A: Act> Permit<A> {
    /// Only the authorizer calls this, after the policy allowed it.
    pub(super) fn new(on: A::On, rule_line: usize, policy_version: String) -> Self {
        Self { on, rule_line, policy_version, action: PhantomData }
    }

    /// What the permit covers.
    pub fn on(&self) -> &A::On {
        &self.on
    }

    /// The action permitted.
    pub fn action(&self) -> Action {
        A::ACTION
    }

    /// The `policy.csv` line that allowed it.
    pub fn rule_line(&self) -> usize {
        self.rule_line
    }

    /// The policy version that decided.
    pub fn policy_version(&self) -> &str {
        &self.policy_version
    }
}

impl<A: Act<On = SecretPath>> Permit<A> {
    /// The secret the permit covers.
    pub fn path(&self) -> &SecretPath {
        &self.on
    }
}

impl<A: Act> fmt::Debug for Permit<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("action", &A::ACTION)
            .field("on", &format_args!("{}", self.on))
            .field("rule_line", &self.rule_line)
            .field("policy_version", &self.policy_version)
            .finish()
    }
}

mod sealed {
    /// Keeps [`super::Act`] and [`super::Object`] to the types of this module.
    pub trait Sealed {}
}
