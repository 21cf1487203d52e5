//! Helpers for the audit log tests: reading log files, a load of concurrent puts that keeps
//! every answer, a gateway run as its own `secretgate serve` process (to kill it, or to
//! capture its log), and a size-limited tmpfs (a disk that really fills up).

use std::{
    fs::File,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use secretgate::{
    Gateway, REQUEST_ID_HEADER,
    audit::{
        Phase, Record, SigningKey, VerifyingKey,
        signing::pub_path,
        verify::{Verified, verify_files},
    },
    proto::v1::{GetRequest, PutRequest, admin_client::AdminClient, secrets_client::SecretsClient},
    testing::Keyring,
};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tonic::{Code, metadata::MetadataMap, transport::Channel};

use crate::{Ca, Pem};

/// The `secretgate` binary cargo built beside the running test or benchmark
/// (`target/<profile>/secretgate`; the test itself is in `target/<profile>/deps/`).
pub fn secretgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    profile.join("secretgate")
}

/// The `x-request-id` of a response or an error status.
pub fn request_id(metadata: &MetadataMap) -> String {
    let id = metadata.get(REQUEST_ID_HEADER).expect("an x-request-id in the metadata");
    id.to_str().unwrap().to_owned()
}

/// The whole lines of one log file with their records. A line a running gateway is still
/// writing (no newline yet) is left out; any other line must be a record.
pub fn read_log(path: &Path) -> Vec<(String, Record)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let text = String::from_utf8(bytes[..whole].to_vec()).unwrap();
    let parse = |(i, line): (usize, &str)| {
        let r = Record::parse(line.as_bytes())
            .unwrap_or_else(|e| panic!("{}:{}: {e}: {line}", path.display(), i + 1));
        (line.to_owned(), r)
    };
    text.lines().enumerate().map(parse).collect()
}

/// The rotated files of the log whose active file is `active`, oldest first, then `active`.
pub fn log_files(active: &Path) -> Vec<PathBuf> {
    let name = active.file_name().unwrap().to_str().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(active.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&format!("{name}.")))
        .collect();
    files.sort();
    files.push(active.to_owned());
    files
}

/// Every record of the log, across its files, in order.
pub fn read_all(active: &Path) -> Vec<Record> {
    log_files(active).iter().flat_map(|f| read_log(f)).map(|(_, r)| r).collect()
}

/// Verifies every file of the log with the public key of `signing_key`.
pub fn verify_log(active: &Path, signing_key: &Path) -> Verified {
    let key = VerifyingKey::load(&pub_path(signing_key)).unwrap();
    verify_files(&log_files(active), Some(&key), None)
        .unwrap_or_else(|e| panic!("the log does not verify: {e}"))
}

/// The answer to one put of a [`Load`].
pub struct Answer {
    /// The path written; the value is the path too.
    pub path: String,
    /// From sending the request to its answer.
    pub latency: Duration,
    /// The version written and the request id, or the code and (if any) the request id.
    pub result: Result<(u64, String), (Code, Option<String>)>,
}

pub fn ok_count(answers: &[Answer]) -> usize {
    answers.iter().filter(|a| a.result.is_ok()).count()
}

pub fn unavailable_count(answers: &[Answer]) -> usize {
    answers.iter().filter(|a| matches!(a.result, Err((Code::Unavailable, _)))).count()
}

