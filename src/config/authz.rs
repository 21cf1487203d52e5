//! `[authz]`: where the policy comes from.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::Ranged;

/// `[authz]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzConfig {
    /// Directory with `model.conf`, `policy.csv` and `tests/*.toml`. Default `policies`.
    /// With `source = "store"` it seeds the store's first policy version, once.
    pub policies: PathBuf,
    /// Seconds between checks of the policy files for changes (also reloaded on SIGHUP).
    /// Default 2; 1 to 3600.
    pub reload_interval_secs: Ranged<1, 3600>,
    /// `"files"` (default): this replica's policy directory, reloaded when it changes.
    /// `"store"`: the policy version kept in the store (`secretgate policy push`), the same
    /// for every replica of the tier; needs `crypto.kek`.
    pub source: Source,
}

/// Where a control object in force (the policy, the keyring) comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This replica's own files (`authz.policies`, `crypto.keyring`).
    #[default]
    Files,
    /// The store (sealed under the KEK, followed through the store's change feed).
    Store,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        Self {
            policies: PathBuf::from("policies"),
            reload_interval_secs: Ranged::of::<2>(),
            source: Source::Files,
        }
    }
}

impl AuthzConfig {
    /// The reload interval as a `Duration`.
    pub fn reload_interval(&self) -> Duration {
        self.reload_interval_secs.secs()
    }
}
