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
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Environment variables with the `SECRETGATE_` prefix that belong to the CLI, not to the
/// server configuration.
const CLIENT_VARS: &[&str] =
    &["ADDR", "CA", "CERT", "KEY", "CONFIG", "LOG", "OUTPUT", "KEYRING", "POLICIES"];

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
    pub min_version: String,
    /// Seconds a client has to complete the TLS handshake. Default 10.
    pub handshake_timeout_secs: u64,
    /// PEM file of certificate revocation lists (`X509 CRL` blocks), one from each client
    /// CA. Empty (default): no revocation checking. Reloaded when it changes.
    pub client_crl: PathBuf,
    /// Seconds between checks of `cert`, `key` and `client_crl` for changes. Default 10.
    pub reload_interval_secs: u64,
}

/// `[store]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Backend: `"embedded"` (default; one local redb file) or `"etcd"`.
    pub backend: String,
    /// File of the embedded store. Default `data/secretgate.redb`.
    pub path: PathBuf,
    /// etcd: client URLs of the members, `https://host:port`. Environment: comma-separated.
    pub endpoints: Vec<String>,
    /// etcd: PEM bundle of the CAs that sign the members' certificates. Required for etcd.
    pub ca: PathBuf,
    /// etcd: PEM client certificate the gateway presents to etcd (with `key`).
    pub cert: PathBuf,
    /// etcd: PEM private key for `cert`.
    pub key: PathBuf,
    /// etcd: every key the gateway writes starts with this. Default `/secretgate/`.
    pub prefix: String,
    /// etcd: milliseconds one store operation may take, retries included. Default 5000.
    pub timeout_ms: u64,
    /// etcd: user name for etcd authentication; empty (default) for none.
    pub username: String,
    /// etcd: file holding the password for `username` (or set `SECRETGATE_STORE_PASSWORD`).
    pub password_file: PathBuf,
    /// etcd: the password, from `password_file` or `SECRETGATE_STORE_PASSWORD`; never in the
    /// file itself, never serialized, redacted in `Debug`.
    #[serde(skip)]
    pub password: StorePassword,
}

/// `[crypto]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CryptoConfig {
    /// The keyring file (mode 0600; see `secretgate keys init`). Default `keyring.toml`.
    pub keyring: PathBuf,
    /// Seconds between checks of the keyring file for changes (also reloaded on SIGHUP).
    /// Default 2.
    pub reload_interval_secs: u64,
}

/// `[authz]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzConfig {
    /// Directory with `model.conf`, `policy.csv` and `tests/*.toml`. Default `policies`.
    pub policies: PathBuf,
    /// Seconds between checks of the policy files for changes (also reloaded on SIGHUP).
    /// Default 2.
    pub reload_interval_secs: u64,
}
/// The etcd password. Wiped from memory on drop; `Debug` shows only whether it is set.
#[derive(Clone, Default, PartialEq)]
pub struct StorePassword(Option<zeroize::Zeroizing<String>>);

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
    /// Write a signed checkpoint after this many records. Default 1000.
    pub checkpoint_every: u64,
    /// ... or after this many seconds with new records. Default 10.
    pub checkpoint_interval_secs: u64,
    /// Rotate the active file when it reaches this size. Default 104857600 (100 MiB).
    pub max_file_bytes: u64,
    /// Milliseconds a request waits for its record to be durable before it fails with
    /// UNAVAILABLE. Default 2000.
    pub timeout_ms: u64,
    /// Group commit window, in microseconds. While writes are in progress (intent recorded,
    /// outcome not yet), the writer holds a batch open up to this long for their outcomes, so
    /// one log fsync covers many store commits instead of adding one per commit. While only
    /// other requests are in progress, it holds a batch for about one fsync's time (at most
    /// this). A request alone is never held. Default 2000; 0 syncs as soon as a record comes.
    pub group_commit_us: u64,
    /// Begin a new log although the store keeps checkpoints of others (the old log was
    /// moved aside on purpose, or the signing key changes). Without it the gateway refuses
    /// to start when it finds no log but the store remembers one. The new genesis record
    /// names the logs left behind. Set it for one start, then remove it. Default `false`.
    pub new_log: bool,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest secret value in bytes. Default 65536 (64 KiB); at most 16 MiB.
    pub max_value_bytes: u64,
    /// Versions kept per secret. Default 10; 1 to 1000.
    pub max_versions: u32,
    /// Simultaneous client connections (including handshakes in progress). Default 1024.
    pub max_connections: u32,
    /// Seconds a request may take before the gateway cancels it (CANCELLED, "Timeout expired").
    /// Default 30.
    pub request_timeout_secs: u64,
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
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            tls: TlsConfig::default(),
            store: StoreConfig::default(),
            crypto: CryptoConfig::default(),
            authz: AuthzConfig::default(),
            audit: AuditConfig::default(),
            limits: Limits::default(),
        }
    }
}