/// Puts from one task per client, each to fresh paths (the value is the path), until
/// stopped; every answer is kept.
pub struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(clients: Vec<SecretsClient<Channel>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(t, mut c)| {
                let (stop, answers) = (Arc::clone(&stop), Arc::clone(&answers));
                tokio::spawn(async move {
                    for n in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let path = format!("/load/t{t}/n{n}");
                        let started = Instant::now();
                        let put = PutRequest {
                            path: path.clone(),
                            value: path.clone().into_bytes(),
                            expected_version: None,
                        };
                        let result = match c.put(put).await {
                            Ok(r) => Ok((r.get_ref().version, request_id(r.metadata()))),
                            Err(s) => {
                                let id = s.metadata().get(REQUEST_ID_HEADER);
                                Err((s.code(), id.map(|v| v.to_str().unwrap().to_owned())))
                            }
                        };
                        let latency = started.elapsed();
                        answers.lock().unwrap().push(Answer { path, latency, result });
                    }
                })
            })
            .collect();
        Self { stop, answers, tasks }
    }

    pub fn answers(&self) -> std::sync::MutexGuard<'_, Vec<Answer>> {
        self.answers.lock().unwrap()
    }

    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Answer]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&self.answers()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::into_inner(self.answers).unwrap().into_inner().unwrap()
    }
}

/// Every file below `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// `secretgate serve --config F` in its own process, on files the test wrote: a PKI, a
/// keyring, an audit signing key, the test policy and the config. Its stderr (the gateway's
/// own log) goes to `gateway.log`. Killed when dropped.
pub struct ServedGateway {
    pub ca: Ca,
    pub dir: tempfile::TempDir,
    audit: String,
    store: String,
    extra: String,
    env: Vec<(String, String)>,
    addr: SocketAddr,
    child: Option<Child>,
}

impl ServedGateway {
    /// Writes the files; `audit` is extra TOML for the `[audit]` section.
    pub fn prepare(audit: &str) -> Self {
        let ca = Ca::new("served gateway CA");
        let dir = tempfile::tempdir().unwrap();
        let server = ca.server();
        super::write(dir.path(), "server.pem", &server.cert);
        super::write(dir.path(), "server-key.pem", &server.key);
        super::write(dir.path(), "ca.pem", &ca.cert_pem);
        Keyring::generate().unwrap().save(&dir.path().join("keyring.toml")).unwrap();
        SigningKey::generate().unwrap().save(&dir.path().join("audit.key")).unwrap();
        super::write_policy(&dir.path().join("policies"), super::TEST_POLICY);
        let addr = "127.0.0.1:0".parse().unwrap();
        let store = "backend = \"embedded\"\npath = \"store/secretgate.redb\"\n".to_owned();
        let (extra, env) = (String::new(), Vec::new());
        Self { ca, dir, audit: audit.to_owned(), store, extra, env, addr, child: None }
    }

    /// Adds `toml` (whole sections) at the end of the configuration file.
    pub fn with_config(mut self, toml: &str) -> Self {
        toml.clone_into(&mut self.extra);
        self
    }

    /// Sets a `SECRETGATE_*` override for the gateway process.
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Uses `store` (the TOML of the `[store]` section) instead of the embedded store.
    pub fn with_store(mut self, store: &str) -> Self {
        store.clone_into(&mut self.store);
        self
    }

    /// Starts serving on a free port, logging at `log` level, and waits until it listens.
    /// A free port is found by binding and releasing it, so a test running in parallel can
    /// take it first: then the gateway is started again on another (three tries).
    pub async fn serve(&mut self, log: &str) {
        for _ in 0..2 {
            if self.try_serve(log).await {
                return;
            }
            self.child = None;
        }
        assert!(self.try_serve(log).await, "not listening:\n{}", self.gateway_log());
    }

