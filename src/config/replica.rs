//! `[replica]`: this gateway's entry in the tier's replica registry.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Ranged;

/// `[replica]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaConfig {
    /// This replica's name in `secretgate status`. Default: `<hostname>:<port>`.
    pub id: String,
    /// Seconds after which a replica that stopped renewing its record (dead, paused, cut
    /// off) drops out of the registry; it renews every third of it. Default 15; 2 to 300.
    pub lease_secs: Ranged<2, 300>,
    /// File where this replica keeps the highest version of each control object kept in the
    /// store it has enforced (policy, keyring, client trust), so that after a restart it
    /// refuses a store whose newest versions were deleted or rolled back. Used with a
    /// `"store"` source. Default `replica-state.json` (next to the config file); empty: off.
    pub state_file: PathBuf,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            lease_secs: Ranged::of::<15>(),
            state_file: PathBuf::from("replica-state.json"),
        }
    }
}