impl Default for AuthzConfig {
    fn default() -> Self {
        Self { policies: PathBuf::from("policies"), reload_interval_secs: 2 }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::from("audit/audit.log"),
            signing_key: PathBuf::from("audit.key"),
            checkpoint_every: 1000,
            checkpoint_interval_secs: 10,
            max_file_bytes: 100 << 20,
            timeout_ms: 2000,
            group_commit_us: 2000,
            new_log: false,
        }
    }
}

impl Default for CryptoConfig {
    fn default() -> Self {
        Self { keyring: PathBuf::from("keyring.toml"), reload_interval_secs: 2 }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: PathBuf::new(),
            min_version: "1.3".into(),
            handshake_timeout_secs: 10,
            client_crl: PathBuf::new(),
            reload_interval_secs: 10,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: "embedded".into(),
            path: PathBuf::from("data/secretgate.redb"),
            endpoints: vec!["https://127.0.0.1:2379".into()],
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            prefix: "/secretgate/".into(),
            timeout_ms: 5000,
            username: String::new(),
            password_file: PathBuf::new(),
            password: StorePassword::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 64 * 1024,
            max_versions: crate::store::DEFAULT_MAX_VERSIONS,
            max_connections: 1024,
            request_timeout_secs: 30,
        }
    }
}

