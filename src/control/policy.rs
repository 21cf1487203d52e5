//! The policy kept in the store (`authz.source = "store"`): each version holds a whole policy
//! directory ([`PolicyFiles`]); a replica puts in force the newest one that parses and passes
//! its own table tests (see [`super::stored`] for the rules every control object follows).

use crate::{
    authz::{Policy, PolicyFiles},
    registry::ReplicaRecord,
};

use super::{
    Kek,
    stored::{Kind, Stored, number},
};

/// The policy as a kind of control object.
#[derive(Debug)]
pub struct PolicyKind;

/// The stored policy as this replica follows it.
pub type StoredPolicy = Stored<PolicyKind>;

impl Kind for PolicyKind {
    const NAME: &'static str = "policy";
    type Value = Policy;
    type Content = PolicyFiles;

    type Context = ();

    fn build(_: &(), _kek: &Kek, version: u64, files: &PolicyFiles) -> Result<Policy, String> {
        files.check().map_err(|e| e.to_string())?;
        Policy::from_files(files, &format!("policy version {version}"))
            .map(|p| p.numbered(version))
            .map_err(|e| e.to_string())
    }

    fn reported(record: &ReplicaRecord) -> Option<u64> {
        number(&record.policy)
    }
}
