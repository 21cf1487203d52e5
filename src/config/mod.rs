//! Typed configuration: `secretgate.toml`, overridden by `SECRETGATE_*` environment variables,
//! validated once at start-up.
//!
//! Every field has a default (see [`Config::default`] and the README's configuration table)
//! except the three TLS files, which have none on purpose. An environment variable
//! `SECRETGATE_<SECTION>_<FIELD>` (upper case) overrides `<section>.<field>`; a top-level
//! field is `SECRETGATE_<FIELD>`. Relative file paths are resolved against the directory of
//! the config file. Unknown fields are refused, so a typo cannot silently leave a default in
//! force. Every error names the field (or variable) at fault.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The environment variable that may hold the etcd password (instead of `store.password_file`).
pub const STORE_PASSWORD_VAR: &str = "SECRETGATE_STORE_PASSWORD";

/// Largest `limits.max_value_bytes` accepted (16 MiB).
pub const MAX_VALUE_LIMIT: u64 = 16 << 20;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC listener binds. Default `127.0.0.1:7443`.
    pub listen: SocketAddr,
    /// Load balancers (addresses or networks) whose connections start with a PROXY
    /// protocol v2 header naming the client; only these may send one, and they must.
    /// Default none.
    pub proxy_protocol_from: Vec<IpNet>,
    /// The gateway's TLS identity and the CA that signs client certificates.
    pub tls: TlsConfig,
    /// Where secrets are kept.
    pub store: StoreConfig,
    /// The keyring that seals secret values.
    pub crypto: CryptoConfig,
    /// The casbin policies that authorize requests.
    pub authz: AuthzConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// Sizes, counts and timeouts.
    pub limits: Limits,
    /// The gateway's own log.
    pub log: LogConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `Secrets.Watch` streams.
    pub watch: WatchConfig,
    /// This gateway's entry in the tier's replica registry.
    pub replica: ReplicaConfig,
}

/// A configuration that passed every check: made only by [`Config::load`],
/// [`Config::from_toml`] and [`Config::check`], and the only kind the gateway starts from.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConfig(Config);

impl ValidConfig {
    /// The configuration, to change it (and [`Config::check`] it again).
    pub fn into_inner(self) -> Config {
        self.0
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.0
    }
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain the gateway presents (leaf first). Required.
    pub cert: PathBuf,
    /// PEM private key for `cert`. Required.
    pub key: PathBuf,
    /// PEM bundle of CAs whose client certificates are accepted. Required.
    pub client_ca: PathBuf,
    /// Lowest TLS version offered: `"1.3"` (default) or `"1.2"`.
    pub min_version: TlsVersion,
    /// Seconds a client has to complete the TLS handshake. Default 10; 1 to 300.
    pub handshake_timeout_secs: Ranged<1, 300>,
    /// Seconds a new connection has to send its first byte (the ClientHello). Default 3; 1
    /// to 60; a longer value than `handshake_timeout_secs` is that.
    pub client_hello_timeout_secs: Ranged<1, 60>,
    /// PEM file of certificate revocation lists (`X509 CRL` blocks), one from each client
    /// CA. Empty (default): no revocation checking. Reloaded when it changes.
    pub client_crl: PathBuf,
    /// Seconds between checks of `cert`, `key` and `client_crl` for changes. Default 10; 1
    /// to 3600.
    pub reload_interval_secs: Ranged<1, 3600>,
    /// `"files"` (default): `client_ca` and `client_crl`, reloaded when they change.
    /// `"store"`: the client trust kept in the store (`secretgate trust push`), the same for
    /// every replica; the files seed it once. Needs `crypto.kek`.
    pub client_trust_source: Source,
}

/// The lowest TLS version the gateway offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TlsVersion {
    /// `"1.2"`: TLS 1.2 and 1.3.
    Tls12,
    /// `"1.3"` (default): TLS 1.3 only.
    Tls13,
}

/// `[crypto]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CryptoConfig {
    /// The keyring file (mode 0600; see `secretgate keys init`). Default `keyring.toml`.
    pub keyring: PathBuf,
    /// Seconds between checks of the keyring file for changes (also reloaded on SIGHUP).
    /// Default 2; 1 to 3600.
    pub reload_interval_secs: Ranged<1, 3600>,
    /// The key-encryption key (32 bytes, mode 0600; see `secretgate kek init`), which
    /// authenticates the control state kept in the store. Required by `authz.source =
    /// "store"` and `crypto.source = "store"`; every replica of a tier holds the same one.
    /// Default: none.
    pub kek: PathBuf,
    /// During a KEK rotation: the KEK before `kek`, still accepted for reading the control
    /// state it sealed until `secretgate kek-reseal` has sealed it again under `kek`.
    /// Default: none.
    pub previous_kek: PathBuf,
    /// `"files"` (default): the keyring file `crypto.keyring`, reloaded when it changes.
    /// `"store"`: the keyring kept in the store, encrypted under the KEK, the same for every
    /// replica, changed with `secretgate keys … --store`; `crypto.keyring` seeds it once.
    pub source: Source,
}