impl Config {
    /// Loads `path`, applies the process's `SECRETGATE_*` variables, resolves relative paths
    /// and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
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
    ) -> Result<Self, ConfigError> {
        let parsed: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })?;
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
        config.store.password = StorePassword::load(password, &config.store.password_file)?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `SECRETGATE_*` overrides. Each variable is matched against the fields of the
    /// configuration itself, so the list of variables can never drift from the fields.
    fn with_env(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(&self)
            .map_err(|e| ConfigError::Env { var: "SECRETGATE_*".into(), reason: e.to_string() })?;
        let fields = field_index(&table);
        let mut applied = Vec::new();
        for (var, value) in env {
            let Some(name) = var.strip_prefix("SECRETGATE_") else { continue };
            if CLIENT_VARS.contains(&name) {
                continue;
            }
            let Some(field) = fields.get(name) else {
                tracing::warn!(variable = %var, "ignoring unknown SECRETGATE_ variable");
                continue;
            };
            let slot = field_slot(&mut table, field);
            let typed = typed_like(slot, &value);
            *slot = typed.map_err(|reason| ConfigError::Env { var: var.clone(), reason })?;
            applied.push((var, field.clone(), slot.clone()));
        }
        if applied.is_empty() {
            return Ok(self);
        }
        table.try_into().map_err(|e: toml::de::Error| {
            // A value of the right type that the field refuses (an address, a range): name
            // the variable that is refused on its own.
            let original = toml::Table::try_from(&self).ok();
            let culprit = original.and_then(|original| {
                applied.iter().find_map(|(var, field, value)| {
                    let mut alone = original.clone();
                    *field_slot(&mut alone, field) = value.clone();
                    let refused = alone.try_into::<Self>().err()?;
                    Some((var.clone(), refused.message().to_owned()))
                })
            });
            let (var, reason) = culprit.unwrap_or_else(|| {
                let vars: Vec<&str> = applied.iter().map(|(v, ..)| v.as_str()).collect();
                (vars.join(", "), e.message().to_owned())
            });
            ConfigError::Env { var, reason }
        })
    }

    /// Every file or directory path of the configuration.
    fn paths_mut(&mut self) -> [&mut PathBuf; 13] {
        [
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.tls.client_ca,
            &mut self.tls.client_crl,
            &mut self.store.path,
            &mut self.crypto.keyring,
            &mut self.authz.policies,
            &mut self.audit.path,
            &mut self.audit.signing_key,
            &mut self.store.ca,
            &mut self.store.cert,
            &mut self.store.key,
            &mut self.store.password_file,
        ]
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in self.paths_mut() {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks ranges and required fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        for (field, p) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if p.as_os_str().is_empty() {
                return invalid(field, "is required (a PEM file path)");
            }
        }
        if !matches!(self.tls.min_version.as_str(), "1.2" | "1.3") {
            return invalid("tls.min_version", "must be \"1.3\" or \"1.2\"");
        }
        if !(1..=300).contains(&self.tls.handshake_timeout_secs) {
            return invalid("tls.handshake_timeout_secs", "must be between 1 and 300");
        }
        if !(1..=3600).contains(&self.tls.reload_interval_secs) {
            return invalid("tls.reload_interval_secs", "must be between 1 and 3600");
        }
        match self.store.backend.as_str() {
            "embedded" if self.store.path.as_os_str().is_empty() => {
                return invalid("store.path", "is required for the embedded store");
            }
            "embedded" => {}
            "etcd" => self.store.validate_etcd(self.limits.request_timeout())?,
            _ => return invalid("store.backend", "must be \"embedded\" or \"etcd\""),
        }
        if self.crypto.keyring.as_os_str().is_empty() {
            return invalid("crypto.keyring", "is required (the keyring file path)");
        }
        if !(1..=3600).contains(&self.crypto.reload_interval_secs) {
            return invalid("crypto.reload_interval_secs", "must be between 1 and 3600");
        }
        if self.authz.policies.as_os_str().is_empty() {
            return invalid("authz.policies", "is required (the policy directory)");
        }
        if !(1..=3600).contains(&self.authz.reload_interval_secs) {
            return invalid("authz.reload_interval_secs", "must be between 1 and 3600");
        }
        if self.audit.enabled {
            self.audit.validate()?;
        }
        if !(1..=MAX_VALUE_LIMIT).contains(&self.limits.max_value_bytes) {
            return invalid("limits.max_value_bytes", "must be between 1 and 16777216");
        }
        if !(1..=1000).contains(&self.limits.max_versions) {
            return invalid("limits.max_versions", "must be between 1 and 1000");
        }
        if self.limits.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if !(1..=3600).contains(&self.limits.request_timeout_secs) {
            return invalid("limits.request_timeout_secs", "must be between 1 and 3600");
        }
        Ok(())
    }
}

impl TlsConfig {
    /// The handshake timeout as a `Duration`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    /// How often `cert`, `key` and `client_crl` are checked for changes.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval_secs)
    }
}

