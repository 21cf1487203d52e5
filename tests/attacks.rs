//! Attacks from the outside review (issue 16), each through the real front door (real mTLS on
//! a real gateway, or the real log files and the real CLI), asserting the precise outcome.

use std::process::{Command, Output};

use rcgen::{DnType, ExtendedKeyUsagePurpose, SanType};
use secretgate::{
    Reloaded,
    config::Ranged,
    proto::v1::{GetRequest, KeyStatusRequest, KeyStatusResponse, ListRequest, PutRequest},
};
use secretgate_testkit::{
    TestGateway,
    audit::{Load, log_files},
    h2_settings,
};
use tonic::{Code, codegen::http::uri::PathAndQuery};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_prost::ProstCodec;

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";
const BIN: &str = env!("CARGO_BIN_EXE_secretgate");

/// A path that clears the screen, forges an audit row and retitles the terminal.
const INJECTION: &str = "/x\x1b[2J\x1b[H\r\nseq 1 2026-01-01T00:00:00.000Z spiffe://test.example/admin \
    secretgate.v1.Secrets/Put /root/key write allow OK 1\x1b]0;pwned\x07";

/// Bytes a person's terminal would act on: C0 controls but the line feed, DEL, C1 controls.
fn terminal_controls(out: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(out);
    let mut found: Vec<u8> = text
        .chars()
        .filter(|c| *c != '\n' && c.is_control())
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(0xff))
        .collect();
    found.dedup();
    found
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_query_and_tail_show_a_hostile_path_escaped_on_one_row() {
    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    let get = c.get(GetRequest { path: INJECTION.into(), version: None }).await.unwrap_err();
    assert_eq!(get.code(), Code::InvalidArgument, "{get:?}");
    let put = PutRequest { path: INJECTION.into(), value: b"v".to_vec(), expected_version: None };
    assert_eq!(c.put(put).await.unwrap_err().code(), Code::InvalidArgument);

    // The record keeps the path as sent (for the auditor); the table must not replay it.
    let active = gw.config.audit.path.clone();
    let files: Vec<String> = log_files(&active).iter().map(|p| p.display().to_string()).collect();
    let mut query = vec!["audit", "query", "--status", "INVALID_ARGUMENT"];
    query.extend(files.iter().map(String::as_str));
    let tail = ["audit", "tail", "--no-follow", "-n", "100", active.to_str().unwrap()];
    for (what, out) in [("query", run(&query)), ("tail", run(&tail))] {
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(terminal_controls(&out.stdout), [] as [u8; 0], "{what} printed controls");
        let table = String::from_utf8(out.stdout).unwrap();
        let rows: Vec<&str> = table.lines().filter(|l| l.contains("/x\\u{1b}[2J")).collect();
        // One row per refused request, each whole: the forged "row" stays inside its path.
        assert_eq!(rows.len(), 2, "{what}:\n{table}");
        assert!(rows.iter().all(|r| r.contains("\\r\\nseq 1 ") && r.contains("INVALID_ARGUMENT")));
        assert!(!table.lines().any(|l| l.starts_with("seq 1 ")), "{what} forged a row:\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_escapes_a_value_for_a_terminal_and_pipes_it_exactly() {
    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    let value = b"line one\n\x1b]0;pwned\x07\x1b[2J\rtwo\xff";
    let put =
        PutRequest { path: "/app/hostile".into(), value: value.to_vec(), expected_version: None };
    c.put(put).await.unwrap();
    let mut args: Vec<String> = vec!["get".into(), "/app/hostile".into()];
    args.extend(gw.cli_args(ADMIN));

    // Through a pipe: the exact bytes, nothing added.
    let piped = Command::new(BIN).args(&args).output().unwrap();
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    assert_eq!(piped.stdout, value);

    // On a terminal (a pseudo-terminal from script(1)): escaped, lines kept, a line end.
    let command = std::iter::once(BIN.to_owned()).chain(args).collect::<Vec<_>>().join(" ");
    let tty = Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
    assert!(tty.status.success(), "{}", String::from_utf8_lossy(&tty.stderr));
    // The terminal turns each "\n" into "\r\n"; nothing else may reach it unescaped.
    let shown = String::from_utf8_lossy(&tty.stdout).replace("\r\n", "\n");
    assert_eq!(shown, "line one\n\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\rtwo\\xff\n");
}

#[tokio::test]
async fn the_gateway_advertises_its_stream_limit_per_connection() {
    let gw = TestGateway::start().await;
    let settings = h2_settings(gw.addr(), &gw.ca.cert_pem, &gw.ca.client(ADMIN)).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3): the configured default, 100.
    let limit = settings.iter().find(|(id, _)| *id == 0x3).map(|(_, v)| *v);
    assert_eq!(limit, Some(100), "settings {settings:?}");
    let gw =
        TestGateway::start_with(|c| c.limits.max_streams_per_connection = Ranged::of::<7>()).await;
    let settings = h2_settings(gw.addr(), &gw.ca.cert_pem, &gw.ca.client(ADMIN)).await;
    assert!(settings.contains(&(0x3, 7)), "settings {settings:?}");
}

#[tokio::test]
async fn a_large_request_to_health_or_admin_is_refused_before_it_is_decoded() {
    let gw = TestGateway::start().await;
    const BIG: usize = 3 << 20;
    let channel = gw.channel(&gw.ca.client(READER)).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let err = health.check(HealthCheckRequest { service: "x".repeat(BIG) }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Admin/KeyStatus from a principal that may not use Admin: refused for its size before it
    // is decoded (its bytes are a PutRequest: to KeyStatus, unknown fields to skip).
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let body = PutRequest { path: "/x".into(), value: vec![7; BIG], expected_version: None };
    let path = PathAndQuery::from_static("/secretgate.v1.Admin/KeyStatus");
    let codec = ProstCodec::<PutRequest, KeyStatusResponse>::default();
    let err = grpc.unary(tonic::Request::new(body), path, codec).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // A small one from the same principal is decoded, then refused by the policy.
    let mut admin = gw.admin(READER).await;
    let denied = admin.key_status(KeyStatusRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
}

#[tokio::test]
async fn names_a_policy_cannot_write_are_refused_in_the_handshake() {
    let gw = TestGateway::start().await;
    // A SPIFFE ID with a trailing slash (not a SPIFFE ID; it would read as the trust domain's
    // own ID in a policy) and a CN with a comma (policy.csv separates fields with commas).
    let slash = gw.ca.issue(|p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://test.example/".try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let comma = gw.ca.issue(|p| {
        p.distinguished_name.push(DnType::CommonName, "backup, spiffe://test.example/admin");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    for (what, id) in [("trailing slash", &slash), ("comma", &comma)] {
        let err = gw.probe(Some(id), false).await.expect_err(what);
        assert!(err.contains("received fatal alert: CertificateUnknown"), "{what}: {err}");
    }
    gw.probe(Some(&gw.ca.client(ADMIN)), false).await.unwrap();
}

#[tokio::test]
async fn a_keyring_made_readable_by_others_is_noticed_while_running() {
    use std::os::unix::fs::PermissionsExt;
    let gw = TestGateway::start().await;
    let keyring = gw.config.crypto.keyring.clone();
    let mut c = gw.client(ADMIN).await;
    c.put(PutRequest { path: "/k".into(), value: b"v".to_vec(), expected_version: None })
        .await
        .unwrap();
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error =
        gw.refused_reload(Reloaded::Keyring, "must not be readable by group or others").await;
    assert!(error.contains("0644"), "{error}");
    // Operators see it in KeyStatus; the keyring in force stays, so reads go on.
    let mut admin = gw.admin(ADMIN).await;
    let status = admin.key_status(KeyStatusRequest {}).await.unwrap().into_inner();
    assert!(status.reload_error.contains("chmod 600"), "{}", status.reload_error);
    let got = c.get(GetRequest { path: "/k".into(), version: None }).await.unwrap();
    assert_eq!(got.into_inner().value, b"v");
    // Private again: the refusal clears.
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !admin.key_status(KeyStatusRequest {}).await.unwrap().into_inner().reload_error.is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "the refusal did not clear");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn list_page_tokens_tell_nothing_about_hidden_names() {
    let gw = TestGateway::start().await;
    let mut admin = gw.client(ADMIN).await;
    // More hidden names than one List call looks at for a page of one (ten), and a few the
    // reader may see.
    let hidden = (0..12).map(|i| format!("/apps/payments/prod/db-{i}"));
    let shared = ["/shared/a", "/shared/b-with-a-much-longer-name-than-the-first", "/shared/c"];
    for path in hidden.chain(shared.map(String::from)) {
        let put = PutRequest { path, value: b"v".to_vec(), expected_version: None };
        admin.put(put).await.unwrap();
    }
    let list = |prefix: &str, token: &str| ListRequest {
        prefix: prefix.into(),
        page_size: 1,
        page_token: token.into(),
    };

    // No grant under the prefix: the same empty last page whether names hide there or not.
    let mut stranger = gw.client("spiffe://test.example/stranger").await;
    for prefix in ["/apps/payments/prod", "/apps/none"] {
        let page = stranger.list(list(prefix, "")).await.unwrap().into_inner();
        assert_eq!((page.paths.len(), page.next_page_token.as_str()), (0, ""), "{prefix}");
    }

    // Tokens of one caller and prefix have one size, whatever path they stop at.
    let mut reader = gw.client(READER).await;
    let first = reader.list(list("/shared", "")).await.unwrap().into_inner();
    assert_eq!(first.paths, ["/shared/a"]);
    let second = reader.list(list("/shared", &first.next_page_token)).await.unwrap().into_inner();
    assert_eq!(second.paths, ["/shared/b-with-a-much-longer-name-than-the-first"]);
    assert_eq!(first.next_page_token.len(), second.next_page_token.len());

    // A token opens only for its caller and its prefix; every mismatch gets one error.
    let token = &second.next_page_token;
    let mut refusals = Vec::new();
    for (who, prefix) in [(ADMIN, "/shared"), (READER, "/"), (READER, "/apps")] {
        let err = gw.client(who).await.list(list(prefix, token)).await.unwrap_err();
        refusals.push((err.code(), err.message().to_owned()));
    }
    assert!(refusals.iter().all(|r| r.0 == Code::InvalidArgument), "{refusals:?}");
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_oldest_log_files_fails_verification_unless_accepted() {
    let mut gw = TestGateway::start_with(|c| c.audit.max_file_bytes = Ranged::of::<65536>()).await;
    let log = gw.config.audit.path.clone();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(gw.client(ADMIN).await);
    }
    let load = Load::start(clients);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while log_files(&log).len() < 4 {
        assert!(std::time::Instant::now() < deadline, "the log did not rotate three times");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    load.stop().await;
    gw.stop().await;
    let pubkey = secretgate::audit::signing::pub_path(&gw.config.audit.signing_key);
    let verify = |extra: &[&str]| {
        let files = log_files(&log);
        Command::new(BIN)
            .args(["audit", "verify", "--pubkey"])
            .arg(&pubkey)
            .args(extra)
            .args(&files)
            .env_remove("SECRETGATE_OUTPUT")
            .output()
            .unwrap()
    };
    let whole = verify(&[]);
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stdout));

    // The two oldest files go: every record they held is gone with them.
    for old in &log_files(&log)[..2] {
        std::fs::remove_file(old).unwrap();
    }
    let cut = verify(&[]);
    let report = String::from_utf8_lossy(&cut.stdout);
    assert_eq!(cut.status.code(), Some(1), "{report}");
    assert!(report.starts_with("INCOMPLETE: the chain starts at seq "), "{report}");
    // An auditor who knows the files were removed on purpose (retention) says so.
    let accepted = verify(&["--from-continue"]);
    let report = String::from_utf8_lossy(&accepted.stdout);
    assert!(accepted.status.success(), "{report}");
    assert!(report.contains("a continue record"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_dripping_connections_do_not_lock_out_a_real_client() {
    use std::time::{Duration, Instant};
    use tokio::{io::AsyncWriteExt, net::TcpSocket};
    let gw = TestGateway::start_with(|c| {
        c.limits.max_connections = Ranged::of::<8>();
        c.limits.max_handshakes = Ranged::of::<16>();
        c.limits.max_handshakes_per_source = Ranged::of::<8>();
    })
    .await;
    let addr = gw.addr();
    let from = move |ip: &str| {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(addr)
    };
    // More than the budget plus the cap: silent connections from the client's own address
    // and from many others, and a few that drip a ClientHello a byte at a time.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(from("127.0.0.1").await.unwrap());
    }
    for n in 2..22 {
        held.push(from(&format!("127.0.0.{n}")).await.unwrap());
    }
    let drip_until = Instant::now() + Duration::from_secs(8);
    let drips: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(mut tcp) = from("127.0.0.1").await else { return };
                // A TLS record header, then one byte a second (bounded: stops by itself).
                for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc] {
                    if Instant::now() > drip_until || tcp.write_all(&[byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        })
        .collect();

    // A real client from the same address as most of the flood gets answers at once.
    for _ in 0..3 {
        let started = Instant::now();
        let mut c = secretgate::proto::v1::secrets_client::SecretsClient::new(
            gw.channel(&gw.ca.client(ADMIN)).await.expect("connected despite the flood"),
        );
        let me = c.who_am_i(secretgate::proto::v1::WhoAmIRequest {}).await.unwrap();
        assert_eq!(me.into_inner().principal, ADMIN);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "answered after {took:?}");
    }
    drop(held);
    for d in drips {
        d.abort();
    }
}
