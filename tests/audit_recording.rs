//! The audit log records every request with its facts (principal, certificate, decision and
//! rule, status, version, key), counts floods of refused handshakes instead of recording each,
//! and never holds a secret value, in any encoding.

use secretgate_testkit as support;

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use secretgate::{
    audit::{
        Kind, Phase, Record, VerifyingKey,
        record::{GENESIS_PREV, line_hash},
        signing::pub_path,
    },
    proto::v1::{
        DeleteRequest, ListRequest, PutRequest, VersionsRequest, WhoAmIRequest,
        secrets_client::SecretsClient,
    },
    testing::Keyring,
};
use support::{
    Ca, TestGateway,
    audit::{
        ServedGateway, contains, files_under, fingerprint, get, put, random_hex, read_log,
        request_id, verify_log,
    },
};
use tonic::Code;

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";

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
        (h.decision.map(|d| d.as_str()), h.status.as_deref()),
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
                r.action.map(|a| a.as_str()),
                r.decision.map(|d| d.as_str()),
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
