//! The deployment files hold configurations the gateway accepts (the manifests themselves are
//! checked by `make deploy-check` with systemd-analyze and kubernetes-validate).

use std::path::Path;

use secretgate::{Config, config::StoreConfig};

/// The `secretgate.toml` embedded in the Kubernetes ConfigMap (a YAML block scalar).
fn configmap_toml() -> String {
    let yaml = include_str!("../deploy/kubernetes/configmap.yaml");
    let start = yaml.find("secretgate.toml: |\n").expect("the secretgate.toml key") + 19;
    yaml[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_configmap_is_a_valid_configuration() {
    let text = configmap_toml();
    let config = Config::from_toml(&text, Path::new("configmap.yaml"), Path::new("/"), [])
        .unwrap_or_else(|e| panic!("the ConfigMap's secretgate.toml is refused: {e}"));
    let StoreConfig::Etcd(etcd) = &config.store else { panic!("not the etcd backend") };
    assert_eq!(etcd.endpoints.len(), 3);
    assert!(config.audit.enabled, "production records everything");
    assert_eq!(config.limits.max_connection_age_secs.get(), 600);
    // Every file but the state directory's is on a read-only mount.
    assert!(config.audit.path.starts_with("/var/lib/secretgate"));
    assert!(config.audit.signing_key.starts_with("/var/lib/secretgate"));
}

#[test]
fn the_systemd_unit_serves_from_etc_and_writes_only_var_lib() {
    let unit = include_str!("../deploy/systemd/secretgate.service");
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/secretgate serve --config /etc/secretgate/secretgate.toml"
    ));
    let writable: Vec<&str> = unit.lines().filter(|l| l.starts_with("ReadWritePaths=")).collect();
    assert_eq!(writable, ["ReadWritePaths=/var/lib/secretgate"]);
    assert!(unit.contains("\nLimitCORE=0\n"), "no core dumps");
}

#[test]
fn the_binary_allocates_with_mimalloc_in_its_secure_mode() {
    // mimalloc names its build's secure level when asked to be verbose: 4 is guard pages
    // around its metadata, randomized addresses, encoded free lists and double-free checks.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_secretgate"))
        .arg("--version")
        .env("MIMALLOC_VERBOSE", "1")
        .output()
        .expect("the gateway binary runs");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("secure level: 4"), "mimalloc's own report: {stderr}");
}
