//! Limits on what one caller can use (issue 16): per-identity rate limits, the memory of
//! requests in flight, idle connections, and the PROXY protocol from load balancers. Each
//! test reproduces the abuse through the real front door (real mTLS on a real gateway) and
//! asserts the precise outcome.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use secretgate::{
    Reloaded,
    audit::Kind,
    config::{IpNet, Ranged},
    proto::v1::{GetRequest, PutRequest, WhoAmIRequest},
};
use secretgate_testkit::{Pem, TEST_POLICY, TestGateway, audit::read_all, h2, write};
use tonic::Code;
use tonic_types::StatusExt;

const ADMIN: &str = "spiffe://test.example/admin";
const WRITER: &str = "spiffe://test.example/writer";
const READER: &str = "spiffe://test.example/reader";

const LIMITS: &str = r#"
[principal."spiffe://test.example/reader"]
read = { per_second = 1, burst = 5 }

# admin and writer are both members: 3 writes, then one a second, for the two together.
[role."role:admin"]
write = { per_second = 1, burst = 3 }
"#;

async fn policy_version(gw: &TestGateway) -> String {
    let mut admin = gw.client(ADMIN).await;
    admin.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner().policy_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_principal_is_throttled_with_retry_info_and_counted_not_recorded() {
    let mut gw = TestGateway::start_with(|c| {
        write(&c.authz.policies, "rate_limits.toml", LIMITS);
    })
    .await;
    let mut admin = gw.client(ADMIN).await;
    let mut reader = gw.client(READER).await;
    let get = || GetRequest { path: "/shared/db".into(), version: None };

    // The reader's burst of 5 goes through (a token a second may come back meanwhile)...
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(reader.get(get()).await);
    }
    let refused: Vec<&tonic::Status> = answers
        .iter()
        .filter_map(|a| a.as_ref().err())
        .filter(|s| s.code() == Code::ResourceExhausted)
        .collect();
    let passed = answers.len() - refused.len();
    assert!((5..=6).contains(&passed), "{passed} of 20 passed a burst of 5");
    let status = refused[0];
    assert!(
        status.message().starts_with(
            "rate limit: spiffe://test.example/reader is over its limit of 1/s (burst 5) for \
             read requests on this gateway replica; retry in "
        ),
        "{}",
        status.message()
    );
    let retry = status.get_details_retry_info().expect("a google.rpc.RetryInfo detail");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(1), "{delay:?}");
    // ... while another principal, without a read limit, is not held back by it.
    for _ in 0..20 {
        let answer = admin.get(get()).await;
        assert_eq!(answer.unwrap_err().code(), Code::NotFound);
    }

    // A role's limit is shared by its members: 3 writes between admin and writer.
    let mut writer = gw.client(WRITER).await;
    let put = |n: u32| PutRequest {
        path: format!("/apps/w{n}"),
        value: b"v".to_vec(),
        expected_version: None,
    };
    admin.put(put(1)).await.unwrap();
    admin.put(put(2)).await.unwrap();
    writer.put(put(3)).await.unwrap();
    let over = writer.put(put(4)).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert!(over.message().contains("(shared by role role:admin)"), "{}", over.message());

    // A broken limits file is refused at reload, naming its line; the limits stay.
    let before = policy_version(&gw).await;
    write(
        &gw.config.authz.policies,
        "rate_limits.toml",
        "[default]\nread = { per_second = -1, burst = 1 }\n",
    );
    let error = gw.refused_reload(Reloaded::Policy, "rate_limits.toml:2").await;
    assert!(error.contains("per_second must be more than 0"), "{error}");
    // The old limits stay: the tokens earned while the reload was refused run out again.
    let mut still_refused = 0;
    for _ in 0..8 {
        let code = reader.get(get()).await.unwrap_err().code();
        still_refused += u64::from(code == Code::ResourceExhausted);
    }
    assert!(still_refused >= 1, "the refused file took the limits away");
    // A good one is in force at the next reload, without a restart.
    let raised = "[principal.\"spiffe://test.example/reader\"]\nread = { per_second = 1000, burst = 1000 }\n";
    write(&gw.config.authz.policies, "rate_limits.toml", raised);
    let deadline = Instant::now() + Duration::from_secs(10);
    while policy_version(&gw).await == before {
        assert!(Instant::now() < deadline, "the new limits were not loaded within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reader.get(get()).await.unwrap_err().code(), Code::NotFound);

    // The refusals are in the log as one count per principal, not one record each.
    let reader_refused = refused.len() as u64 + still_refused;
    gw.stop().await;
    let records = read_all(&gw.config.audit.path);
    let counts: Vec<(Option<&str>, Option<u64>)> = records
        .iter()
        .filter(|r| r.kind == Kind::RateLimit)
        .map(|r| (r.principal.as_deref(), r.refused))
        .collect();
    assert_eq!(counts.len(), 2, "one count for the reader, one for the writer: {counts:?}");
    assert!(counts.contains(&(Some(READER), Some(reader_refused))), "{counts:?}");
    assert!(counts.contains(&(Some(WRITER), Some(1))), "{counts:?}");
    let one_by_one = records
        .iter()
        .filter(|r| r.status.as_deref() == Some("RESOURCE_EXHAUSTED") && r.kind == Kind::Request)
        .count();
    assert_eq!(one_by_one, 0, "refused requests are counted, not recorded one by one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_large_requests_cannot_hold_more_than_the_request_memory_budget() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_value_bytes = Ranged::of::<{ 256 * 1024 }>();
        c.limits.max_request_memory_mib = Ranged::of::<4>();
        c.limits.request_timeout_secs = Ranged::of::<60>();
    })
    .await;
    let admin = gw.ca.client(ADMIN);
    let mut conn = h2::connect(gw.addr(), &gw.ca.cert_pem, &admin, b"").await.unwrap();
    // 100 Puts each sending 80 kB of a message that claims 100 kB, never finished: 8 MB
    // wanted, 4 MiB allowed.
    let chunk = h2::frame(&[b'x'; 80_000], 100_000);
    let mut streams = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..100 {
        let req = h2::request("/secretgate.v1.Secrets/Put");
        let (response, mut body) = conn.send.send_request(req, false).unwrap();
        body.reserve_capacity(chunk.len());
        body.send_data(chunk.clone(), false).unwrap();
        streams.push(body);
        responses.push(tokio::spawn(h2::status(response, Duration::from_secs(5))));
    }
    let mut answers = Vec::new();
    for r in responses {
        answers.push(r.await.unwrap());
    }
    let refused = answers.iter().flatten().filter(|(code, ..)| *code == 8).count();
    let unanswered = answers.iter().filter(|a| a.is_none()).count();
    let held = unanswered * 80_005;
    assert!(refused >= 48, "{refused} of 100 refused; {unanswered} held");
    assert!(held <= 4 << 20, "{held} bytes held in unfinished requests");
    let (_, message, _) = answers.iter().flatten().find(|(c, ..)| *c == 8).unwrap();
    assert!(message.contains("limits.max_request_memory_mib"), "{message}");

    // Once the connection is gone its bytes come back: a large request goes through.
    drop(streams);
    conn.conn.abort();
    drop(conn);
    let mut client = gw.client(ADMIN).await;
    let big =
        PutRequest { path: "/big".into(), value: vec![b'v'; 250_000], expected_version: None };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.put(big.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("the budget did not come back: {s}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_not_while_a_stream_is_open() {
    let gw = TestGateway::start_with(|c| {
        c.limits.idle_connection_timeout_secs = Ranged::of::<1>();
    })
    .await;
    let admin = gw.ca.client(ADMIN);

    // A: one request, then nothing: closed after the idle timeout.
    let mut a = h2::connect(gw.addr(), &gw.ca.cert_pem, &admin, b"").await.unwrap();
    let response = h2::unary(&mut a, "/secretgate.v1.Secrets/WhoAmI", &[]);
    assert_eq!(h2::status(response, Duration::from_secs(5)).await.map(|s| s.0), Some(0));
    let idle_from = Instant::now();
    // B: a stream left open (an unfinished Put) keeps its connection.
    let mut b = h2::connect(gw.addr(), &gw.ca.cert_pem, &admin, b"").await.unwrap();
    let message = prost::Message::encode_to_vec(&PutRequest {
        path: "/kept".into(),
        value: b"v".to_vec(),
        expected_version: None,
    });
    let (b_response, mut b_body) =
        b.send.send_request(h2::request("/secretgate.v1.Secrets/Put"), false).unwrap();
    let whole = h2::frame(&message, message.len() as u32);
    b_body.send_data(whole.slice(..4), false).unwrap();

    let closed = tokio::time::timeout(Duration::from_secs(10), &mut a.conn).await;
    assert!(closed.is_ok(), "an idle connection was not closed within 10 s");
    assert!(idle_from.elapsed() >= Duration::from_millis(900), "closed before its timeout");
    // Two more idle timeouts later, B (with its stream open) is still served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!b.conn.is_finished(), "a connection with an open stream was closed");
    b_body.send_data(whole.slice(4..), true).unwrap();
    let answer = h2::status(b_response, Duration::from_secs(5)).await;
    assert_eq!(answer.map(|s| s.0), Some(0), "the stream finished on the kept connection");
    let closed = tokio::time::timeout(Duration::from_secs(10), &mut b.conn).await;
    assert!(closed.is_ok(), "B was not closed once idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_balancer_names_the_client_and_nobody_else_can() {
    let mut gw = TestGateway::start_with(|c| {
        c.proxy_protocol_from = vec![IpNet::try_from("127.0.0.1".to_owned()).unwrap()];
    })
    .await;
    let admin: Pem = gw.ca.client(ADMIN);
    let (addr, ca) = (gw.addr(), gw.ca.cert_pem.clone());
    let client: SocketAddr = "192.0.2.77:5555".parse().unwrap();
    let header = secretgate::testing::proxy_header(Some(client), addr);

    // From the balancer, with a header: served, as the client it names.
    let mut lb =
        h2::connect(addr, &ca, &admin, &header).await.expect("served through the balancer");
    let response = h2::unary(&mut lb, "/secretgate.v1.Secrets/WhoAmI", &[]);
    assert_eq!(h2::status(response, Duration::from_secs(5)).await.map(|s| s.0), Some(0));
    // The balancer's own health check (LOCAL) is served as the balancer.
    let local = secretgate::testing::proxy_header(None, addr);
    assert!(h2::connect(addr, &ca, &admin, &local).await.is_ok());
    // From the balancer without a header: refused.
    assert!(h2::connect(addr, &ca, &admin, b"").await.is_err());
    // From anyone else, a header is not read: the handshake fails on it.
    let forged = secretgate::testing::proxy_header(Some("198.51.100.9:1".parse().unwrap()), addr);
    let other = "127.0.0.2".parse().unwrap();
    assert!(h2::connect_from(other, addr, &ca, &admin, &forged).await.is_err());
    assert!(h2::connect_from(other, addr, &ca, &admin, b"").await.is_ok());

    drop(lb);
    gw.stop().await;
    let records = read_all(&gw.config.audit.path);
    let who = records
        .iter()
        .find(|r| r.method.as_deref() == Some("secretgate.v1.Secrets/WhoAmI"))
        .expect("the WhoAmI record");
    assert_eq!(who.peer.as_deref(), Some("192.0.2.77:5555"));
    let refusals: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == Kind::Handshake)
        .filter_map(|r| r.reason.as_deref())
        .collect();
    assert!(refusals.iter().any(|r| r.contains("no PROXY protocol v2 header")), "{refusals:?}");
    let lines = std::fs::read_to_string(&gw.config.audit.path).unwrap();
    assert!(!lines.contains("198.51.100.9"), "a forged address reached the log");
}

#[test]
fn the_example_policy_directory_with_its_rate_limits_loads() {
    let dir = tempfile::tempdir().unwrap();
    secretgate_testkit::write_policy(dir.path(), TEST_POLICY);
    write(dir.path(), "rate_limits.toml", LIMITS);
    secretgate::authz::Policy::load(dir.path()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_sent_away_at_their_maximum_age() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_connection_age_secs = Ranged::of::<1>();
    })
    .await;
    let admin = gw.ca.client(ADMIN);
    let opened = Instant::now();
    let mut conn = h2::connect(gw.addr(), &gw.ca.cert_pem, &admin, b"").await.unwrap();
    let response = h2::unary(&mut conn, "/secretgate.v1.Secrets/WhoAmI", &[]);
    assert_eq!(h2::status(response, Duration::from_secs(5)).await.map(|s| s.0), Some(0));
    // The server says GOAWAY after the age; the connection then ends, and the client
    // reconnects (to any replica behind a balancer).
    let ended = tokio::time::timeout(Duration::from_secs(10), &mut conn.conn).await;
    assert!(ended.is_ok(), "the connection outlived its maximum age by 9 s");
    assert!(opened.elapsed() >= Duration::from_millis(900), "closed before its age");
}
