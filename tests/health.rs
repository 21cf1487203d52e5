//! Liveness and readiness (issue 19): separate health service names, readiness following the
//! audit log and the store's quorum, degraded-but-serving states kept SERVING, and
//! `secretgate health [--ready]` for exec probes, against real gateways.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use secretgate::{LIVENESS, READINESS, Reloaded, proto::v1::ReloadStatusRequest};
use secretgate_testkit::{TestGateway, etcd::EtcdCluster, write};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const ADMIN: &str = "spiffe://test.example/admin";
const BIN: &str = env!("CARGO_BIN_EXE_secretgate");

async fn status(gw: &TestGateway, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(gw.channel(&gw.ca.client(ADMIN)).await.unwrap());
    let req = HealthCheckRequest { service: service.into() };
    health.check(req).await.unwrap().into_inner().status()
}

/// Waits (20 s at most) until `service` reports `want`.
async fn until(gw: &TestGateway, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = status(gw, service).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{service} is {now:?}, not {want:?}, after 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `secretgate health [--ready]` against `gw`: exit code and output.
fn probe(gw: &TestGateway, ready: bool) -> (i32, String) {
    let mut args = vec!["health".to_owned()];
    if ready {
        args.push("--ready".into());
    }
    args.extend(gw.cli_args(ADMIN));
    let out = Command::new(BIN).args(&args).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_stores_quorum_and_liveness_does_not() {
    let mut cluster = EtcdCluster::start().await;
    let gw = TestGateway::start_with(|c| cluster.configure(c, "/sg-health/", 1000)).await;
    until(&gw, READINESS, ServingStatus::Serving).await;
    assert_eq!(status(&gw, LIVENESS).await, ServingStatus::Serving);
    assert_eq!(probe(&gw, true), (0, format!("{READINESS}: SERVING\n")));

    cluster.kill(1);
    cluster.kill(2);
    until(&gw, READINESS, ServingStatus::NotServing).await;
    assert_eq!(status(&gw, LIVENESS).await, ServingStatus::Serving, "still live");
    assert_eq!(status(&gw, "").await, ServingStatus::Serving, "the audit log is fine");
    let (code, text) = probe(&gw, true);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("error: {READINESS} is NOT_SERVING")), "{text}");
    assert_eq!(probe(&gw, false).0, 0, "a liveness probe must not restart it");

    cluster.restart(1).await;
    cluster.restart(2).await;
    until(&gw, READINESS, ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_keeps_the_gateway_ready() {
    let gw = TestGateway::start().await;
    until(&gw, READINESS, ServingStatus::Serving).await;
    write(&gw.config.authz.policies, "policy.csv", "p, broken\n");
    gw.refused_reload(Reloaded::Policy, "policy.csv:1").await;
    // Two readiness checks (every 2 s) later it is still ready: the last good policy is in
    // force. (Waiting is the observation here, not a synchronization.)
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(status(&gw, READINESS).await, ServingStatus::Serving);
    assert_eq!(probe(&gw, true).0, 0);

    // The degraded state shows in the admin status (and `secretgate reload-status`, which
    // exits 1 while a reload is refused), the version in force beside it.
    let mut admin = gw.admin(ADMIN).await;
    let values = admin.reload_status(ReloadStatusRequest {}).await.unwrap().into_inner().values;
    let policy = values.iter().find(|v| v.what == "policy").unwrap();
    assert!(policy.refused.contains("policy.csv:1"), "{values:?}");
    assert!(!policy.version.is_empty());
    let keyring = values.iter().find(|v| v.what == "keyring").unwrap();
    assert!(keyring.refused.is_empty() && keyring.version.contains("primary"), "{values:?}");
    assert_eq!(values.len(), 4, "{values:?}");
    let mut args = vec!["reload-status".to_owned()];
    args.extend(gw.cli_args(ADMIN));
    let out = Command::new(BIN).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("REFUSED newer files:") && text.contains("policy.csv:1"), "{text}");
    let mut reader = gw.admin("spiffe://test.example/reader").await;
    let denied = reader.reload_status(ReloadStatusRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}
