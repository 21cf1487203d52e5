//! `[watch]`: the limits of `Secrets.Watch` streams.

use serde::{Deserialize, Serialize};

use super::Ranged;

/// `[watch]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// Seconds between the messages a stream sends when nothing changed (each carries the
    /// revision to resume from), and at most between its checks of the caller's certificate
    /// and grants while it waits. Default 10; 1 to 3600.
    pub heartbeat_secs: Ranged<1, 3600>,
    /// Watch streams one principal may have open on this replica. Default 100; 1 to 100000.
    pub max_per_principal: Ranged<1, 100_000>,
    /// Changes a stream may fall behind (its caller reading too slowly) before it is ended
    /// with RESOURCE_EXHAUSTED and a revision to resume from. Default 1000; 1 to 1000000.
    pub max_lag_events: Ranged<1, 1_000_000>,
    /// Recent changes the gateway keeps for every watcher to share, and so how far back a
    /// stream can resume (the embedded store keeps as many in its file; on etcd a gateway
    /// starting up reads back up to this many revisions of etcd's history). Default 10000;
    /// 1 to 10000000.
    pub history_events: Ranged<1, 10_000_000>,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            heartbeat_secs: Ranged::of::<10>(),
            max_per_principal: Ranged::of::<100>(),
            max_lag_events: Ranged::of::<1000>(),
            history_events: Ranged::of::<{ crate::store::DEFAULT_HISTORY }>(),
        }
    }
}
