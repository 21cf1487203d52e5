//! The audit log's promises, against real gateways writing real files: every request is
//! recorded with its facts, no secret reaches any log, `audit verify` catches each kind of
//! tampering, the log fails closed on a full disk and recovers, a crash loses no record of an
//! acknowledged write, a removed file is noticed, rotation keeps the chain, and a log cut
//! short, a deleted log or a foreign signing key is refused at start.

mod support;

use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use secretgate::{
    Gateway,
    audit::{
        Kind, Phase, Record, SigningKey, VerifyingKey,
        record::{GENESIS_PREV, line_hash},
        signing::pub_path,
        verify::{Problem, Tamper, verify_files},
    },
    crypto::Keyring,
    proto::v1::{
        AuditStatusRequest, DeleteRequest, GetRequest, ListRequest, PutRequest, VersionsRequest,
        WhoAmIRequest, secrets_client::SecretsClient,
    },
};
use sha2::{Digest, Sha256};
use support::{
    Ca, Pem, TestGateway,
    audit::{
        Answer, Load, ServedGateway, Tmpfs, files_under, fill, log_files, ok_count, read_all,
        read_log, request_id, unavailable_count, verify_log,
    },
    etcd::EtcdCluster,
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";
const BIN: &str = env!("CARGO_BIN_EXE_secretgate");

// ---------------------------------------------------------------------------------------------
// Every request is recorded with its facts.

#[tokio::test]
async fn every_request_is_recorded_with_its_facts() {
    let gw = TestGateway::start().await;
    let (admin_pem, reader_pem) = (gw.ca.client(ADMIN), gw.ca.client(READER));
    let mut admin = SecretsClient::new(gw.channel(&admin_pem).await.unwrap());
    let mut reader = SecretsClient::new(gw.channel(&reader_pem).await.unwrap());
    let key_id = Keyring::load(&gw.config.crypto.keyring).unwrap().primary().id.to_string();
    let key_id = Some(key_id.as_str());
    let (admin_fp, reader_fp) = (fingerprint(&admin_pem), fingerprint(&reader_pem));
    let path = "/shared/app/db";

    let put1 = admin.put(put(path, b"one")).await.unwrap();
    let put2 = admin.put(put(path, b"two")).await.unwrap();
    assert_eq!(put2.get_ref().version, 2);
    let got = admin.get(get(path)).await.unwrap();
    let listed = admin.list(ListRequest { prefix: "/shared".into(), ..Default::default() }).await;
    let versions = admin.versions(VersionsRequest { path: path.into() }).await.unwrap();
    let whoami = admin.who_am_i(WhoAmIRequest {}).await.unwrap();
    assert_eq!(whoami.get_ref().certificate_fingerprint, admin_fp);
    let allowed = reader.get(get(path)).await.unwrap();
    let denied = reader.get(get("/payments/db")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let bad = admin.get(get("no/leading/slash")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let deleted = admin.delete(DeleteRequest { path: path.into() }).await.unwrap();

    let admin_call = |method, action: Option<&'static str>, status, version| Facts {
        method,
        principal: ADMIN,
        fingerprint: &admin_fp,
        path: Some(path),
        action,
        decision: action.map(|_| "allow"),
        rule: action.map(|_| "policy.csv:1"),
        status,
        version,
        key_id: None,
        write: false,
    };
    let expected = [
        (
            request_id(put1.metadata()),
            Facts { write: true, key_id, ..admin_call("Put", Some("write"), "OK", Some(1)) },
        ),
        (
            request_id(put2.metadata()),
            Facts { write: true, key_id, ..admin_call("Put", Some("write"), "OK", Some(2)) },
        ),
        (
            request_id(got.metadata()),
            Facts { key_id, ..admin_call("Get", Some("read"), "OK", Some(2)) },
        ),
        (
            request_id(listed.unwrap().metadata()),
            Facts {
                path: Some("/shared"),
                rule: Some("filtered per path"),
                ..admin_call("List", Some("list"), "OK", None)
            },
        ),
        (request_id(versions.metadata()), admin_call("Versions", Some("read"), "OK", Some(2))),
        (
            request_id(whoami.metadata()),
            Facts { path: None, ..admin_call("WhoAmI", None, "OK", None) },
        ),
        (
            request_id(allowed.metadata()),
            Facts {
                principal: READER,
                fingerprint: &reader_fp,
                rule: Some("policy.csv:2"),
                key_id,
                ..admin_call("Get", Some("read"), "OK", Some(2))
            },
        ),
        (
            request_id(denied.metadata()),
            Facts {
                principal: READER,
                fingerprint: &reader_fp,
                path: Some("/payments/db"),
                decision: Some("deny"),
                rule: Some("default deny"),
                ..admin_call("Get", Some("read"), "PERMISSION_DENIED", None)
            },
        ),
        (
            request_id(bad.metadata()),
            Facts {
                path: Some("no/leading/slash"),
                ..admin_call("Get", None, "INVALID_ARGUMENT", None)
            },
        ),
        (
            request_id(deleted.metadata()),
            Facts { write: true, ..admin_call("Delete", Some("delete"), "OK", Some(2)) },
        ),
    ];

    // A refused handshake is recorded without anyone waiting for it: poll for it.
    let stranger = Ca::new("some other CA").client(ADMIN);
    let refusal = gw.probe(Some(&stranger), false).await.unwrap_err();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = read_log(&gw.config.audit.path);
        if lines.iter().any(|(_, r)| r.kind() == Kind::Handshake) {
            break lines;
        }
        assert!(Instant::now() < deadline, "no handshake record for the refusal ({refusal})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Genesis first, then a contiguous chain over the exact bytes of each line.
    let (_, genesis) = &lines[0];
    assert_eq!(
        (genesis.kind(), genesis.seq, genesis.prev.as_str()),
        (Kind::Genesis, 0, GENESIS_PREV)
    );
    let key = VerifyingKey::load(&pub_path(&gw.config.audit.signing_key)).unwrap();
    assert_eq!(genesis.pubkey.as_deref(), Some(key.to_string().as_str()), "genesis names the key");
    for (i, pair) in lines.windows(2).enumerate() {
        let ((before, _), (_, r)) = (&pair[0], &pair[1]);
        assert_eq!(r.seq, i as u64 + 1, "seq without gaps");
        assert_eq!(r.prev, line_hash(before.as_bytes()), "prev of seq {} chains", r.seq);
    }

    let ids: HashSet<_> = expected.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), expected.len(), "every request has its own id");
    for (id, facts) in &expected {
        facts.check(&lines, id);
    }
    let serial = &whoami.get_ref().certificate_serial;
    for (_, r) in lines.iter().filter(|(_, r)| r.principal.as_deref() == Some(ADMIN)) {
        assert_eq!(r.cert_serial.as_ref(), Some(serial), "{r:?}");
    }

    let handshakes: Vec<_> = lines.iter().filter(|(_, r)| r.kind() == Kind::Handshake).collect();
    assert_eq!(handshakes.len(), 1, "one refused handshake, one record");
    let h = &handshakes[0].1;
    assert_eq!(
        (h.decision.as_deref(), h.status.as_deref()),
        (Some("deny"), Some("UNAUTHENTICATED"))
    );
    assert!(h.peer.as_deref().is_some_and(|p| p.starts_with("127.0.0.1:")), "{h:?}");
    assert!(h.reason.as_deref().is_some_and(|r| r.contains("UnknownIssuer")), "says why: {h:?}");
    assert!(h.principal.is_none() && h.request_id.is_none(), "{h:?}");
}

/// What the records of one request must say.
struct Facts<'a> {
    method: &'a str,
    principal: &'a str,
    fingerprint: &'a str,
    path: Option<&'a str>,
    action: Option<&'a str>,
    decision: Option<&'a str>,
    rule: Option<&'a str>,
    status: &'a str,
    version: Option<u64>,
    key_id: Option<&'a str>,
    /// A write: an intent record comes before the outcome.
    write: bool,
}

