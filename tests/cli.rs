//! The CLI as a new user meets it: `secretgate dev` in one process, client commands in others.

use std::{
    io::Write,
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_secretgate");

/// A `secretgate dev` child process, killed when dropped.
struct DevGateway {
    child: Child,
    addr: String,
}

impl DevGateway {
    fn start(dir: &Path) -> Self {
        Self::start_env(dir, &[])
    }

    /// Like [`DevGateway::start`], with `SECRETGATE_*` overrides.
    fn start_env(dir: &Path, env: &[(&str, &str)]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .args(["dev", "--listen", &addr])
            // A checkpoint after every record, for `audit checkpoint`.
            .env("SECRETGATE_AUDIT_CHECKPOINT_EVERY", "1")
            // Not the default port: these gateways run in parallel.
            .env("SECRETGATE_METRICS_LISTEN", "")
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let gw = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&gw.addr).is_err() {
            assert!(Instant::now() < deadline, "secretgate dev did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    /// Runs a client command from `dir` (so the dev PKI defaults apply).
    fn cli(&self, dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env("SECRETGATE_ADDR", &self.addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            input.write_all(bytes).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }
}

impl Drop for DevGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "command failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn new_user_puts_and_gets_a_secret_with_the_dev_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let gw = DevGateway::start(dir.path());
    for f in ["ca.pem", "admin.pem", "admin-key.pem", "app.pem", "app-key.pem", "server-key.pem"] {
        assert!(dir.path().join("certs-dev").join(f).is_file(), "{f}");
    }
    assert!(dir.path().join(".secretgate-dev/secretgate.toml").is_file());
    let keyring = dir.path().join(".secretgate-dev/keyring.toml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777, 0o600);

    let put = gw.cli(dir.path(), &["put", "/demo/hello", "world"], None);
    assert_eq!(stdout(&put), "wrote /demo/hello version 1\n");
    let get = gw.cli(dir.path(), &["get", "/demo/hello"], None);
    assert_eq!(stdout(&get), "world", "exact bytes when stdout is not a terminal");

    let put = gw.cli(dir.path(), &["put", "/demo/piped", "-"], Some(b"from stdin\n"));
    stdout(&put);
    let json = gw.cli(dir.path(), &["get", "/demo/piped", "--output", "json"], None);
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(v["value"], "from stdin\n");
    assert_eq!(v["version"], 1);

    let ls = gw.cli(dir.path(), &["ls", "/demo"], None);
    assert_eq!(stdout(&ls), "/demo/hello\n/demo/piped\n");
    let rm = gw.cli(dir.path(), &["rm", "/demo/hello"], None);
    assert_eq!(stdout(&rm), "deleted /demo/hello version 1\n");
    let versions = gw.cli(dir.path(), &["versions", "/demo/hello", "-o", "json"], None);
    let v: serde_json::Value = serde_json::from_str(&stdout(&versions)).unwrap();
    assert!(v["versions"][0]["deleted_time"].is_string(), "{v}");

    let missing = gw.cli(dir.path(), &["get", "/demo/hello"], None);
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("NotFound") && err.contains("/demo/hello"), "{err}");

    let bad = gw.cli(dir.path(), &["put", "/demo/../etc", "x"], None);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("InvalidArgument"));

    // The auditor's view: the latest checkpoint the store keeps, as written in the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    let cp = loop {
        let out = gw.cli(dir.path(), &["audit", "checkpoint", "-o", "json"], None);
        if out.status.success() {
            break serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap();
        }
        assert!(Instant::now() < deadline, "{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    };
    let line = cp["checkpoint"].as_str().unwrap();
    let log_path = dir.path().join(".secretgate-dev/audit/audit.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().any(|l| l == line), "{line}");
    assert!(
        line.contains(r#""kind":"checkpoint""#) && line.contains(cp["log_id"].as_str().unwrap())
    );
    assert!(cp["failure"].is_null() && cp["records_written"].as_u64() > Some(0), "{cp}");
    assert!(cp["sync_micros"].as_u64() > Some(0), "{cp}");
    let human = gw.cli(dir.path(), &["audit", "checkpoint"], None);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().any(|l| l == stdout(&human).trim_end()), "{}", stdout(&human));

    // The second dev identity works too.
    let app = gw.cli(
        dir.path(),
        &["get", "/demo/piped", "--cert", "certs-dev/app.pem", "--key", "certs-dev/app-key.pem"],
        None,
    );
    assert_eq!(stdout(&app), "from stdin\n");
}

#[test]
fn client_errors_are_clear_when_the_pki_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["get", "/x", "--addr", "127.0.0.1:1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certs-dev/ca.pem") && err.contains("secretgate dev"), "{err}");
}

#[test]
fn plaintext_addresses_are_refused() {
    let out =
        Command::new(BIN).args(["get", "/x", "--addr", "http://127.0.0.1:7443"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plaintext"));
}

#[test]
fn serve_with_a_broken_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_versions = 0\n[tls]\ncert='a'\nkey='b'\nclient_ca='c'\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_versions"), "{err}");
    let missing_tls = dir.path().join("tls.toml");
    std::fs::write(&missing_tls, "[tls]\ncert='nope.pem'\nkey='b'\nclient_ca='c'\n").unwrap();
    let out = Command::new(BIN).args(["serve", "--config"]).arg(&missing_tls).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.pem") && err.contains("server certificate"), "{err}");
    // The OS error is said once, not again as the cause.
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
}

fn policy_cmd(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(["policy", "--dir"]).arg(dir).args(args).output().unwrap()
}

#[test]
fn the_shipped_policies_check_and_pass_their_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let check = stdout(&policy_cmd(&dir, &["check"]));
    assert!(check.contains("OK") && check.contains("rules"), "{check}");
    let test = stdout(&policy_cmd(&dir, &["test"]));
    assert!(test.contains("policy tests passed"), "{test}");
    let explain = stdout(&policy_cmd(
        &dir,
        &["explain", "cn:payments-dev", "/apps/payments/prod/db", "write"],
    ));
    assert!(explain.starts_with("DENY cn:payments-dev write /apps/payments/prod/db"), "{explain}");
    assert!(explain.contains("role:payments-team"), "{explain}");
    assert!(explain.contains("/apps/payments/prod/**, write, deny"), "{explain}");
    let explain = stdout(&policy_cmd(&dir, &["explain", "spiffe://nobody/x", "/demo/a", "read"]));
    assert!(explain.contains("deny by default"), "{explain}");
}

#[test]
fn broken_policies_are_reported_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::copy(shipped.join("model.conf"), dir.path().join("model.conf")).unwrap();
    std::fs::write(
        dir.path().join("policy.csv"),
        "p, a, /x, read, allow\np, b, /y*, read, allow\n",
    )
    .unwrap();
    let out = policy_cmd(dir.path(), &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.csv:2:"), "{err}");

    std::fs::write(dir.path().join("policy.csv"), "p, a, /x, read, allow\n").unwrap();
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    std::fs::write(
        dir.path().join("tests/t.toml"),
        "[[case]]\nsubject = \"a\"\npath = \"/x\"\naction = \"write\"\nexpect = \"allow\"\n",
    )
    .unwrap();
    let out = policy_cmd(dir.path(), &["test"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL") && text.contains("t.toml case 1"), "{text}");

    std::fs::write(dir.path().join("model.conf"), "[request_definition]\nr = sub, obj\n").unwrap();
    let out = policy_cmd(dir.path(), &["check"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the secretgate model"));
}

#[test]
fn policy_push_history_and_rollback_against_the_dev_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let gw = DevGateway::start_env(dir.path(), &[("SECRETGATE_AUTHZ_SOURCE", "store")]);
    let policies = dir.path().join(".secretgate-dev/policies");
    let p = policies.to_str().unwrap();
    let history = stdout(&gw.cli(dir.path(), &["policy", "history"], None));
    assert!(history.contains("import"), "the dev files seed version 1: {history}");

    let csv = policies.join("policy.csv");
    let original = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, format!("{original}p, role:reader, /pushed/**, read, allow\n")).unwrap();
    let out = stdout(&gw.cli(dir.path(), &["policy", "--dir", p, "push"], None));
    assert!(out.contains("stored as version 2; 1 live replica(s) enforcing it"), "{out}");

    // A policy failing its own tests is refused before anything is sent.
    let tests = policies.join("tests/example.toml");
    let cases = std::fs::read_to_string(&tests).unwrap();
    let failing = "[[case]]\nsubject = \"spiffe://dev.secretgate/app\"\npath = \"/x\"\naction = \"admin\"\nexpect = \"allow\"\n";
    std::fs::write(&tests, format!("{cases}\n{failing}")).unwrap();
    let refused = gw.cli(dir.path(), &["policy", "--dir", p, "push"], None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("policy tests failed; nothing pushed"), "{stderr}");

    let out = stdout(&gw.cli(dir.path(), &["policy", "rollback", "1"], None));
    assert!(out.contains("the content of version 1 stored again as version 3"), "{out}");
    let json = stdout(&gw.cli(dir.path(), &["policy", "history", "-o", "json"], None));
    let h: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(h["in_force"], 3);
    let versions: Vec<u64> =
        h["versions"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [3, 2, 1]);
    assert_eq!(h["versions"][0]["note"], "rollback to version 1");
    assert_eq!(h["versions"][0]["fingerprint"], h["versions"][2]["fingerprint"]);
    assert_eq!(h["versions"][1]["author"], "spiffe://dev.secretgate/admin");
}

#[test]
fn keys_on_the_keyring_kept_in_the_store_against_the_dev_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let gw = DevGateway::start_env(dir.path(), &[("SECRETGATE_CRYPTO_SOURCE", "store")]);
    let out = stdout(&gw.cli(dir.path(), &["put", "/demo/k", "v"], None));
    assert!(out.contains("version 1"), "{out}");
    let out = stdout(&gw.cli(dir.path(), &["keys", "add", "--store"], None));
    assert!(out.contains("in keyring version 2; 1 live replica(s) follow it"), "{out}");
    let id = out.split_whitespace().nth(3).unwrap().to_owned();
    let out = stdout(&gw.cli(dir.path(), &["keys", "promote", &id, "--store"], None));
    assert!(out.contains(&format!("promoted {id} in keyring version 3")), "{out}");
    let out = stdout(&gw.cli(dir.path(), &["keys", "status", "--store"], None));
    assert!(out.contains("(kept in the store)") && out.contains(&id), "{out}");
    assert!(out.lines().any(|l| l.starts_with(&id) && l.contains("primary")), "{out}");
    let out = stdout(&gw.cli(dir.path(), &["kek-reseal"], None));
    assert!(out.contains("keyring sealed again as version 4"), "{out}");
    let out = stdout(&gw.cli(dir.path(), &["get", "/demo/k"], None));
    assert!(out.contains('v'), "{out}");
    // The file mode's commands refuse to pretend: the gateway's keyring is not the file's.
    let refused = gw.cli(dir.path(), &["keys", "retire", &id, "--store"], None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains(&id));
}
