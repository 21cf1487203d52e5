//! `[replica]`: this gateway's entry in the tier's replica registry.

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
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self { id: String::new(), lease_secs: Ranged::of::<15>() }
    }
}