impl Facts<'_> {
    fn check(&self, lines: &[(String, Record)], id: &str) {
        let mine: Vec<&Record> =
            lines.iter().map(|(_, r)| r).filter(|r| r.request_id.as_deref() == Some(id)).collect();
        let phases: Vec<_> = mine.iter().map(|r| r.phase).collect();
        let want = if self.write {
            vec![Some(Phase::Intent), Some(Phase::Outcome)]
        } else {
            vec![Some(Phase::Outcome)]
        };
        assert_eq!(phases, want, "records of {} {id}", self.method);
        let method = format!("secretgate.v1.Secrets/{}", self.method);
        for r in &mine {
            assert_eq!(r.kind(), Kind::Request);
            let facts = (
                r.method.as_deref(),
                r.principal.as_deref(),
                r.cert_fingerprint.as_deref(),
                r.path.as_deref(),
                r.action.as_deref(),
                r.decision.as_deref(),
                r.rule.as_deref(),
            );
            let want = (
                Some(method.as_str()),
                Some(self.principal),
                Some(self.fingerprint),
                self.path,
                self.action,
                self.decision,
                self.rule,
            );
            assert_eq!(facts, want, "{r:?}");
            assert!(r.cert_serial.is_some() && r.latency_us.is_some(), "{r:?}");
            assert!(r.peer.as_deref().is_some_and(|p| p.starts_with("127.0.0.1:")), "{r:?}");
        }
        let intent = mine.first().filter(|_| self.write);
        if let Some(intent) = intent {
            assert_eq!((intent.status.as_deref(), intent.version), (None, None), "{intent:?}");
        }
        let outcome = mine.last().unwrap();
        let facts = (outcome.status.as_deref(), outcome.version, outcome.key_id.as_deref());
        assert_eq!(facts, (Some(self.status), self.version, self.key_id), "{outcome:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// No secret value reaches any log.

#[tokio::test]
async fn a_flood_of_refused_handshakes_is_counted_not_recorded_one_by_one() {
    use secretgate::tls::{REFUSAL_BURST, REFUSALS_PER_SEC};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FLOOD: u64 = 600;
    let gw = TestGateway::start().await;
    // Anyone who reaches the port can do this: connect, send garbage, be refused.
    let started = Instant::now();
    for _ in 0..FLOOD {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await; // the gateway closes it
    }
    let flood_secs = started.elapsed().as_secs_f64();
    // Each refusal is in the log once: as a record of its own, or in a count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (single, counted) = loop {
        let lines = read_log(&gw.config.audit.path);
        let handshakes = lines.iter().map(|(_, r)| r).filter(|r| r.kind() == Kind::Handshake);
        let (counts, single): (Vec<&Record>, Vec<&Record>) =
            handshakes.partition(|r| r.refused.is_some());
        let counted: u64 = counts.iter().filter_map(|r| r.refused).sum();
        if single.len() as u64 + counted == FLOOD {
            for c in &counts {
                let reason = c.reason.as_deref().unwrap_or_default();
                assert!(reason.contains("counted, not recorded one by one"), "{c:?}");
                assert!(c.since.is_some() && c.peer.is_some(), "{c:?}");
                assert_eq!(c.status.as_deref(), Some("UNAUTHENTICATED"));
            }
            break (single.len() as u64, counted);
        }
        assert!(
            Instant::now() < deadline,
            "{} single and {counted} counted refusals, of {FLOOD}",
            single.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let allowed = f64::from(REFUSAL_BURST) + f64::from(REFUSALS_PER_SEC) * (flood_secs + 1.0);
    assert!(single as f64 <= allowed, "{single} recorded one by one in {flood_secs:.1}s");
    assert!(counted > 0, "the flood ({flood_secs:.1}s) went over the limit");
    verify_log(&gw.config.audit.path, &gw.config.audit.signing_key);
}

#[tokio::test]
async fn no_secret_value_reaches_any_log() {
    let mut gw = ServedGateway::prepare("");
    gw.serve("debug").await;
    let mut admin = gw.client(ADMIN).await;
    let mut reader = gw.client(READER).await;
    let values: Vec<String> = (0..8).map(|_| format!("SECRET-VALUE-{}", random_hex(16))).collect();
    let mut ids = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let path = format!("/shared/app/s{i}");
        ids.push(request_id(admin.put(put(&path, v.as_bytes())).await.unwrap().metadata()));
        let got = admin.get(get(&path)).await.unwrap();
        assert_eq!(got.get_ref().value, v.as_bytes());
        ids.push(request_id(got.metadata()));
        ids.push(request_id(reader.get(get(&path)).await.unwrap().metadata()));
    }
    // Values that were refused must not be logged either.
    let refused = [
        reader.put(put("/shared/app/s0", values[0].as_bytes())).await.unwrap_err(),
        admin.put(put("bad path", values[1].as_bytes())).await.unwrap_err(),
        admin
            .put(PutRequest {
                path: "/shared/app/s2".into(),
                value: values[2].as_bytes().to_vec(),
                expected_version: Some(7),
            })
            .await
            .unwrap_err(),
    ];
    let codes: Vec<_> = refused.iter().map(tonic::Status::code).collect();
    assert_eq!(codes, [Code::PermissionDenied, Code::InvalidArgument, Code::FailedPrecondition]);
    ids.extend(refused.iter().map(|s| request_id(s.metadata())));
    drop((admin, reader));
    gw.terminate().await;

    let mut logs = files_under(&gw.dir.path().join("audit"));
    logs.push(gw.dir.path().join("gateway.log"));
    let contents: Vec<(PathBuf, Vec<u8>)> =
        logs.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    // The capture works: the gateway logged at debug level, and every request is in both.
    let gateway_log = String::from_utf8_lossy(&contents.last().unwrap().1).into_owned();
    assert!(gateway_log.contains("DEBUG"), "debug output captured:\n{gateway_log}");
    for id in &ids {
        for (path, bytes) in &contents[..] {
            if path.ends_with("audit.log") || path.ends_with("gateway.log") {
                assert!(contains(bytes, id.as_bytes()), "request {id} not in {}", path.display());
            }
        }
    }

    let mut forbidden: Vec<(String, Vec<u8>)> = Vec::new();
    for v in &values {
        forbidden.extend(encodings(&format!("secret value {v}"), v.as_bytes()));
    }
    let keyring: toml::Table =
        toml::from_str(&std::fs::read_to_string(gw.dir.path().join("keyring.toml")).unwrap())
            .unwrap();
    for key in keyring["keys"].as_array().unwrap() {
        let secret = key["secret"].as_str().unwrap();
        forbidden.push((format!("keyring key {} (base64)", key["id"]), secret.as_bytes().to_vec()));
        forbidden
            .extend(encodings(&format!("keyring key {}", key["id"]), &B64.decode(secret).unwrap()));
    }
    let seed = std::fs::read_to_string(gw.dir.path().join("audit.key")).unwrap();
    let seed = seed.lines().find(|l| !l.starts_with('#')).unwrap().trim().to_owned();
    forbidden.push(("audit signing key (base64)".into(), seed.as_bytes().to_vec()));
    forbidden.extend(encodings("audit signing key", &B64.decode(&seed).unwrap()));
    for (path, bytes) in &contents {
        for (what, needle) in &forbidden {
            assert!(!contains(bytes, needle), "{what} found in {}", path.display());
        }
    }
}

/// `bytes` as it might leak: raw, hex, base64, and as Rust prints a byte slice.
fn encodings(what: &str, bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("{what} (raw)"), bytes.to_vec()),
        (format!("{what} (hex)"), hex::encode(bytes).into_bytes()),
        (format!("{what} (base64)"), B64.encode(bytes).into_bytes()),
        (
            format!("{what} (Debug bytes)"),
            format!("{bytes:?}").trim_matches(['[', ']']).as_bytes().to_vec(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Tampering with a real log, five ways, is caught by the library and by the CLI.

#[test]
fn an_untouched_log_verifies() {
    let p = pristine();
    let dir = p.write(&p.lines());
    let v = verify_files(&[dir.path().join("audit.log")], Some(&p.key()), Some(&p.checkpoint))
        .unwrap_or_else(|e| panic!("the untouched log must verify: {e}"));
    let last = p.lines().len() as u64 - 1;
    assert_eq!((v.records, v.first_seq, v.last_seq), (last + 1, 0, last));
    assert_eq!(v.last_signed_seq, Some(last), "the final checkpoint signs everything");
    assert!(v.checkpoints >= 3, "checkpoints every 5 records: {v:?}");
    let out = verify_cli(dir.path(), true);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).starts_with("OK"), "{}", output_text(&out));
}

#[test]
fn an_edited_byte_in_a_middle_record_is_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    let line = &mut lines[at];
    let pos = find(line, b"\"path\":\"/tamper/k").unwrap() + "\"path\":\"/tamper/k".len();
    line[pos] = if line[pos] == b'1' { b'0' } else { b'1' };
    p.assert_caught(&lines, false, Tamper::Edited, at + 1);
}

#[test]
fn an_inserted_copy_of_a_line_is_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    let copy = lines[at - 6].clone();
    lines.insert(at + 1, copy);
    p.assert_caught(&lines, false, Tamper::Inserted, at + 2);
}