/// `[audit]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Record every request. Default `true`. `false` is for benchmarks only: the gateway
    /// then logs a warning at start and records nothing.
    pub enabled: bool,
    /// The active log file; rotated files are `<path>.<first seq>`. Default `audit/audit.log`.
    pub path: PathBuf,
    /// The Ed25519 checkpoint signing key (mode 0600; `secretgate audit keygen`).
    /// Default `audit.key`.
    pub signing_key: PathBuf,
    /// Write a signed checkpoint after this many records. Default 1000; 1 to 1000000.
    pub checkpoint_every: Ranged<1, 1_000_000>,
    /// ... or after this many seconds with new records. Default 10; 1 to 3600.
    pub checkpoint_interval_secs: Ranged<1, 3600>,
    /// Rotate the active file when it reaches this size. Default 104857600 (100 MiB); at
    /// least 65536.
    pub max_file_bytes: Ranged<65536, { u64::MAX }>,
    /// Milliseconds a request waits for its record to be durable before it fails with
    /// UNAVAILABLE. Default 2000; 10 to 60000.
    pub timeout_ms: Ranged<10, 60_000>,
    /// Group commit window, in microseconds. While writes are in progress (intent recorded,
    /// outcome not yet), the writer holds a batch open up to this long for their outcomes, so
    /// one log fsync covers many store commits instead of adding one per commit. While only
    /// other requests are in progress, it holds a batch for about one fsync's time (at most
    /// this). A request alone is never held. Default 2000; 0 syncs as soon as a record comes;
    /// at most 100000 and less than half of `timeout_ms`.
    pub group_commit_us: Ranged<0, 100_000>,
    /// Begin a new log although the store keeps checkpoints of others (the old log was
    /// moved aside on purpose, or the signing key changes). Without it the gateway refuses
    /// to start when it finds no log but the store remembers one. The new genesis record
    /// names the logs left behind. Only the one-shot flag `secretgate serve --new-audit-log`
    /// sets it: it is not a file or environment setting, so a deployment cannot leave the
    /// check off for good.
    #[serde(skip)]
    pub new_log: bool,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest secret value in bytes. Default 65536 (64 KiB); at most 16 MiB.
    pub max_value_bytes: Ranged<1, MAX_VALUE_LIMIT>,
    /// Versions kept per secret. Default 10; 1 to 1000.
    pub max_versions: Ranged<1, 1000>,
    /// Simultaneous client connections whose handshake completed. Default 1024.
    pub max_connections: Ranged<1, { u32::MAX as u64 }>,
    /// TLS handshakes in progress at most; past it the oldest pending one is dropped to make
    /// room for a new connection. Default 256; 1 to 100000.
    pub max_handshakes: Ranged<1, 100_000>,
    /// TLS handshakes in progress from one source address at most; past it that source's
    /// oldest pending one is dropped. 0 turns the cap off (every client behind one load
    /// balancer address). Default 32.
    pub max_handshakes_per_source: Ranged<0, 100_000>,
    /// HTTP/2 streams (requests) one connection may have open at once; the gateway
    /// advertises it in its SETTINGS, and refuses streams past it. Default 100; 1 to 10000.
    pub max_streams_per_connection: Ranged<1, 10_000>,
    /// Seconds a request may take before the gateway cancels it (CANCELLED, "Timeout expired").
    /// Default 30; 1 to 3600.
    pub request_timeout_secs: Ranged<1, 3600>,
    /// MiB of requests in flight (their bytes as received) for the whole gateway; a request
    /// past it is refused with RESOURCE_EXHAUSTED. Default 256; at least one largest request.
    pub max_request_memory_mib: Ranged<1, 1_048_576>,
    /// Seconds a connection may stay open with no request or stream in progress before the
    /// gateway closes it; 0 never. Default 300.
    pub idle_connection_timeout_secs: Ranged<0, 86_400>,
    /// Seconds after which a connection is asked to go away (HTTP/2 GOAWAY: clients finish
    /// their requests and reconnect, to any replica), so load spreads again after a replica
    /// restarts; 0 never. Default 0.
    pub max_connection_age_secs: Ranged<0, 604_800>,
}

