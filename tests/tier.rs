//! The gateway tier's replica registry (issue 20, item 5): every replica keeps a lease-bound
//! record of itself in the store; `Admin/TierStatus` (`secretgate status`) lists the live
//! ones, the versions each enforces, and what they disagree on. Real gateways on a real
//! 3-member etcd cluster.

use std::time::{Duration, Instant};

use secretgate::proto::v1::{TierStatusRequest, TierStatusResponse};
use secretgate_testkit::{
    TEST_POLICY, TestGateway, audit::ServedGateway, etcd::EtcdCluster, write_policy,
};
use tonic::Code;

const ADMIN: &str = "spiffe://test.example/admin";
const PREFIX: &str = "/sg-tier/";

async fn status(gw: &TestGateway) -> TierStatusResponse {
    gw.admin(ADMIN).await.tier_status(TierStatusRequest {}).await.unwrap().into_inner()
}

fn ids(s: &TierStatusResponse) -> Vec<&str> {
    s.replicas.iter().map(|r| r.id.as_str()).collect()
}

/// Waits (`within` at most) until the tier's status satisfies `done`.
async fn until(
    gw: &TestGateway,
    within: Duration,
    done: impl Fn(&TierStatusResponse) -> bool,
) -> TierStatusResponse {
    let deadline = Instant::now() + within;
    loop {
        let s = status(gw).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replica named `id` on `cluster`, sharing `keyring`, renewing every second.
async fn replica(
    cluster: &EtcdCluster,
    id: &str,
    keyring: Option<&std::path::Path>,
) -> TestGateway {
    TestGateway::start_with(|c| {
        cluster.configure(c, PREFIX, 5000);
        c.replica.id = id.into();
        c.replica.lease_secs = secretgate::config::Ranged::of::<3>();
        if let Some(k) = keyring {
            c.crypto.keyring = k.to_owned();
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_live_replica_is_listed_with_what_it_enforces_and_disagreements_are_named() {
    let cluster = EtcdCluster::start().await;
    let a = replica(&cluster, "replica-a", None).await;
    let b = replica(&cluster, "replica-b", Some(&a.config.crypto.keyring)).await;
    let s = until(&a, Duration::from_secs(10), |s| s.replicas.len() == 2).await;
    assert_eq!(ids(&s), ["replica-a", "replica-b"]);
    let (ra, rb) = (&s.replicas[0], &s.replicas[1]);
    assert!(ra.answering && !rb.answering);
    assert_eq!(rb.address, b.addr().to_string());
    assert!(ra.audit_ok && !ra.audit_log_id.is_empty() && ra.audit_log_id != rb.audit_log_id);
    // One keyring and one policy; each test gateway trusts its own client CA.
    assert_eq!((&ra.keyring, &ra.policy), (&rb.keyring, &rb.policy));
    assert_ne!(ra.client_trust, rb.client_trust);
    assert_eq!(s.disagree, ["client trust"]);

    // A policy changed on one replica only shows up as a disagreement on the next renewal.
    write_policy(
        &b.config.authz.policies,
        &format!("{TEST_POLICY}p, role:admin, /extra/**, read, allow\n"),
    );
    let s = until(&a, Duration::from_secs(10), |s| s.disagree.contains(&"policy".to_owned())).await;
    assert_ne!(s.replicas[0].policy, s.replicas[1].policy);

    // A non-admin may not see the tier.
    let mut reader = a.admin("spiffe://test.example/reader").await;
    let denied = reader.tier_status(TierStatusRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_leaves_at_once_and_a_killed_one_when_its_lease_expires() {
    let cluster = EtcdCluster::start().await;
    let a = replica(&cluster, "replica-a", None).await;
    let mut b = replica(&cluster, "replica-b", None).await;
    until(&a, Duration::from_secs(10), |s| s.replicas.len() == 2).await;
    b.stop().await;
    let s = status(&a).await;
    assert_eq!(ids(&s), ["replica-a"], "a clean stop revokes the lease at once");

    // Killed (no clean stop): listed until its lease (2 s) expires, then gone.
    let mut killed = ServedGateway::prepare("")
        .with_store(&cluster.store_toml(PREFIX))
        .with_config("[replica]\nid = \"replica-killed\"\nlease_secs = 2\n");
    killed.serve("warn").await;
    until(&a, Duration::from_secs(10), |s| ids(s).contains(&"replica-killed")).await;
    killed.kill();
    let started = Instant::now();
    until(&a, Duration::from_secs(10), |s| ids(s) == ["replica-a"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gone within its lease: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn on_the_embedded_store_the_tier_is_this_gateway() {
    let gw = TestGateway::start_with(|c| c.replica.id = "solo".into()).await;
    let s = until(&gw, Duration::from_secs(10), |s| !s.replicas.is_empty()).await;
    assert_eq!(ids(&s), ["solo"]);
    assert!(s.replicas[0].answering && s.disagree.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secretgate_status_shows_the_tier_and_exits_1_when_replicas_disagree() {
    let cluster = EtcdCluster::start().await;
    let a = replica(&cluster, "replica-a", None).await;
    let run = |gw: &TestGateway| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_secretgate"))
            .arg("status")
            .args(gw.cli_args(ADMIN))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    until(&a, Duration::from_secs(10), |s| s.replicas.len() == 1).await;
    let (code, stdout, _) = run(&a);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("* replica-a") && stdout.contains("1 live replica(s)"), "{stdout}");
    let _b = replica(&cluster, "replica-b", None).await;
    until(&a, Duration::from_secs(10), |s| s.replicas.len() == 2).await;
    let (code, stdout, stderr) = run(&a);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stderr.contains("do not all enforce the same keyring, client trust"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_renews_one_lease_instead_of_taking_a_new_one_each_time() {
    let cluster = EtcdCluster::start().await;
    let _a = replica(&cluster, "replica-a", None).await;
    let mut etcd = cluster.client(None).await;
    let key = format!("{PREFIX}replicas/replica-a");
    // (lease, mod_revision) of the record now.
    let mut record = async || {
        let resp = etcd.get(key.as_str(), None).await.unwrap();
        resp.kvs().first().map(|kv| (kv.lease(), kv.mod_revision()))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(r) = record().await {
            break r;
        }
        assert!(Instant::now() < deadline, "the replica never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Two renewals later (a write of the record every second) the lease is the same one.
    let mut renewals = 0;
    let mut last = first.1;
    while renewals < 2 {
        let (lease, revision) = record().await.expect("the record stays while renewed");
        assert_eq!(lease, first.0, "a renewal took a new lease");
        if revision != last {
            renewals += 1;
            last = revision;
        }
        assert!(Instant::now() < deadline, "no two renewals within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leases = cluster.client(None).await.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 1, "one lease for one replica");
}