#[test]
fn a_deleted_line_is_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    lines.remove(at);
    p.assert_caught(&lines, false, Tamper::Deleted, at + 1);
}

#[test]
fn two_swapped_lines_are_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    lines.swap(at, at + 1);
    p.assert_caught(&lines, false, Tamper::Reordered, at + 1);
}

#[test]
fn a_log_cut_before_the_stored_checkpoint_is_caught() {
    let p = pristine();
    let stored = Record::parse(&p.checkpoint).unwrap();
    assert_eq!(stored.kind(), Kind::Checkpoint);
    // Cut the stored checkpoint and the record before it, and everything after.
    let mut lines = p.lines();
    let keep = stored.seq as usize - 1;
    assert!(keep + 4 < lines.len(), "records follow the stored checkpoint");
    lines.truncate(keep);
    // The chain alone cannot see a clean cut at the end: the stored checkpoint does.
    let dir = p.write(&lines);
    let chain_only = verify_files(&[dir.path().join("audit.log")], Some(&p.key()), None);
    assert!(chain_only.is_ok(), "without the stored checkpoint: {chain_only:?}");
    p.assert_caught(&lines, true, Tamper::Truncated, keep + 1);
}

/// A log a real gateway wrote (a checkpoint every 5 records), its public key, and the
/// checkpoint the gateway had stored, as `Admin/AuditStatus` reported it.
struct Pristine {
    log: Vec<u8>,
    pubkey: Vec<u8>,
    checkpoint: Vec<u8>,
}