    /// One try of [`ServedGateway::serve`]: false when the port was taken.
    async fn try_serve(&mut self, log: &str) -> bool {
        assert!(self.child.is_none(), "already serving");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        self.addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = format!(
            "listen = \"{}\"\n\n[tls]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n\
             client_ca = \"ca.pem\"\n\n[store]\n{}\n[crypto]\nkeyring = \"keyring.toml\"\n\n\
             [authz]\npolicies = \"policies\"\n\n[audit]\npath = \"audit/audit.log\"\n\
             signing_key = \"audit.key\"\n{}\n{}{}",
            self.addr,
            self.store,
            self.audit,
            self.extra,
            // Off unless the test's own sections set it: gateways in parallel tests would
            // all want the default port.
            if self.extra.contains("[metrics]") { "" } else { "\n[metrics]\nlisten = \"\"\n" },
        );
        let config_path = super::write(self.dir.path(), "secretgate.toml", &config);
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gateway.log"))
            .unwrap();
        let child = Command::new(secretgate_bin())
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("SECRETGATE_LOG", log)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = self.gateway_log();
                if log.contains("Address already in use") {
                    return false;
                }
                panic!("secretgate serve exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "not listening:\n{}", self.gateway_log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The gateway process, while serving.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub async fn client(&self, spiffe: &str) -> SecretsClient<Channel> {
        let channel = super::connect(&self.ca, self.addr, &self.ca.client(spiffe)).await.unwrap();
        SecretsClient::new(channel)
    }

    pub async fn admin(&self, spiffe: &str) -> AdminClient<Channel> {
        let channel = super::connect(&self.ca, self.addr, &self.ca.client(spiffe)).await.unwrap();
        AdminClient::new(channel)
    }

    /// SIGKILL: no graceful shutdown, no final checkpoint.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("serving");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, and waits for the graceful shutdown (final checkpoint) to finish.
    pub async fn terminate(&mut self) {
        let mut child = self.child.take().expect("serving");
        let sent = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        assert!(sent.unwrap().success(), "kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM:\n{}", self.gateway_log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "exit after SIGTERM: {status}\n{}", self.gateway_log());
    }
}

impl Drop for ServedGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
/// A size-limited tmpfs mounted on a temporary directory; unmounted (lazily) when dropped,
/// also when the test panics.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Self { dir },
            Ok(o) => panic!(
                "this test needs root to mount a size-limited tmpfs (mount -t tmpfs) and could \
                 not: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("this test needs root and `mount` to mount a tmpfs: {e}"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes a file into `dir` until the file system is full (ENOSPC); returns its path.
pub fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(n) => assert!(n > 0, "a write of nothing"),
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return path,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

// Helpers shared by the audit test files.

/// Starts a gateway on `config`, which must be refused (else panics with `what`); returns
/// the error.
pub async fn refused_at_start(config: &secretgate::Config, what: &str) -> String {
    match Gateway::start(&config.clone().check().unwrap()).await {
        Ok(_) => panic!("{what}"),
        Err(e) => e.to_string(),
    }
}

/// Deletes every file of the log whose active file is `active`.
pub fn delete_log(active: &Path) {
    for f in log_files(active) {
        std::fs::remove_file(f).unwrap();
    }
}

pub fn put(path: &str, value: &[u8]) -> PutRequest {
    PutRequest { path: path.into(), value: value.to_vec(), expected_version: None }
}

pub fn get(path: &str) -> GetRequest {
    GetRequest { path: path.into(), version: None }
}

/// SHA-256 of the certificate's DER, hex: what the gateway calls its fingerprint.
pub fn fingerprint(pem: &Pem) -> String {
    hex::encode(Sha256::digest(CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap()))
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Every put the client saw acknowledged has an intent record and, after it, an OK outcome
/// record with the same version.
pub fn assert_acknowledged_writes_recorded(answers: &[Answer], records: &[Record]) {
    let mut acked = 0;
    for a in answers {
        let Ok((version, id)) = &a.result else { continue };
        acked += 1;
        let mine: Vec<_> =
            records.iter().filter(|r| r.request_id.as_deref() == Some(id.as_str())).collect();
        let got: Vec<_> = mine.iter().map(|r| (r.phase, r.status.as_deref(), r.version)).collect();
        let want =
            [(Some(Phase::Intent), None, None), (Some(Phase::Outcome), Some("OK"), Some(*version))];
        assert_eq!(got, want, "records of the acknowledged put {id} of {}", a.path);
    }
    assert!(acked > 0, "no put was acknowledged");
}
