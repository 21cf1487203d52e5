//! `[metrics]`: the Prometheus endpoint, on its own listener.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the metrics listener (`GET /metrics`). Default `127.0.0.1:9443`; empty
    /// turns the endpoint off. It has no client authentication: no metric names a principal
    /// or a secret path.
    pub listen: String,
    /// Serve the endpoint over TLS with the gateway's own certificate (`tls.cert`), no client
    /// certificate asked. Default `false` (plain HTTP).
    pub tls: bool,
    /// Allow plain HTTP on an address other than loopback. Default `false`: such an address
    /// needs `tls = true`, so counts and expiry times do not cross a network in the clear by
    /// accident.
    pub allow_plaintext: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9443".into(), tls: false, allow_plaintext: false }
    }
}

impl MetricsConfig {
    /// The address to serve on, or `None` when the endpoint is off.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |reason: String| Err(ConfigError::Invalid { field: "metrics.listen".into(), reason });
        if self.listen.is_empty() {
            return Ok(());
        }
        let Ok(addr) = self.listen.parse::<SocketAddr>() else {
            return invalid(format!(
                "{:?} is not an address and port (e.g. \"127.0.0.1:9443\"; empty turns the endpoint off)",
                self.listen
            ));
        };
        if !addr.ip().is_loopback() && !self.tls && !self.allow_plaintext {
            return invalid(format!(
                "{addr} is not a loopback address: set metrics.tls = true (or, knowingly, \
                 metrics.allow_plaintext = true)"
            ));
        }
        Ok(())
    }
}