/// A configuration that cannot be used, naming the field or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a field of the wrong type or name.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the field and line.
        message: String,
    },
    /// An environment override has a value of the wrong type.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        reason: String,
    },
    /// A field has a value outside its allowed range.
    #[error("config field {field}: {reason}")]
    Invalid {
        /// Dotted field name, e.g. `limits.max_value_bytes`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            proxy_protocol_from: Vec::new(),
            tls: TlsConfig::default(),
            store: StoreConfig::default(),
            crypto: CryptoConfig::default(),
            authz: AuthzConfig::default(),
            audit: AuditConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            watch: WatchConfig::default(),
            replica: ReplicaConfig::default(),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::from("audit/audit.log"),
            signing_key: PathBuf::from("audit.key"),
            checkpoint_every: Ranged::of::<1000>(),
            checkpoint_interval_secs: Ranged::of::<10>(),
            max_file_bytes: Ranged::of::<{ 100 << 20 }>(),
            timeout_ms: Ranged::of::<2000>(),
            group_commit_us: Ranged::of::<2000>(),
            new_log: false,
        }
    }
}

impl Default for CryptoConfig {
    fn default() -> Self {
        Self {
            keyring: PathBuf::from("keyring.toml"),
            reload_interval_secs: Ranged::of::<2>(),
            kek: PathBuf::new(),
            previous_kek: PathBuf::new(),
            source: Source::Files,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: PathBuf::new(),
            min_version: TlsVersion::Tls13,
            handshake_timeout_secs: Ranged::of::<10>(),
            client_hello_timeout_secs: Ranged::of::<3>(),
            client_crl: PathBuf::new(),
            reload_interval_secs: Ranged::of::<10>(),
            client_trust_source: Source::Files,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: Ranged::of::<{ 64 * 1024 }>(),
            max_versions: Ranged::of::<{ crate::store::DEFAULT_MAX_VERSIONS as u64 }>(),
            max_connections: Ranged::of::<1024>(),
            max_handshakes: Ranged::of::<256>(),
            max_handshakes_per_source: Ranged::of::<32>(),
            max_streams_per_connection: Ranged::of::<100>(),
            request_timeout_secs: Ranged::of::<30>(),
            max_request_memory_mib: Ranged::of::<256>(),
            idle_connection_timeout_secs: Ranged::of::<300>(),
            max_connection_age_secs: Ranged::of::<0>(),
        }
    }
}

impl Config {
    /// Loads `path`, applies the process's `SECRETGATE_*` variables, resolves relative paths
    /// and validates.
    pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, path, base, std::env::vars())
    }

    /// Like [`Config::load`] for text already read, with the environment given explicitly.
    pub fn from_toml(
        text: &str,
        origin: &Path,
        base_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ValidConfig, ConfigError> {
        let parsed: Config = toml::from_str(text).map_err(|e| parse_error(text, origin, &e))?;
        let mut password = None;
        let env = env.into_iter().filter_map(|(var, value)| {
            if var == STORE_PASSWORD_VAR {
                password = Some(zeroize::Zeroizing::new(value));
                return None;
            }
            Some((var, value))
        });
        let mut config = parsed.with_env(env)?;
        config.resolve_paths(base_dir);
        if let StoreConfig::Etcd(etcd) = &mut config.store {
            etcd.password = StorePassword::load(password, &etcd.password_file)?;
        }
        config.check()
    }

    /// Every file or directory path of the configuration.
    fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut paths = vec![
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.tls.client_ca,
            &mut self.tls.client_crl,
            &mut self.crypto.keyring,
            &mut self.crypto.kek,
            &mut self.crypto.previous_kek,
            &mut self.replica.state_file,
            &mut self.authz.policies,
            &mut self.audit.path,
            &mut self.audit.signing_key,
        ];
        match &mut self.store {
            StoreConfig::Embedded { path } => paths.push(path),
            StoreConfig::Etcd(e) => {
                paths.extend([&mut e.ca, &mut e.cert, &mut e.key, &mut e.password_file]);
            }
        }
        paths
    }

    /// Checks ranges and required fields: the only way to a [`ValidConfig`].
    pub fn check(self) -> Result<ValidConfig, ConfigError> {
        self.validate()?;
        Ok(ValidConfig(self))
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in self.paths_mut() {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks ranges and required fields (see [`Config::check`]).
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid { field: field.into(), reason: reason.into() })
        };
        for (field, p) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if p.as_os_str().is_empty() {
                return invalid(field, "is required (a PEM file path)");
            }
        }
        match &self.store {
            StoreConfig::Embedded { path } if path.as_os_str().is_empty() => {
                return invalid("store.path", "is required for the embedded store");
            }
            StoreConfig::Embedded { .. } => {}
            StoreConfig::Etcd(etcd) => etcd.validate(self.limits.request_timeout())?,
        }
        self.metrics.validate()?;
        if self.crypto.keyring.as_os_str().is_empty() {
            return invalid("crypto.keyring", "is required (the keyring file path)");
        }
        if self.authz.policies.as_os_str().is_empty() {
            return invalid("authz.policies", "is required (the policy directory)");
        }
        let stored = self.authz.source == Source::Store || self.crypto.source == Source::Store;
        if stored && self.crypto.kek.as_os_str().is_empty() {
            return invalid(
                "crypto.kek",
                "is required when authz.source or crypto.source is \"store\"",
            );
        }
        if self.audit.enabled {
            self.audit.validate()?;
        }
        if self.limits.max_request_bytes() > self.limits.max_request_memory() {
            return invalid(
                "limits.max_request_memory_mib",
                "must hold at least one largest request (limits.max_value_bytes and 16 KiB)",
            );
        }
        Ok(())
    }
}

