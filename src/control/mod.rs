//! The gateway tier's control state kept in the store it guards: today the policy
//! (`authz.source = "store"`); the keyring and client trust are to follow the same way.
//!
//! Every stored version is sealed (see [`record`]) with a MAC under a key derived from the
//! KEK ([`Kek`]), which every replica holds locally and the store never sees; replicas
//! follow the store through its change feed and accept only authenticated versions higher
//! than the highest they accepted, so a raw write to etcd can neither forge a version nor
//! bring back an older genuine one.

mod kek;
pub mod policy;
pub mod record;

pub use kek::{KEK_LEN, Kek, KekError};
pub use policy::{ControlError, PolicyVersion, StoredPolicy};