impl AuditConfig {
    /// The checkpoint interval as a `Duration`.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_interval_secs)
    }

    /// How long a request waits for its record.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The group commit window as a `Duration`.
    pub fn group_commit(&self) -> Duration {
        Duration::from_micros(self.group_commit_us)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        if self.path.as_os_str().is_empty() || self.path.file_name().is_none() {
            return invalid("audit.path", "is required (the audit log file)");
        }
        if self.signing_key.as_os_str().is_empty() {
            return invalid("audit.signing_key", "is required (see `secretgate audit keygen`)");
        }
        if !(1..=1_000_000).contains(&self.checkpoint_every) {
            return invalid("audit.checkpoint_every", "must be between 1 and 1000000");
        }
        if !(1..=3600).contains(&self.checkpoint_interval_secs) {
            return invalid("audit.checkpoint_interval_secs", "must be between 1 and 3600");
        }
        if self.max_file_bytes < 64 * 1024 {
            return invalid("audit.max_file_bytes", "must be at least 65536");
        }
        if !(10..=60_000).contains(&self.timeout_ms) {
            return invalid("audit.timeout_ms", "must be between 10 and 60000");
        }
        if self.group_commit_us > 100_000 || self.group_commit_us >= self.timeout_ms * 1000 / 2 {
            return invalid(
                "audit.group_commit_us",
                "must be at most 100000 and less than half of audit.timeout_ms",
            );
        }
        Ok(())
    }
}

impl AuthzConfig {
    /// The reload interval as a `Duration`.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval_secs)
    }
}

impl CryptoConfig {
    /// The reload interval as a `Duration`.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval_secs)
    }
}