/// Written once, by a gateway in its own runtime, and tampered with by each test in a copy.
fn pristine() -> &'static Pristine {
    static PRISTINE: OnceLock<Pristine> = OnceLock::new();
    PRISTINE.get_or_init(|| tokio::runtime::Runtime::new().unwrap().block_on(write_pristine()))
}

async fn write_pristine() -> Pristine {
    let mut gw = TestGateway::start_with(|c| c.audit.checkpoint_every = 5).await;
    let mut c = gw.client(ADMIN).await;
    for i in 0..12 {
        let path = format!("/tamper/k{i:02}");
        c.put(put(&path, b"value")).await.unwrap();
        c.get(get(&path)).await.unwrap();
    }
    let mut admin = gw.admin(ADMIN).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let checkpoint = loop {
        let status = admin.audit_status(AuditStatusRequest {}).await.unwrap().into_inner();
        if !status.checkpoint.is_empty() {
            break status.checkpoint;
        }
        assert!(Instant::now() < deadline, "no checkpoint stored: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for i in 0..6 {
        c.get(get(&format!("/tamper/k{i:02}"))).await.unwrap();
    }
    drop((c, admin));
    gw.stop().await;
    Pristine {
        log: std::fs::read(&gw.config.audit.path).unwrap(),
        pubkey: std::fs::read(pub_path(&gw.config.audit.signing_key)).unwrap(),
        checkpoint: checkpoint.into_bytes(),
    }
}

impl Pristine {
    fn lines(&self) -> Vec<Vec<u8>> {
        let body = self.log.strip_suffix(b"\n").expect("the log ends with a whole line");
        body.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn key(&self) -> VerifyingKey {
        VerifyingKey::parse(
            std::str::from_utf8(&self.pubkey)
                .unwrap()
                .lines()
                .find(|l| !l.starts_with('#'))
                .unwrap(),
        )
        .unwrap()
    }

    /// Index of a request record with a path in the middle of the log.
    fn middle(&self) -> usize {
        let lines = self.lines();
        (lines.len() / 2..lines.len() - 2)
            .find(|i| {
                let r = Record::parse(&lines[*i]).unwrap();
                r.kind() == Kind::Request
                    && r.path.as_deref().is_some_and(|p| p.starts_with("/tamper/k"))
            })
            .expect("a request record in the middle")
    }

    /// Writes `lines` as `audit.log`, with the public key and the stored checkpoint, into a
    /// new directory.
    fn write(&self, lines: &[Vec<u8>]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut log = lines.join(&b'\n');
        log.push(b'\n');
        std::fs::write(dir.path().join("audit.log"), log).unwrap();
        std::fs::write(dir.path().join("audit.key.pub"), &self.pubkey).unwrap();
        std::fs::write(dir.path().join("checkpoint"), &self.checkpoint).unwrap();
        dir
    }

    /// Both `verify_files` and `secretgate audit verify` report `kind` at `line`.
    fn assert_caught(&self, lines: &[Vec<u8>], with_checkpoint: bool, kind: Tamper, line: usize) {
        let dir = self.write(lines);
        let log = dir.path().join("audit.log");
        let checkpoint = with_checkpoint.then_some(self.checkpoint.as_slice());
        match verify_files(std::slice::from_ref(&log), Some(&self.key()), checkpoint) {
            Err(Problem::Tampered(t)) => {
                assert_eq!((t.kind, t.line), (kind, line), "{t}");
                assert_eq!(t.file, log.display().to_string());
            }
            other => panic!("{kind} not caught: {other:?}"),
        }
        let out = verify_cli(dir.path(), with_checkpoint);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "exit code 1 for tampering: {text}");
        assert!(text.contains(&format!("audit.log:{line} ")), "names the line: {text}");
        assert!(text.contains(&format!(": {kind}: ")), "names the kind {kind}: {text}");
    }
}

/// Runs `secretgate audit verify --pubkey … [--checkpoint …] audit.log` in `dir`.
fn verify_cli(dir: &Path, with_checkpoint: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["audit", "verify", "--pubkey"]).arg(dir.join("audit.key.pub"));
    if with_checkpoint {
        cmd.arg("--checkpoint").arg(dir.join("checkpoint"));
    }
    cmd.arg(dir.join("audit.log")).env_remove("SECRETGATE_OUTPUT").output().unwrap()
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

// ---------------------------------------------------------------------------------------------
// Fail closed when the disk is full, and recover by itself.

#[tokio::test]
async fn fail_closed_when_the_disk_is_full_and_recovers_by_itself() {
    // A size-limited tmpfs makes the kernel itself answer ENOSPC, exactly as a full disk
    // does: no fault injected into the gateway, nothing the writer could tell from the real
    // thing. A directory made read-only with chmod would prove nothing here, because these
    // tests run as root and root writes through file permissions.
    let disk = Tmpfs::mount("2m");
    const TIMEOUT_MS: u64 = 1000;
    let log = disk.path().join("audit.log");
    let mut gw = TestGateway::start_with(|c| {
        c.audit.path = log.clone();
        c.audit.timeout_ms = TIMEOUT_MS;
    })
    .await;
    let mut health = HealthClient::new(gw.channel(&gw.ca.client(ADMIN)).await.unwrap());
    assert_eq!(health_of(&mut health).await, ServingStatus::Serving);
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(gw.client(ADMIN).await);
    }
    let load = Load::start(clients);
    load.wait_for("puts acknowledged before the disk fills", |a| ok_count(a) >= 30).await;

    let filler = fill(disk.path());
    wait_for_health(&mut health, ServingStatus::NotServing).await;
    load.wait_for("puts refused while the disk is full", |a| unavailable_count(a) >= 20).await;
    // Asked now, checked last, so that every other promise is checked whatever it says.
    let mut admin = gw.admin(ADMIN).await;
    let status_while_failing = admin.audit_status(AuditStatusRequest {}).await;

    std::fs::remove_file(&filler).unwrap();
    wait_for_health(&mut health, ServingStatus::Serving).await;
    let before = ok_count(&load.answers());
    load.wait_for("puts acknowledged after the recovery", |a| ok_count(a) >= before + 20).await;
    let answers = load.stop().await;
    // A refused put may still have been applied (its intent was durable, its outcome was
    // not), but never without its intent record: find the ones that were.
    let mut c = gw.client(ADMIN).await;
    let mut applied = Vec::new();
    for a in &answers {
        if let Err((_, id)) = &a.result {
            if c.get(get(&a.path)).await.is_ok() {
                applied.push((a.path.as_str(), id.clone().expect("a request id on the error")));
            }
        }
    }
    drop((health, admin, c));
    gw.stop().await;

    let bound = Duration::from_millis(TIMEOUT_MS) + Duration::from_millis(1500);
    let slowest = answers.iter().map(|a| a.latency).max().unwrap();
    assert!(slowest <= bound, "no request hangs past the bound: slowest took {slowest:?}");
    for a in &answers {
        if let Err((code, _)) = &a.result {
            assert_eq!(*code, Code::Unavailable, "{} failed otherwise: {code:?}", a.path);
        }
    }
    let records = read_all(&log);
    assert_acknowledged_writes_recorded(&answers, &records);
    for (path, id) in applied {
        let intent = records
            .iter()
            .any(|r| r.request_id.as_deref() == Some(&id) && r.phase == Some(Phase::Intent));
        assert!(intent, "the refused put of {path} took effect without an intent record");
    }
    let outages: Vec<_> = records.iter().filter(|r| r.kind() == Kind::Outage).collect();
    assert!(!outages.is_empty(), "an outage record once the log is writable again");
    for o in outages {
        assert!(o.refused.is_some_and(|n| n > 0), "{o:?}");
        assert!(o.since.as_deref().is_some_and(|s| s.ends_with('Z')), "{o:?}");
        assert!(o.reason.as_deref().is_some_and(|r| r.contains("space")), "{o:?}");
    }
    verify_log(&log, &gw.config.audit.signing_key);
    let failure = status_while_failing.as_ref().map(|s| s.get_ref().failure.as_str());
    assert!(
        failure.is_ok_and(|f| !f.is_empty()),
        "Admin/AuditStatus reports the failure while the log is failing: {status_while_failing:?}"
    );
}

