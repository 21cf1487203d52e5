use std::collections::BTreeMap;

use super::{env::field_index, *};
use crate::text_edits::{apply_edits, edit};
use proptest::{prelude::*, sample::Index, test_runner::TestCaseError};

const MINIMAL: &str = r#"
    [tls]
    cert = "server.pem"
    key = "server-key.pem"
    client_ca = "/etc/ca.pem"
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<ValidConfig, ConfigError> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::from_toml(text, Path::new("test.toml"), Path::new("/etc/sg"), env)
}

/// The etcd section of a configuration with `backend = "etcd"`.
fn etcd(c: &Config) -> &EtcdConfig {
    match &c.store {
        StoreConfig::Etcd(e) => e,
        other => panic!("not an etcd store: {other:?}"),
    }
}

#[test]
fn defaults_fill_everything_but_tls_and_paths_resolve_against_the_file() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.listen, "127.0.0.1:7443".parse().unwrap());
    assert_eq!(c.tls.cert, Path::new("/etc/sg/server.pem"));
    assert_eq!(c.tls.client_ca, Path::new("/etc/ca.pem"));
    assert_eq!(c.store, StoreConfig::Embedded { path: "/etc/sg/data/secretgate.redb".into() });
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
    assert_eq!(c.limits.max_value_bytes.get(), 1024);
    assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(c.tls.min_version, TlsVersion::Tls12);
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
    assert_eq!(etcd(&c).endpoints.len(), 2);
    assert_eq!(etcd(&c).ca, Path::new("/etc/sg/etcd/ca.pem"));
    assert_eq!(etcd(&c).key, Path::new("/etc/sg/etcd/client-key.pem"));
    assert_eq!(etcd(&c).prefix, "/secretgate/");
    assert_eq!(etcd(&c).timeout(), Duration::from_secs(5));
    assert!(!etcd(&c).password.is_set());
}

#[test]
fn etcd_endpoints_from_the_environment_are_comma_separated() {
    let env = [("SECRETGATE_STORE_ENDPOINTS", "https://a:2379, https://b:2379,")];
    let c = load(&format!("{MINIMAL}{ETCD}"), &env).unwrap();
    assert_eq!(etcd(&c).endpoints, ["https://a:2379", "https://b:2379"]);
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
    assert_eq!(etcd(&c).password.expose(), Some("hunter2-secret"));
    assert!(!format!("{c:?}").contains("hunter2"), "Debug shows the password");
    assert!(!toml::to_string(&*c).unwrap().contains("hunter2"), "serialized password");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd-password");
    std::fs::write(&file, "from-file\n").unwrap();
    let with_file = format!("{text}password_file = \"{}\"\n", file.display());
    let c = load(&with_file, &[]).unwrap();
    assert_eq!(etcd(&c).password.expose(), Some("from-file"));
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
    let readme = include_str!("../../README.md");
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
fn assert_outcome(got: Result<ValidConfig, ConfigError>) -> Result<(), TestCaseError> {
    match got {
        Ok(c) => {
            prop_assert!(c.clone().into_inner().check().is_ok());
            for p in c.clone().into_inner().paths_mut() {
                prop_assert!(p.as_os_str().is_empty() || p.is_absolute(), "{}", p.display());
            }
            // What it serializes to loads back to the same configuration.
            let text = toml::to_string(&*c).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = load(&text, &[]).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(back, c);
        }
        Err(ConfigError::Parse { path, message }) => {
            prop_assert_eq!(path, Path::new("test.toml"));
            prop_assert!(!message.is_empty());
        }
        Err(ConfigError::Invalid { field, reason }) => {
            let known: Vec<String> = fields().into_values().map(|f| f.join(".")).collect();
            prop_assert!(known.contains(&field), "unknown field {} ({})", field, reason);
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
    assert!(matches!(load(example(), &[]).unwrap().store, StoreConfig::Embedded { .. }));
    assert!(matches!(load(&example_etcd(), &[]).unwrap().store, StoreConfig::Etcd(_)));
    assert_outcome(load(example(), &[])).unwrap();
    assert_outcome(load(&example_etcd(), &[])).unwrap();
    assert_outcome(load(&example().replace("max_versions = 10", "max_versions = 0"), &[])).unwrap();
    assert!(
        assert_outcome(Err(ConfigError::Invalid {
            field: "limits.nope".into(),
            reason: "x".into()
        }))
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
