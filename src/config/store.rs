//! `[store]`: the embedded store or etcd, and the etcd password.
//!
//! The file keeps one flat `[store]` table with a `backend` key (so `SECRETGATE_STORE_*`
//! overrides reach every field whichever backend the file names); the program sees only the
//! variant in force ([`StoreConfig`]).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{ConfigError, Ranged, STORE_PASSWORD_VAR};

/// `[store]`: where secrets are kept. In the file, `backend` names the variant and the other
/// fields are those of the [`EtcdConfig`] or the embedded store's `path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoreFile", into = "StoreFile")]
pub enum StoreConfig {
    /// `backend = "embedded"` (default): one local redb file.
    Embedded {
        /// File of the embedded store. Default `data/secretgate.redb`.
        path: PathBuf,
    },
    /// `backend = "etcd"`: an etcd cluster.
    Etcd(EtcdConfig),
}

/// `[store]` with `backend = "etcd"`.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// Client URLs of the members, `https://host:port`. Environment: comma-separated.
    pub endpoints: Vec<String>,
    /// PEM bundle of the CAs that sign the members' certificates. Required.
    pub ca: PathBuf,
    /// PEM client certificate the gateway presents to etcd (with `key`).
    pub cert: PathBuf,
    /// PEM private key for `cert`.
    pub key: PathBuf,
    /// Every key the gateway writes starts with this. Default `/secretgate/`.
    pub prefix: String,
    /// Milliseconds one store operation may take, retries included. Default 5000; 100 to
    /// 60000, and less than `limits.request_timeout_secs`.
    pub timeout_ms: Ranged<100, 60_000>,
    /// User name for etcd authentication; empty (default) for none.
    pub username: String,
    /// File holding the password for `username` (or set `SECRETGATE_STORE_PASSWORD`).
    pub password_file: PathBuf,
    /// The password, from `password_file` or `SECRETGATE_STORE_PASSWORD`; never in the
    /// file itself, never serialized, redacted in `Debug`.
    pub password: StorePassword,
    /// Serve reads from memory, kept by a watch on the prefix and checked against etcd by a
    /// linearizable barrier (docs/etcd.md). Default true.
    pub cache: bool,
    /// MiB the cache may hold (sealed values and metadata, never plaintext); past it reads
    /// go to etcd directly until a restart. Default 256; 1 to 65536.
    pub cache_max_mib: Ranged<1, 65_536>,
}

/// The etcd password. Wiped from memory on drop; `Debug` shows only whether it is set.
#[derive(Clone, Default, PartialEq)]
pub struct StorePassword(Option<zeroize::Zeroizing<String>>);

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Embedded { path: PathBuf::from(DEFAULT_EMBEDDED_PATH) }
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            prefix: "/secretgate/".into(),
            timeout_ms: Ranged::of::<5000>(),
            username: String::new(),
            password_file: PathBuf::new(),
            password: StorePassword::default(),
            cache: true,
            cache_max_mib: Ranged::of::<256>(),
        }
    }
}

impl StoreConfig {
    /// What identifies the store's contents for `replica.state_file`: the etcd prefix, or
    /// the embedded file (not the members, which may be replaced).
    pub fn identity(&self) -> String {
        match self {
            Self::Etcd(e) => format!("etcd prefix {}", e.prefix),
            Self::Embedded { path } => format!("embedded {}", path.display()),
        }
    }

    /// Where the store is, for the log: the file, or the etcd endpoints and prefix.
    pub fn describe(&self) -> String {
        match self {
            Self::Etcd(e) => format!("etcd {} prefix {}", e.endpoints.join(","), e.prefix),
            Self::Embedded { path } => path.display().to_string(),
        }
    }
}

impl EtcdConfig {
    /// The store timeout as a `Duration`.
    pub fn timeout(&self) -> Duration {
        self.timeout_ms.millis()
    }