async fn health_of(h: &mut HealthClient<Channel>) -> ServingStatus {
    let r = h.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    r.into_inner().status()
}

async fn wait_for_health(h: &mut HealthClient<Channel>, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = health_of(h).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "health is {now:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A crash mid-load loses no acknowledged record.

#[tokio::test]
async fn a_crash_mid_load_loses_no_acknowledged_record() {
    let mut gw = ServedGateway::prepare("checkpoint_every = 50\n");
    gw.serve("info").await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(gw.client(ADMIN).await);
    }
    let load = Load::start(clients);
    load.wait_for("puts acknowledged before the crash", |a| ok_count(a) >= 150).await;
    gw.kill();
    let answers = load.stop().await;
    let log = gw.dir.path().join("audit/audit.log");
    let at_crash = std::fs::read(&log).unwrap();
    // A killed process cannot tear a write() to a regular file: each batch is one write.
    // A power cut can, so leave what it would: the start of a record without its newline.
    let next_seq = read_log(&log).last().unwrap().1.seq + 1;
    let torn = format!("{{\"seq\":{next_seq},\"ts\":\"2026-");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(torn.as_bytes())
        .unwrap();

    gw.serve("info").await;
    let mut c = gw.client(ADMIN).await;
    let acked: Vec<_> = answers.iter().filter(|a| a.result.is_ok()).collect();
    for a in &acked {
        let version = a.result.as_ref().unwrap().0;
        let got = c.get(GetRequest { path: a.path.clone(), version: Some(version) }).await;
        assert_eq!(got.unwrap().into_inner().value, a.path.as_bytes(), "{} reads back", a.path);
    }
    drop(c);
    gw.terminate().await;

    // What was on disk at the crash is where the chain goes on; the torn line is gone.
    let after = std::fs::read(&log).unwrap();
    assert!(at_crash.ends_with(b"\n"), "the kill left whole lines");
    assert!(after.starts_with(&at_crash), "the restarted gateway kept the log");
    let next = Record::parse(after[at_crash.len()..].split(|b| *b == b'\n').next().unwrap());
    assert_eq!(next.map(|r| r.seq), Ok(next_seq), "the torn line was cut and its seq reused");
    let v = verify_log(&log, &gw.dir.path().join("audit.key"));
    assert_eq!(v.first_seq, 0);
    assert_acknowledged_writes_recorded(&answers, &read_all(&log));
}