impl TlsConfig {
    /// The handshake timeout as a `Duration`.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout_secs.secs()
    }

    /// How often `cert`, `key` and `client_crl` are checked for changes.
    pub fn reload_interval(&self) -> Duration {
        self.reload_interval_secs.secs()
    }
}

impl AuditConfig {
    /// The checkpoint interval as a `Duration`.
    pub fn checkpoint_interval(&self) -> Duration {
        self.checkpoint_interval_secs.secs()
    }

    /// How long a request waits for its record.
    pub fn timeout(&self) -> Duration {
        self.timeout_ms.millis()
    }

    /// The group commit window as a `Duration`.
    pub fn group_commit(&self) -> Duration {
        self.group_commit_us.micros()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid { field: field.into(), reason: reason.into() })
        };
        if self.path.as_os_str().is_empty() || self.path.file_name().is_none() {
            return invalid("audit.path", "is required (the audit log file)");
        }
        if self.signing_key.as_os_str().is_empty() {
            return invalid("audit.signing_key", "is required (see `secretgate audit keygen`)");
        }
        if self.group_commit_us.get() >= self.timeout_ms.get() * 1000 / 2 {
            return invalid(
                "audit.group_commit_us",
                "must be at most 100000 and less than half of audit.timeout_ms",
            );
        }
        Ok(())
    }
}

impl CryptoConfig {
    /// The reload interval as a `Duration`.
    pub fn reload_interval(&self) -> Duration {
        self.reload_interval_secs.secs()
    }
}

impl Limits {
    /// Bytes a `Secrets` request may carry beyond its value (path, framing).
    pub const REQUEST_OVERHEAD_BYTES: u64 = 16 * 1024;

    /// The request timeout as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout_secs.secs()
    }

    /// The largest `Secrets` request: the largest value and its overhead.
    pub fn max_request_bytes(&self) -> u64 {
        self.max_value_bytes.get() + Self::REQUEST_OVERHEAD_BYTES
    }

    /// The budget for the bytes of requests in flight.
    pub fn max_request_memory(&self) -> u64 {
        self.max_request_memory_mib.get() << 20
    }

    /// The maximum connection age, `None` for none.
    pub fn max_connection_age(&self) -> Option<Duration> {
        Some(self.max_connection_age_secs.secs()).filter(|d| !d.is_zero())
    }

    /// The idle-connection timeout, `None` for never.
    pub fn idle_connection_timeout(&self) -> Option<Duration> {
        Some(self.idle_connection_timeout_secs.secs()).filter(|d| !d.is_zero())
    }
}

impl TryFrom<String> for TlsVersion {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "1.2" => Ok(Self::Tls12),
            "1.3" => Ok(Self::Tls13),
            _ => Err("tls.min_version must be \"1.3\" or \"1.2\"".into()),
        }
    }
}

impl From<TlsVersion> for String {
    fn from(v: TlsVersion) -> Self {
        match v {
            TlsVersion::Tls12 => "1.2".into(),
            TlsVersion::Tls13 => "1.3".into(),
        }
    }
}

mod authz;
mod env;
mod log;
mod metrics;
mod net;
mod ranged;
mod replica;
mod store;
mod watch;

pub use authz::{AuthzConfig, Source};
pub use log::{LogConfig, LogFormat};
pub use metrics::MetricsConfig;
pub use net::IpNet;
pub use ranged::Ranged;

pub use replica::ReplicaConfig;
pub use store::{EtcdConfig, StoreConfig, StorePassword};
pub use watch::WatchConfig;
#[cfg(test)]
mod tests;

/// A file that toml refuses. A number out of its field's range is reported like every other
/// invalid field, by its dotted name (toml knows only the position).
fn parse_error(text: &str, origin: &Path, e: &toml::de::Error) -> ConfigError {
    let field = e.span().and_then(|span| ranged::field_at(text, span.start));
    match field {
        Some(field) if ranged::is_refusal(e.message()) => {
            ConfigError::Invalid { field, reason: e.message().to_owned() }
        }
        _ => ConfigError::Parse { path: origin.to_owned(), message: e.to_string() },
    }
}