    pub(super) fn validate(&self, request_timeout: Duration) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid { field: field.into(), reason: reason.into() })
        };
        if self.endpoints.is_empty() {
            return invalid("store.endpoints", "needs at least one etcd client URL");
        }
        for e in &self.endpoints {
            let host = e.strip_prefix("https://").unwrap_or_default();
            if host.is_empty() || host.contains('/') || !host.contains(':') {
                return Err(ConfigError::Invalid {
                    field: "store.endpoints".into(),
                    reason: format!("{e:?} is not of the form https://host:port (TLS is required)"),
                });
            }
        }
        if self.ca.as_os_str().is_empty() {
            return invalid("store.ca", "is required for etcd (the CA of the etcd members)");
        }
        if self.cert.as_os_str().is_empty() != self.key.as_os_str().is_empty() {
            let field = if self.cert.as_os_str().is_empty() { "store.cert" } else { "store.key" };
            return invalid(field, "store.cert and store.key must be given together");
        }
        let p = &self.prefix;
        if !p.starts_with('/') || !p.ends_with('/') || !p.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid("store.prefix", "must start and end with '/' and be printable ASCII");
        }
        if self.timeout() >= request_timeout {
            return invalid("store.timeout_ms", "must be less than limits.request_timeout_secs");
        }
        match (self.username.is_empty(), self.password.is_set()) {
            (true, true) => invalid("store.username", "is required when a password is given"),
            (false, false) => invalid(
                "store.password_file",
                "a password (password_file or SECRETGATE_STORE_PASSWORD) is required with username",
            ),
            _ => Ok(()),
        }
    }
}

impl StorePassword {
    /// The password, if one is configured.
    pub fn expose(&self) -> Option<&str> {
        self.0.as_ref().map(|p| p.as_str())
    }

    /// Whether a password is configured.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// From the environment variable or the file (one of them, or neither).
    pub(super) fn load(
        from_env: Option<zeroize::Zeroizing<String>>,
        file: &Path,
    ) -> Result<Self, ConfigError> {
        let invalid =
            |reason: String| ConfigError::Invalid { field: "store.password_file".into(), reason };
        if file.as_os_str().is_empty() {
            return Ok(Self(from_env));
        }
        if from_env.is_some() {
            return Err(invalid(format!("set it or {STORE_PASSWORD_VAR}, not both")));
        }
        let text = std::fs::read_to_string(file)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| invalid(format!("cannot read {}: {e}", file.display())))?;
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(invalid(format!("{} is empty", file.display())));
        }
        Ok(Self(Some(zeroize::Zeroizing::new(password.to_owned()))))
    }
}

impl std::fmt::Debug for StorePassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() { "StorePassword(<redacted>)" } else { "StorePassword(None)" })
    }
}

/// The embedded store's file when `store.path` is not given.
const DEFAULT_EMBEDDED_PATH: &str = "data/secretgate.redb";

/// `[store]` as written in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct StoreFile {
    backend: String,
    path: PathBuf,
    endpoints: Vec<String>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    prefix: String,
    timeout_ms: Ranged<100, 60_000>,
    username: String,
    password_file: PathBuf,
    cache: bool,
    cache_max_mib: Ranged<1, 65_536>,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self { backend: "embedded".into(), ..Self::from_etcd(EtcdConfig::default()) }
    }
}

impl StoreFile {
    fn from_etcd(e: EtcdConfig) -> Self {
        Self {
            backend: "etcd".into(),
            path: PathBuf::from(DEFAULT_EMBEDDED_PATH),
            endpoints: e.endpoints,
            ca: e.ca,
            cert: e.cert,
            key: e.key,
            prefix: e.prefix,
            timeout_ms: e.timeout_ms,
            username: e.username,
            password_file: e.password_file,
            cache: e.cache,
            cache_max_mib: e.cache_max_mib,
        }
    }
}

impl TryFrom<StoreFile> for StoreConfig {
    type Error = String;

    fn try_from(f: StoreFile) -> Result<Self, String> {
        match f.backend.as_str() {
            "embedded" => Ok(Self::Embedded { path: f.path }),
            "etcd" => Ok(Self::Etcd(EtcdConfig {
                endpoints: f.endpoints,
                ca: f.ca,
                cert: f.cert,
                key: f.key,
                prefix: f.prefix,
                timeout_ms: f.timeout_ms,
                username: f.username,
                password_file: f.password_file,
                password: StorePassword::default(),
                cache: f.cache,
                cache_max_mib: f.cache_max_mib,
            })),
            _ => Err("store.backend must be \"embedded\" or \"etcd\"".into()),
        }
    }
}

impl From<StoreConfig> for StoreFile {
    fn from(s: StoreConfig) -> Self {
        match s {
            StoreConfig::Embedded { path } => Self { path, ..Self::default() },
            StoreConfig::Etcd(e) => Self::from_etcd(e),
        }
    }
}