impl StoreConfig {
    /// The etcd store timeout as a `Duration`.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Where the store is, for the log: the file, or the etcd endpoints and prefix.
    pub fn describe(&self) -> String {
        match self.backend.as_str() {
            "etcd" => format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix),
            _ => self.path.display().to_string(),
        }
    }

    fn validate_etcd(&self, request_timeout: Duration) -> Result<(), ConfigError> {
        let invalid =
            |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        if self.endpoints.is_empty() {
            return invalid("store.endpoints", "needs at least one etcd client URL");
        }
        for e in &self.endpoints {
            let host = e.strip_prefix("https://").unwrap_or_default();
            if host.is_empty() || host.contains('/') || !host.contains(':') {
                return Err(ConfigError::Invalid {
                    field: "store.endpoints",
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
        if !(100..=60_000).contains(&self.timeout_ms) {
            return invalid("store.timeout_ms", "must be between 100 and 60000");
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
    fn load(
        from_env: Option<zeroize::Zeroizing<String>>,
        file: &Path,
    ) -> Result<Self, ConfigError> {
        let invalid =
            |reason: String| ConfigError::Invalid { field: "store.password_file", reason };
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

impl Limits {
    /// The request timeout as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// Maps `FIELD` / `SECTION_FIELD` (upper case) to the dotted key path of every scalar field.
fn field_index(table: &toml::Table) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(section) => {
                for (f, _) in section {
                    out.insert(format!("{k}_{f}").to_uppercase(), vec![k.clone(), f.clone()]);
                }
            }
            _ => {
                out.insert(k.to_uppercase(), vec![k.clone()]);
            }
        }
    }
    out
}

fn field_slot<'t>(table: &'t mut toml::Table, path: &[String]) -> &'t mut toml::Value {
    let (last, sections) = path.split_last().expect("field paths are never empty");
    let mut t = table;
    for s in sections {
        t = t
            .get_mut(s)
            .and_then(toml::Value::as_table_mut)
            .expect("field_index only returns paths into existing sections");
    }
    t.get_mut(last).expect("field_index only returns existing fields")
}

fn typed_like(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    match current {
        toml::Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        toml::Value::Boolean(_) => raw
            .trim()
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| format!("expected true or false, got {raw:?}")),
        toml::Value::Array(_) => Ok(toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        )),
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}

/// The 1-based line of a TOML parse error in `text` (1 when toml gives no position). Counts
/// newlines in the bytes before the error, so an error at the start of a line names that
/// line, and a position inside a multi-byte character cannot panic.
pub(crate) fn toml_error_line(text: &str, error: &toml::de::Error) -> usize {
    let at = error.span().map_or(0, |s| s.start.min(text.len()));
    text.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{apply_edits, edit};
    use proptest::{prelude::*, sample::Index, test_runner::TestCaseError};

    const MINIMAL: &str = r#"
        [tls]
        cert = "server.pem"
        key = "server-key.pem"
        client_ca = "/etc/ca.pem"
    "#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml(text, Path::new("test.toml"), Path::new("/etc/sg"), env)
    }

    #[test]
    fn defaults_fill_everything_but_tls_and_paths_resolve_against_the_file() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7443".parse().unwrap());
        assert_eq!(c.tls.cert, Path::new("/etc/sg/server.pem"));
        assert_eq!(c.tls.client_ca, Path::new("/etc/ca.pem"));
        assert_eq!(c.store.path, Path::new("/etc/sg/data/secretgate.redb"));
        assert_eq!(c.crypto.keyring, Path::new("/etc/sg/keyring.toml"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.tls.handshake_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn env_overrides_fields_by_section_and_name() {
        let c = load(
            MINIMAL,
            &[
                ("SECRETGATE_LIMITS_MAX_VALUE_BYTES", "1024"),
                ("SECRETGATE_LISTEN", "0.0.0.0:9000"),
                ("SECRETGATE_TLS_MIN_VERSION", "1.2"),
                ("SECRETGATE_CERT", "client.pem"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.max_value_bytes, 1024);
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.tls.min_version, "1.2");
    }

    #[test]
    fn env_value_of_wrong_type_names_the_variable() {
        let err = load(MINIMAL, &[("SECRETGATE_LIMITS_MAX_VERSIONS", "ten")]).unwrap_err();
        assert!(err.to_string().contains("SECRETGATE_LIMITS_MAX_VERSIONS"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (format!("{MINIMAL}\n[limits]\nmax_value_bytes = 0\n"), "limits.max_value_bytes"),
            (format!("{MINIMAL}\n[limits]\nmax_versions = 0\n"), "limits.max_versions"),
            (format!("{MINIMAL}min_version = \"1.1\"\n"), "tls.min_version"),
            (format!("{MINIMAL}\n[store]\nbackend = \"s3\"\n"), "store.backend"),
            (format!("{MINIMAL}\n[store]\npath = \"\"\n"), "store.path"),
            ("[tls]\ncert = \"a\"\n".to_owned(), "tls.key"),
            (format!("{MINIMAL}\n[audit]\ngroup_commit_us = 200000\n"), "audit.group_commit_us"),
            (
                format!("{MINIMAL}\n[audit]\ntimeout_ms = 10\ngroup_commit_us = 5000\n"),
                "audit.group_commit_us",
            ),
        ];
        for (text, field) in cases {
            let err = load(&text, &[]).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    const ETCD: &str = r#"
        [store]
        backend = "etcd"
        endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        ca = "etcd/ca.pem"
        cert = "etcd/client.pem"
        key = "etcd/client-key.pem"
    "#;

    #[test]
    fn etcd_store_defaults_and_relative_paths() {
        let c = load(&format!("{MINIMAL}{ETCD}"), &[]).unwrap();
        assert_eq!(c.store.endpoints.len(), 2);
        assert_eq!(c.store.ca, Path::new("/etc/sg/etcd/ca.pem"));
        assert_eq!(c.store.key, Path::new("/etc/sg/etcd/client-key.pem"));
        assert_eq!(c.store.prefix, "/secretgate/");
        assert_eq!(c.store.timeout(), Duration::from_secs(5));
        assert!(!c.store.password.is_set());
    }

    #[test]
    fn etcd_endpoints_from_the_environment_are_comma_separated() {
        let env = [("SECRETGATE_STORE_ENDPOINTS", "https://a:2379, https://b:2379,")];
        let c = load(&format!("{MINIMAL}{ETCD}"), &env).unwrap();
        assert_eq!(c.store.endpoints, ["https://a:2379", "https://b:2379"]);
    }

    #[test]
    fn etcd_errors_name_the_field() {
        let etcd = format!("{MINIMAL}{ETCD}");
        let cases = [
            (etcd.replace("https://10.0.0.1:2379", "http://10.0.0.1:2379"), "store.endpoints"),
            (etcd.replace("ca = \"etcd/ca.pem\"", ""), "store.ca"),
            (etcd.replace("key = \"etcd/client-key.pem\"", ""), "store.key"),
            (format!("{etcd}prefix = \"secretgate\"\n"), "store.prefix"),
            (format!("{etcd}timeout_ms = 30000\n"), "store.timeout_ms"),
            (format!("{etcd}username = \"gw\"\n"), "store.password_file"),
        ];
        for (text, field) in cases {
            let err = load(&text, &[]).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn etcd_password_comes_from_env_or_file_and_never_shows() {
        let text = format!("{MINIMAL}{ETCD}username = \"gw\"\n");
        let c = load(&text, &[(STORE_PASSWORD_VAR, "hunter2-secret")]).unwrap();
        assert_eq!(c.store.password.expose(), Some("hunter2-secret"));
        assert!(!format!("{c:?}").contains("hunter2"), "Debug shows the password");
        assert!(!toml::to_string(&c).unwrap().contains("hunter2"), "serialized password");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etcd-password");
        std::fs::write(&file, "from-file\n").unwrap();
        let with_file = format!("{text}password_file = \"{}\"\n", file.display());
        let c = load(&with_file, &[]).unwrap();
        assert_eq!(c.store.password.expose(), Some("from-file"));
        let err = load(&with_file, &[(STORE_PASSWORD_VAR, "x")]).unwrap_err().to_string();
        assert!(err.contains("store.password_file"), "{err}");
        let missing = format!("{text}password_file = \"/nonexistent/pw\"\n");
        let err = load(&missing, &[]).unwrap_err().to_string();
        assert!(err.contains("store.password_file"), "{err}");
    }

    #[test]
    fn unknown_and_mistyped_fields_are_refused() {
        let err = load(&format!("{MINIMAL}\n[limits]\nmax_value_byte = 5\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("max_value_byte"), "{err}");
        let err = load(&format!("{MINIMAL}\n[limits]\nmax_versions = \"x\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("max_versions"), "{err}");
    }

    /// The README's example configuration (the `toml` block after "Here is a complete
    /// example"), every field written out with its default.
    fn example() -> &'static str {
        let readme = include_str!("../README.md");
        let from = readme.find("Here is a complete example").expect("the README's example");
        let block = &readme[from..];
        let start = block.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let len = block[start..].find("```").expect("the end of the block");
        &block[start..start + len]
    }

    /// The example with its etcd store lines uncommented instead of the embedded store.
    fn example_etcd() -> String {
        let mut in_store = false;
        let lines = example().lines().map(|line| {
            if line.starts_with('[') {
                in_store = line == "[store]";
            }
            match line.strip_prefix("# ") {
                Some(field) if in_store => field.to_owned(),
                _ if in_store && line.starts_with("backend") => "backend = \"etcd\"".to_owned(),
                _ => line.to_owned(),
            }
        });
        lines.collect::<Vec<_>>().join("\n")
    }

    /// `SECTION_FIELD` -> `section.field` for every field of the configuration.
    fn fields() -> BTreeMap<String, Vec<String>> {
        field_index(&toml::Table::try_from(Config::default()).unwrap())
    }

    /// What every loaded configuration must satisfy, and what every refusal must say.
    fn assert_outcome(got: Result<Config, ConfigError>) -> Result<(), TestCaseError> {
        match got {
            Ok(c) => {
                prop_assert!(c.validate().is_ok());
                for p in c.clone().paths_mut() {
                    prop_assert!(p.as_os_str().is_empty() || p.is_absolute(), "{}", p.display());
                }
                // What it serializes to loads back to the same configuration.
                let text = toml::to_string(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let back =
                    load(&text, &[]).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
                prop_assert_eq!(back, c);
            }
            Err(ConfigError::Parse { path, message }) => {
                prop_assert_eq!(path, Path::new("test.toml"));
                prop_assert!(!message.is_empty());
            }
            Err(ConfigError::Invalid { field, reason }) => {
                let known: Vec<String> = fields().into_values().map(|f| f.join(".")).collect();
                prop_assert!(
                    known.iter().any(|k| k == field),
                    "unknown field {} ({})",
                    field,
                    reason
                );
            }
            Err(ConfigError::Env { var, reason }) => {
                prop_assert!(var.starts_with("SECRETGATE_"), "{}: {}", var, reason);
            }
            Err(e @ ConfigError::Read { .. }) => prop_assert!(false, "nothing is read: {}", e),
        }
        Ok(())
    }

    #[test]
    fn the_examples_load_and_pass_the_outcome_checks() {
        assert_eq!(load(example(), &[]).unwrap().store.backend, "embedded");
        assert_eq!(load(&example_etcd(), &[]).unwrap().store.backend, "etcd");
        assert_outcome(load(example(), &[])).unwrap();
        assert_outcome(load(&example_etcd(), &[])).unwrap();
        assert_outcome(load(&example().replace("max_versions = 10", "max_versions = 0"), &[]))
            .unwrap();
        assert!(
            assert_outcome(Err(ConfigError::Invalid { field: "limits.nope", reason: "x".into() }))
                .is_err()
        );
    }

    #[test]
    fn env_values_out_of_a_fields_range_name_the_variable() {
        for (var, value) in [
            ("SECRETGATE_LISTEN", "not-an-address"),
            ("SECRETGATE_LIMITS_MAX_VERSIONS", "-1"),
            ("SECRETGATE_LIMITS_MAX_CONNECTIONS", "4294967296"),
        ] {
            let err = load(MINIMAL, &[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn from_toml_never_panics_on_arbitrary_text(
            text in prop_oneof![
                any::<String>(),
                "(\\[[a-z]{0,6}\\]\n)?([a-z_]{0,12} = (\"[a-z/.:0-9]{0,12}\"|[0-9]{1,6}|true|\\[\\])\n){0,4}",
                // The required fields, then a section and fields of the configuration.
                "(\\[(tls|store|crypto|audit|limits)\\]\n)?((min_version|backend|path|enabled|timeout_ms|max_versions|prefix|endpoints) = (\"[a-z/.:0-9]{0,12}\"|[0-9]{1,6}|true|\\[\\])\n){0,3}"
                    .prop_map(|t| format!("{MINIMAL}{t}")),
            ],
        ) {
            assert_outcome(load(&text, &[]))?;
        }

        #[test]
        fn edited_example_configs_are_refused_or_valid(
            etcd in any::<bool>(),
            edits in proptest::collection::vec(edit(), 1..4),
        ) {
            let base = if etcd { example_etcd() } else { example().to_owned() };
            assert_outcome(load(&apply_edits(&base, &edits), &[]))?;
        }

        #[test]
        fn any_environment_override_is_applied_or_refused_naming_the_variable(
            etcd in any::<bool>(),
            field in any::<Index>(),
            value in prop_oneof![
                any::<String>(),
                "-?[0-9]{1,20}",
                "(true|false|1\\.2|1\\.3|etcd|embedded)",
                "https://[a-z]{1,5}:[0-9]{1,5}(,.{0,8})?",
            ],
        ) {
            let base = if etcd { example_etcd() } else { example().to_owned() };
            let names: Vec<String> = fields().into_keys().collect();
            let var = format!("SECRETGATE_{}", names[field.index(names.len())]);
            match load(&base, &[(&var, &value)]) {
                Err(ConfigError::Env { var: named, reason }) => {
                    prop_assert!(named == var, "{} as {}: {}", var, named, reason);
                    prop_assert!(!reason.is_empty());
                }
                other => assert_outcome(other)?,
            }
        }
    }
}
