//! The Prometheus endpoint (issue 19): scraped after real traffic through the mTLS front
//! door, every listed family present, no principal or path in any label, the exposition
//! accepted by `promtool check metrics`, degraded states visible while health stays
//! SERVING, and TLS on the metrics listener.

use std::{
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use secretgate::{Reloaded, proto::v1::GetRequest, proto::v1::PutRequest};
use secretgate_testkit::{TestGateway, http_get, http_get_with, write};

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";
const PATH: &str = "/team-payments/db-password";

fn on(c: &mut secretgate::config::Config) {
    c.metrics.listen = "127.0.0.1:0".into();
}

/// The body of `GET /metrics` (panics on a status other than 200).
async fn scrape(addr: SocketAddr, ca: Option<&str>) -> String {
    let response = http_get(addr, "/metrics", ca).await;
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `name` (with its labels as written), if the exposition has it.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `promtool check metrics` on `body`: its exit status and what it printed.
fn promtool(body: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `make deps` installs it)");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_traffic_has_every_family_and_passes_promtool() {
    let gw = TestGateway::start_with(on).await;
    let addr = gw.metrics_addr().expect("metrics on");
    let mut admin = gw.client(ADMIN).await;
    let mut watch = secretgate_testkit::watch::Watch::open(&mut admin, "/", 0).await.unwrap();
    let put = PutRequest { path: PATH.into(), value: b"hunter2".to_vec(), expected_version: None };
    admin.put(put).await.unwrap();
    watch.events(1, std::time::Duration::from_secs(2)).await;
    admin.get(GetRequest { path: PATH.into(), version: None }).await.unwrap();
    let mut reader = gw.client(READER).await;
    let denied = reader.get(GetRequest { path: PATH.into(), version: None }).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    // A handshake without a client certificate is refused.
    assert!(gw.probe(None, false).await.is_err());

    let body = scrape(addr, None).await;
    for family in [
        "secretgate_requests_total{method=\"secretgate.v1.Secrets/Get\",code=\"OK\"}",
        "secretgate_requests_total{method=\"secretgate.v1.Secrets/Get\",code=\"PERMISSION_DENIED\"}",
        "secretgate_requests_total{method=\"secretgate.v1.Secrets/Put\",code=\"OK\"}",
        "secretgate_request_duration_seconds_count{method=\"secretgate.v1.Secrets/Get\"}",
        "secretgate_authz_decisions_total{action=\"read\",result=\"allow\"}",
        "secretgate_authz_decisions_total{action=\"read\",result=\"deny\"}",
        "secretgate_authz_decisions_total{action=\"write\",result=\"allow\"}",
        "secretgate_audit_records_total",
        "secretgate_audit_fsync_duration_seconds_count",
        "secretgate_audit_write_failures_total",
        "secretgate_audit_fail_closed",
        "secretgate_store_request_duration_seconds_count{op=\"get\"}",
        "secretgate_store_request_duration_seconds_count{op=\"put\"}",
        "secretgate_etcd_write_request_puts_count",
        "secretgate_handshakes_refused_total{reason=\"tls\"}",
        "secretgate_store_cache_state{state=\"off\"}",
        "secretgate_reload_refused{what=\"policy\"}",
        "secretgate_policy_rules",
        "secretgate_server_cert_expiry_timestamp_seconds",
        "secretgate_open_connections",
        "secretgate_client_cert_soonest_expiry_timestamp_seconds",
        "secretgate_client_cert_remaining_lifetime_seconds_count",
        "secretgate_watch_events_total{result=\"sent\"}",
    ] {
        assert!(sample(&body, family).is_some(), "no sample {family} in:\n{body}");
    }
    assert!(
        sample(
            &body,
            "secretgate_requests_total{method=\"secretgate.v1.Secrets/Get\",code=\"OK\"}"
        ) >= Some(1.0)
    );
    assert!(sample(&body, "secretgate_audit_records_total") >= Some(4.0), "{body}");
    assert_eq!(sample(&body, "secretgate_audit_fail_closed"), Some(0.0));
    assert!(sample(&body, "secretgate_open_connections") >= Some(2.0), "{body}");
    assert_eq!(sample(&body, "secretgate_watch_streams"), Some(1.0), "{body}");
    for info in ["secretgate_keyring_info{", "secretgate_policy_info{", "secretgate_store_info{"] {
        assert!(body.contains(info), "no {info} in:\n{body}");
    }
    // Nothing a client chose or is: no principal, no path, no value.
    for secret in ["spiffe://", "team-payments", "hunter2", "db-password"] {
        assert!(!body.contains(secret), "{secret:?} in the metrics:\n{body}");
    }
    let (ok, said) = promtool(&body);
    assert!(ok, "promtool check metrics refused the exposition:\n{said}\n{body}");

    // What Prometheus asks for, it gets: OpenMetrics, counters named without `_total` in
    // their TYPE line, units, and the closing `# EOF`.
    let accept =
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
    let om = http_get_with(addr, "/metrics", None, accept).await;
    assert!(om.starts_with("HTTP/1.1 200"), "{om}");
    assert!(om.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{om}");
    assert!(om.contains("# TYPE secretgate_requests counter\n"), "{om}");
    assert!(om.contains("# UNIT secretgate_request_duration_seconds seconds\n"), "{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");

    let other = http_get(addr, "/", None).await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_shows_as_degraded_while_health_stays_serving() {
    let gw = TestGateway::start_with(on).await;
    let addr = gw.metrics_addr().unwrap();
    let degraded = "secretgate_reload_refused{what=\"policy\"}";
    assert_eq!(sample(&scrape(addr, None).await, degraded), Some(0.0));
    write(&gw.config.authz.policies, "policy.csv", "p, broken\n");
    gw.refused_reload(Reloaded::Policy, "policy.csv:1").await;
    let body = scrape(addr, None).await;
    assert_eq!(sample(&body, degraded), Some(1.0), "{body}");
    assert!(sample(&body, "secretgate_reload_failures_total{what=\"policy\"}") >= Some(1.0));
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        gw.channel(&gw.ca.client(ADMIN)).await.unwrap(),
    );
    let req = tonic_health::pb::HealthCheckRequest { service: secretgate::READINESS.into() };
    let status = health.check(req).await.unwrap().into_inner().status();
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving);

    // A good policy again: the gauge clears within the reload interval.
    write(&gw.config.authz.policies, "policy.csv", secretgate_testkit::TEST_POLICY);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&scrape(addr, None).await, degraded) != Some(0.0) {
        assert!(Instant::now() < deadline, "still degraded 10 s after a good policy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_metrics_listener_can_serve_tls_with_the_gateways_certificate() {
    let gw = TestGateway::start_with(|c| {
        on(c);
        c.metrics.tls = true;
    })
    .await;
    let body = scrape(gw.metrics_addr().unwrap(), Some(&gw.ca.cert_pem)).await;
    assert!(body.contains("secretgate_open_connections"), "{body}");
}

#[test]
fn plain_http_off_loopback_is_refused_unless_allowed() {
    let base = secretgate::config::Config {
        tls: secretgate::config::TlsConfig {
            cert: "s.pem".into(),
            key: "k.pem".into(),
            client_ca: "ca.pem".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut c = base.clone();
    c.metrics.listen = "0.0.0.0:9443".into();
    let err = c.clone().check().unwrap_err().to_string();
    assert!(err.contains("metrics.listen") && err.contains("metrics.tls = true"), "{err}");
    c.metrics.tls = true;
    c.clone().check().unwrap();
    c.metrics.tls = false;
    c.metrics.allow_plaintext = true;
    c.clone().check().unwrap();
    c.metrics.listen = "localhost".into();
    let err = c.check().unwrap_err().to_string();
    assert!(err.contains("is not an address and port"), "{err}");
    let mut off = base;
    off.metrics.listen = String::new();
    off.check().unwrap();
}
