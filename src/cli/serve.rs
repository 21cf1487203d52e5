//! `secretgate serve` and `secretgate dev`.

use std::{net::SocketAddr, path::Path};

use anyhow::Context;

use super::dev::{ensure_dev_pki, write_file};
use crate::{Config, Gateway, config::ValidConfig};

/// Runs a gateway from a configuration file until SIGINT/SIGTERM.
pub(super) async fn serve(config_path: &Path, new_audit_log: bool) -> anyhow::Result<()> {
    let mut config = Config::load(config_path)?.into_inner();
    config.audit.new_log = new_audit_log;
    run(&config.check()?).await
}

/// Prepares the development PKI, config and store under `dir`, then serves.
pub(super) async fn dev(dir: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let (pki, created) = ensure_dev_pki(&dir.join("certs-dev"))?;
    if created {
        tracing::info!(dir = %pki.dir.display(), "wrote a new development PKI");
    }
    let state = dir.join(".secretgate-dev");
    super::dev::create_private_dir(&state)?;
    let config_path = state.join("secretgate.toml");
    if !config_path.exists() {
        // Use the checkout's policies/ when there is one; otherwise a copy of the example.
        let policies = if dir.join("policies/model.conf").is_file() {
            "../policies"
        } else {
            write_example_policies(&state.join("policies"))?;
            "policies"
        };
        let text = DEV_CONFIG.replace("@POLICIES@", policies);
        write_file(&config_path, text.as_bytes(), 0o600)?;
    }
    let mut config = Config::load(&config_path)?.into_inner();
    if !config.crypto.keyring.exists() {
        let ring = crate::crypto::Keyring::generate()?;
        ring.save(&config.crypto.keyring)?;
        tracing::info!(keyring = %config.crypto.keyring.display(), primary = %ring.primary().id, "wrote a new development keyring");
    }
    if !config.crypto.kek.as_os_str().is_empty() && !config.crypto.kek.exists() {
        crate::control::Kek::generate(&config.crypto.kek)?;
        tracing::info!(kek = %config.crypto.kek.display(), "wrote a new development KEK");
    }
    if config.audit.enabled && !config.audit.signing_key.exists() {
        crate::audit::SigningKey::generate()?.save(&config.audit.signing_key)?;
        tracing::info!(key = %config.audit.signing_key.display(), "wrote a new development audit signing key (and .pub)");
    }
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let metrics =
        config.metrics.addr().map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics"));
    eprintln!(
        "secretgate dev: DEVELOPMENT MODE (throw-away PKI in {}, store {}, audit log {}, \
         metrics {metrics})\n\
         try:  secretgate put /demo/hello world && secretgate get /demo/hello",
        pki.dir.display(),
        config.store.describe(),
        config.audit.path.display()
    );
    run(&config.check()?).await
}

async fn run(config: &ValidConfig) -> anyhow::Result<()> {
    crate::log::set_format(config.log.format);
    let gateway = Gateway::start(config).await?;
    gateway.run_until_signal().await.context("waiting for a shutdown signal")?;
    Ok(())
}

/// The configuration `secretgate dev` writes; paths are relative to `.secretgate-dev/`.
const DEV_CONFIG: &str = r#"# Written by `secretgate dev`. Development only: the PKI in certs-dev/ is throw-away.
listen = "127.0.0.1:7443"

[tls]
cert = "../certs-dev/server.pem"
key = "../certs-dev/server-key.pem"
client_ca = "../certs-dev/ca.pem"
client_crl = "../certs-dev/client-crl.pem"

[store]
backend = "embedded"
path = "store.redb"

[crypto]
keyring = "keyring.toml"
# Authenticates control state kept in the store (authz.source = "store").
kek = "kek"

[authz]
policies = "@POLICIES@"
# "files" (here: edit policies/, reloaded at once) or "store" (`secretgate policy push`).
source = "files"

[audit]
path = "audit/audit.log"
signing_key = "audit.key"
"#;

/// The example policies shipped in `policies/`, for a dev gateway outside a checkout.
const EXAMPLE_POLICIES: &[(&str, &str)] = &[
    ("model.conf", include_str!("../../policies/model.conf")),
    ("policy.csv", include_str!("../../policies/policy.csv")),
    ("tests/example.toml", include_str!("../../policies/tests/example.toml")),
];

fn write_example_policies(dir: &Path) -> anyhow::Result<()> {
    for (name, text) in EXAMPLE_POLICIES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        if !path.exists() {
            write_file(&path, text.as_bytes(), 0o644)?;
        }
    }
    Ok(())
}