// ---------------------------------------------------------------------------------------------
// A removed log file is noticed and the chain continues in a new one.

#[tokio::test]
async fn removed_log_file_is_noticed_and_the_chain_continues() {
    let mut gw = TestGateway::start_with(|c| c.audit.checkpoint_interval_secs = 3600).await;
    let log = gw.config.audit.path.clone();
    let mut c = gw.client(ADMIN).await;
    for i in 0..5 {
        c.put(put(&format!("/removed/k{i}"), b"v")).await.unwrap();
    }
    // No request is in flight and no checkpoint is due: the file is quiet while it goes.
    let before = std::fs::read(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(request_id(c.put(put(&format!("/removed/n{i}"), b"v")).await.unwrap().metadata()));
    }

    let lines = read_log(&log);
    let (_, first) = &lines[0];
    let last_before = before.strip_suffix(b"\n").unwrap().rsplit(|b| *b == b'\n').next().unwrap();
    let last_seq = Record::parse(last_before).unwrap().seq;
    assert_eq!(first.kind(), Kind::Continue, "{first:?}");
    assert!(first.reason.as_deref().is_some_and(|r| r.contains("removed")), "{first:?}");
    assert_eq!((first.seq, first.prev.as_str()), (last_seq + 1, line_hash(last_before).as_str()));
    for id in &ids {
        let outcome = lines
            .iter()
            .any(|(_, r)| r.request_id.as_deref() == Some(id) && r.phase == Some(Phase::Outcome));
        assert!(outcome, "the outcome of {id} is in the new file");
    }

    drop(c);
    gw.stop().await;
    let saved = gw.dir.path().join("saved-before-removal.log");
    std::fs::write(&saved, &before).unwrap();
    let key = VerifyingKey::load(&pub_path(&gw.config.audit.signing_key)).unwrap();
    let v = verify_files(&[log.clone(), saved], Some(&key), None)
        .unwrap_or_else(|e| panic!("the saved and the new file are one chain: {e}"));
    assert_eq!((v.first_seq, v.records), (0, v.last_seq + 1));
}

