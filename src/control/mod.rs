//! The gateway tier's control state kept in the store it guards: the policy
//! (`authz.source = "store"`), the keyring (`crypto.source = "store"`) and the client trust
//! (`tls.client_trust_source = "store"`).
//!
//! Every stored version is sealed (see [`record`]) with a MAC under a key derived from the
//! KEK ([`Kek`]), which every replica holds locally and the store never sees; replicas
//! follow the store through its change feed and accept only authenticated versions higher
//! than the highest they accepted ([`stored`]), so a raw write to etcd can neither forge a
//! version nor bring back an older genuine one. The keyring's data keys are also encrypted
//! under the KEK.

mod highwater;
mod kek;
pub mod keyring;
pub mod policy;
pub mod record;
pub mod stored;
pub mod trust;

use crate::{authz::PolicyError, store::StoreError};

pub use highwater::HighWater;
pub use kek::{KEK_LEN, Kek, KekError};
pub use keyring::StoredKeyring;
pub use policy::StoredPolicy;
pub use stored::{Pushed, Versioned};
pub use trust::StoredTrust;

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The pushed files are not a policy.
    #[error("the policy is refused: {0}")]
    Invalid(#[from] PolicyError),
    /// The new version's content cannot be used (does not parse, fails its tests, …).
    #[error("refused: {0}")]
    Refused(String),
    /// Another change stored a version first.
    #[error(
        "{kind} version {current} is the newest in the store, not {expected}: another push got \
         there first; look at the history and try again"
    )]
    Raced {
        /// `policy` or `keyring`.
        kind: &'static str,
        /// The version the change built on.
        expected: u64,
        /// The newest stored version.
        current: u64,
    },
    /// The sealed record would be too large for the store.
    #[error("the new version is {size} bytes stored; the limit is {limit} bytes")]
    TooLarge {
        /// The record's size.
        size: usize,
        /// [`stored::MAX_RECORD_BYTES`].
        limit: usize,
    },
    /// No such stored version (never stored, or not authenticated).
    #[error("version {version} cannot be used: {why}")]
    Version {
        /// The version asked for.
        version: u64,
        /// Why.
        why: String,
    },
    /// A keyring step that must wait for the tier, which did not get there in time.
    #[error("{0}")]
    TierNotReady(String),
    /// A keyring step that does not apply (unknown key, wrong state, records still sealed).
    #[error("{0}")]
    Keyring(String),
    /// The store's newest usable version is older than one this replica enforced before.
    #[error(
        "the store's newest usable {kind} version is {newest}, older than version {mark} this \
         replica enforced before (replica.state_file): the store was rolled back or its newest \
         versions deleted. Restore them; or, if the rollback is intended (a restored backup), \
         remove replica.state_file on every replica"
    )]
    RolledBack {
        /// `policy`, `keyring` or `trust`.
        kind: &'static str,
        /// The newest usable stored version.
        newest: u64,
        /// The highest version enforced before.
        mark: u64,
    },
    /// This gateway takes this control object from files.
    #[error("this gateway's {what} comes from its files ({setting} = \"files\"), not the store")]
    NotInStore {
        /// `policy` or `keyring`.
        what: &'static str,
        /// The setting.
        setting: &'static str,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