// ---------------------------------------------------------------------------------------------
// Rotation continues the chain across files.

#[tokio::test]
async fn rotation_continues_the_chain_across_files() {
    const MAX: u64 = 65536;
    let mut gw = TestGateway::start_with(|c| c.audit.max_file_bytes = MAX).await;
    let log = gw.config.audit.path.clone();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(gw.client(ADMIN).await);
    }
    let load = Load::start(clients);
    let deadline = Instant::now() + Duration::from_secs(60);
    while log_files(&log).len() < 3 {
        assert!(Instant::now() < deadline, "the log did not rotate twice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.stop().await;
    gw.stop().await;

    let files = log_files(&log);
    let (rotated, active) = files.split_at(files.len() - 1);
    assert_eq!(active, std::slice::from_ref(&log));
    for (i, file) in rotated.iter().enumerate() {
        let name = file.file_name().unwrap().to_str().unwrap();
        let suffix = name.strip_prefix("audit.log.").unwrap();
        assert!(suffix.len() == 20 && suffix.bytes().all(|b| b.is_ascii_digit()), "{name}");
        let lines = read_log(file);
        let (first, last) = (&lines[0].1, &lines[lines.len() - 1].1);
        assert_eq!(first.seq, suffix.parse::<u64>().unwrap(), "{name} is named by its first seq");
        let want = if i == 0 { Kind::Genesis } else { Kind::Continue };
        assert_eq!(first.kind(), want, "{name}");
        assert_eq!(last.kind(), Kind::Checkpoint, "{name} ends with a checkpoint");
        assert!(std::fs::metadata(file).unwrap().len() >= MAX, "{name} rotated early");
    }
    for file in rotated.iter().skip(1).chain(active) {
        let first = &read_log(file)[0].1;
        assert_eq!(first.reason.as_deref(), Some("rotation"), "{}", file.display());
    }
    let v = verify_log(&log, &gw.config.audit.signing_key);
    let total: usize = files.iter().map(|f| read_log(f).len()).sum();
    assert_eq!((v.first_seq, v.records), (0, total as u64));
    assert_eq!(v.last_signed_seq, Some(v.last_seq), "the final checkpoint signs everything");
}

// ---------------------------------------------------------------------------------------------
// A log cut short is refused at start.

#[tokio::test]
async fn a_log_cut_short_is_refused_at_start() {
    let mut gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    for i in 0..5 {
        c.put(put(&format!("/cut/k{i}"), b"v")).await.unwrap();
    }
    drop(c);
    // An untouched log starts again: the refusal below is about the cut, nothing else.
    gw.restart().await;
    gw.stop().await;

    let log = gw.config.audit.path.clone();
    let lines = read_log(&log);
    let (_, final_checkpoint) = lines.last().unwrap();
    assert_eq!(final_checkpoint.kind(), Kind::Checkpoint);
    let kept = &lines[..lines.len() - 3];
    let text: String = kept.iter().map(|(l, _)| format!("{l}\n")).collect();
    std::fs::write(&log, text).unwrap();

    let err = refused_at_start(&gw.config, "a gateway started on a log cut short").await;
    let last_kept = kept.last().unwrap().1.seq;
    assert!(err.contains("cut short"), "{err}");
    assert!(err.contains(&format!("ends at seq {last_kept} ")), "{err}");
    assert!(err.contains(&format!("checkpoint at seq {}", final_checkpoint.seq)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// A deleted log, or a foreign signing key, is refused at start.

#[tokio::test]
async fn a_deleted_log_is_refused_at_start_until_a_new_log_is_asked_for() {
    let mut gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    c.put(put("/gone/k", b"v")).await.unwrap();
    drop(c);
    gw.stop().await;
    let old = read_log(&gw.config.audit.path);
    let (old_id, old_last) = (old[0].1.log_id.clone().unwrap(), old.last().unwrap().1.seq);
    delete_log(&gw.config.audit.path);

    let err =
        refused_at_start(&gw.config, "a gateway began a new log in place of a deleted one").await;
    assert!(err.contains("no audit log here"), "{err}");
    assert!(err.contains(&format!("{old_id} (seq {old_last})")), "{err}");
    assert!(err.contains("audit.new_log"), "{err}");
    let dir = gw.config.audit.path.parent().unwrap();
    assert!(files_under(dir).is_empty(), "the refusal wrote a log: {:?}", files_under(dir));

    // Asked for, a new log begins, and its genesis names the one left behind.
    gw.config.audit.new_log = true;
    gw.start_again().await;
    gw.stop().await;
    let new = read_log(&gw.config.audit.path);
    let genesis = &new[0].1;
    assert_eq!(genesis.kind(), Kind::Genesis);
    assert_ne!(genesis.log_id.as_deref(), Some(old_id.as_str()));
    let note = genesis.reason.as_deref().unwrap_or_default();
    assert!(note.contains(&format!("{old_id} (seq {old_last})")), "{note}");
    verify_log(&gw.config.audit.path, &gw.config.audit.signing_key);

    // The new log now continues without the setting.
    gw.config.audit.new_log = false;
    gw.start_again().await;
    gw.stop().await;
    let again = read_log(&gw.config.audit.path);
    assert_eq!(again[0].0, new[0].0, "the same log continues");
    assert!(again.len() > new.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_an_etcd_store_each_keep_their_own_log() {
    let cluster = EtcdCluster::start().await;
    let mut one = TestGateway::start_with(|c| cluster.configure(c, "/sg-replicas/", 5000)).await;
    let mut c = one.client(ADMIN).await;
    c.put(put("/replicas/k", b"v")).await.unwrap();
    drop(c);
    one.stop().await;
    // A second replica (its own log and signing key) begins its log, though the store
    // keeps the first one's checkpoint.
    let mut two = TestGateway::start_with(|c| cluster.configure(c, "/sg-replicas/", 5000)).await;
    two.stop().await;
    assert_eq!(read_log(&two.config.audit.path)[0].1.kind(), Kind::Genesis);
    // The first replica's log deleted: the store remembers it, by its key.
    delete_log(&one.config.audit.path);
    let err =
        refused_at_start(&one.config, "a replica began a new log in place of its deleted one")
            .await;
    assert!(err.contains("no audit log here"), "{err}");
    // The second replica goes on with its own.
    two.start_again().await;
    two.stop().await;
}

#[tokio::test]
async fn a_signing_key_that_is_not_the_logs_own_is_refused_at_start() {
    let mut gw = TestGateway::start().await;
    gw.stop().await;
    let before = std::fs::read(&gw.config.audit.path).unwrap();
    let other = SigningKey::generate().unwrap();
    std::fs::remove_file(&gw.config.audit.signing_key).unwrap();
    let _ = std::fs::remove_file(pub_path(&gw.config.audit.signing_key));
    other.save(&gw.config.audit.signing_key).unwrap();

    let err =
        refused_at_start(&gw.config, "a gateway signed a log's checkpoints with another key").await;
    assert!(err.contains("not this log's key"), "{err}");
    assert!(err.contains(&other.verifying_key().to_string()), "{err}");
    assert_eq!(std::fs::read(&gw.config.audit.path).unwrap(), before, "the log was written");
}

// ---------------------------------------------------------------------------------------------
// Helpers (the harness is in support/audit.rs).

/// Starts a gateway on `config`, which must be refused (else panics with `what`); returns
/// the error.
async fn refused_at_start(config: &secretgate::Config, what: &str) -> String {
    match Gateway::start(config).await {
        Ok(_) => panic!("{what}"),
        Err(e) => e.to_string(),
    }
}

/// Deletes every file of the log whose active file is `active`.
fn delete_log(active: &Path) {
    for f in log_files(active) {
        std::fs::remove_file(f).unwrap();
    }
}

fn put(path: &str, value: &[u8]) -> PutRequest {
    PutRequest { path: path.into(), value: value.to_vec(), expected_version: None }
}

fn get(path: &str) -> GetRequest {
    GetRequest { path: path.into(), version: None }
}

/// SHA-256 of the certificate's DER, hex: what the gateway calls its fingerprint.
fn fingerprint(pem: &Pem) -> String {
    hex::encode(Sha256::digest(CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap()))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Every put the client saw acknowledged has an intent record and, after it, an OK outcome
/// record with the same version.
fn assert_acknowledged_writes_recorded(answers: &[Answer], records: &[Record]) {
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
