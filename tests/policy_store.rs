//! The policy kept in the store (issue 20, items 2 and 3): `authz.source = "store"`, pushed
//! through the Control service, followed by every replica, authenticated under the KEK and
//! only ever moving forward. Real gateways over mTLS, on the embedded store and on a real
//! 3-member etcd cluster.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use secretgate::{
    config::{Config, Source},
    control::Kek,
    proto::v1::{
        GetRequest, PolicyHistoryRequest, PushPolicyRequest, PutRequest, ReloadStatusRequest,
        RollbackPolicyRequest, WhoAmIRequest, control_client::ControlClient,
        secrets_client::SecretsClient,
    },
};
use secretgate_testkit::{TEST_POLICY, TestGateway, etcd::EtcdCluster};
use tonic::{Code, transport::Channel};

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";
const MALLORY: &str = "spiffe://test.example/mallory";
const PREFIX: &str = "/sg-policy/";

/// `TEST_POLICY` without the reader's read grant.
fn without_reader_read() -> String {
    TEST_POLICY.replace("p, spiffe://test.example/reader, /shared/**, read, allow\n", "")
}

fn files(csv: &str) -> HashMap<String, String> {
    HashMap::from([
        ("model.conf".to_owned(), secretgate::authz::policy::MODEL.to_owned()),
        ("policy.csv".to_owned(), csv.to_owned()),
    ])
}

fn push(csv: &str, base_version: u64) -> PushPolicyRequest {
    PushPolicyRequest { files: files(csv), base_version, wait_ms: 5000 }
}

/// A KEK file shared by the replicas of one test.
fn kek_file(dir: &Path) -> PathBuf {
    let path = dir.join("kek");
    Kek::generate(&path).unwrap();
    path
}

fn stored_policy(c: &mut Config, kek: &Path) {
    c.authz.source = Source::Store;
    c.crypto.kek = kek.to_owned();
}

async fn control(gw: &TestGateway, spiffe: &str) -> ControlClient<Channel> {
    ControlClient::new(gw.channel(&gw.ca.client(spiffe)).await.unwrap())
}

async fn policy_version(gw: &TestGateway) -> String {
    let mut c = gw.client(ADMIN).await;
    c.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner().policy_version
}

async fn reader_get(gw: &TestGateway) -> Code {
    let mut c = gw.client(READER).await;
    match c.get(GetRequest { path: "/shared/x".into(), version: None }).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Why this replica refuses the newest stored policy (ReloadStatus), once it does.
async fn refused(gw: &TestGateway, expected: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut admin = gw.admin(ADMIN).await;
        let values = admin.reload_status(ReloadStatusRequest {}).await.unwrap().into_inner().values;
        let policy = values.into_iter().find(|v| v.what == "policy").unwrap();
        if policy.refused.contains(expected) {
            return policy.refused;
        }
        assert!(Instant::now() < deadline, "not refused with {expected:?}: {policy:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_removes_a_grant_is_enforced_by_three_replicas_on_etcd() {
    let cluster = EtcdCluster::start().await;
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    let mut replicas: Vec<TestGateway> = Vec::new();
    for id in ["replica-a", "replica-b", "replica-c"] {
        let keyring = replicas.first().map(|a| a.config.crypto.keyring.clone());
        replicas.push(
            TestGateway::start_with(|c| {
                cluster.configure(c, PREFIX, 5000);
                c.replica.id = id.into();
                c.replica.lease_secs = secretgate::config::Ranged::of::<3>();
                if let Some(k) = keyring {
                    c.crypto.keyring = k;
                }
                stored_policy(c, &kek);
            })
            .await,
        );
    }
    // The first replica stored its files as version 1; the others took that.
    for gw in &replicas {
        assert!(policy_version(gw).await.starts_with("1:"), "{}", policy_version(gw).await);
    }
    let mut writer = replicas[0].client(ADMIN).await;
    writer
        .put(PutRequest { path: "/shared/x".into(), value: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    for gw in &replicas {
        assert_eq!(reader_get(gw).await, Code::Ok);
    }
    // Every replica's record must show version 1 before the push can wait on them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut admin = replicas[0].admin(ADMIN).await;
        let s = admin.tier_status(secretgate::proto::v1::TierStatusRequest {}).await.unwrap();
        if s.get_ref().replicas.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the registry never listed three replicas");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each replica is probed with its own client from before the push until it refuses.
    let mut probes = Vec::new();
    for gw in &replicas {
        let mut reader = gw.client(READER).await;
        probes.push(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let r = reader.get(GetRequest { path: "/shared/x".into(), version: None }).await;
                match r {
                    Err(s) if s.code() == Code::PermissionDenied => return Instant::now(),
                    Ok(_) => {}
                    Err(s) => panic!("unexpected answer {s:?}"),
                }
                assert!(Instant::now() < deadline, "a replica still grants the read");
                // Probing paced (the measurement's resolution), not to starve the replicas
                // and etcd on a 2-core machine.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    let mut pusher = control(&replicas[1], ADMIN).await;
    let started = Instant::now();
    let pushing = async {
        let pushed = pusher.push_policy(push(&without_reader_read(), 0)).await.unwrap();
        (pushed.into_inner(), started.elapsed())
    };
    let ((pushed, answered), denied_at) =
        tokio::join!(pushing, futures_util::future::join_all(probes));
    assert_eq!(pushed.version, 2);
    assert!(pushed.behind.is_empty(), "{pushed:?}");
    assert_eq!(pushed.enforcing, ["replica-a", "replica-b", "replica-c"]);
    let each: Vec<String> = denied_at
        .iter()
        .map(|t| format!("{:.0} ms", t.saturating_duration_since(started).as_secs_f64() * 1e3))
        .collect();
    let slowest = denied_at.iter().map(|t| t.saturating_duration_since(started)).max().unwrap();
    println!(
        "policy push: enforced by the three replicas after {} (slowest {:.0} ms); the push \
         answered after {:.0} ms, once every live replica reported it",
        each.join(", "),
        slowest.as_secs_f64() * 1e3,
        answered.as_secs_f64() * 1e3
    );
    for gw in &replicas {
        assert_eq!(reader_get(gw).await, Code::PermissionDenied);
        assert!(policy_version(gw).await.starts_with("2:"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_etcd_writes_of_control_state_are_refused_and_the_last_good_version_stays() {
    let cluster = EtcdCluster::start().await;
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    let gw = TestGateway::start_with(|c| {
        cluster.configure(c, PREFIX, 5000);
        stored_policy(c, &kek);
        c.metrics.listen = "127.0.0.1:0".into();
    })
    .await;
    // A second replica: every refusal below holds on both.
    let other_replica = TestGateway::start_with(|c| {
        cluster.configure(c, PREFIX, 5000);
        stored_policy(c, &kek);
    })
    .await;
    let mut pusher = control(&gw, ADMIN).await;
    pusher
        .push_policy(push(&format!("{TEST_POLICY}p, role:admin, /v2/**, read, allow\n"), 0))
        .await
        .unwrap();
    let v2 = policy_version(&gw).await;
    assert!(v2.starts_with("2:"));
    let mut etcd = cluster.client(None).await;
    let key = |v: u64| format!("{PREFIX}control/policy/{v:020}");
    let genuine_v1 = etcd.get(key(1), None).await.unwrap().kvs()[0].value().to_vec();
    let genuine_v2 = etcd.get(key(2), None).await.unwrap().kvs()[0].value().to_vec();
    // An attacker's policy, well-formed, granting mallory admin on `/`.
    let malicious = format!("{TEST_POLICY}p, {MALLORY}, /**, *, allow\n");
    let mallory_admin = || async {
        let mut c = control(&gw, MALLORY).await;
        c.policy_history(PolicyHistoryRequest { limit: 1 }).await.map(|_| ()).map_err(|s| s.code())
    };
    assert_eq!(mallory_admin().await, Err(Code::PermissionDenied));

    // 1. Forged: sealed under another KEK.
    let other = Kek::from_bytes(&[7u8; 32]);
    let body = serde_json::json!({
        "version": 3, "created": "2026-12-04T00:00:00Z", "author": ADMIN, "note": "push",
        "files": files(&malicious),
    });
    let forged =
        secretgate::control::record::seal(&other, "policy", 3, body.to_string().as_bytes());
    etcd.put(key(3), forged, None).await.unwrap();
    let why = refused(&gw, "not authenticated").await;
    assert!(why.contains("version 3"), "{why}");
    refused(&other_replica, "not authenticated").await;
    assert_eq!(mallory_admin().await, Err(Code::PermissionDenied));
    assert_eq!(policy_version(&gw).await, v2);

    // 2. Replayed: version 1's genuine record put back as a newer version.
    etcd.put(key(3), genuine_v1.clone(), None).await.unwrap();
    refused(&gw, "stored as another").await;
    refused(&other_replica, "stored as another").await;
    assert_eq!(policy_version(&gw).await, v2);

    // 3. Rolled back: the newer versions deleted, so version 1 looks newest again.
    etcd.delete(key(3), None).await.unwrap();
    etcd.delete(key(2), None).await.unwrap();
    refused(&gw, "older than version 2 in force").await;
    refused(&other_replica, "older than version 2 in force").await;
    assert_eq!(policy_version(&gw).await, v2);
    // A replica restarted now refuses to start on the older version (its state file).
    let mut other_replica = other_replica;
    other_replica.stop().await;
    let config = other_replica.config.clone().check().unwrap();
    let refused_start = secretgate::Gateway::start(&config).await.err().unwrap().to_string();
    assert!(
        refused_start.contains("older than version 2 this replica enforced before"),
        "{refused_start}"
    );
    etcd.put(key(2), genuine_v2.clone(), None).await.unwrap();
    other_replica.start_again().await;
    assert_eq!(policy_version(&other_replica).await, v2);
    etcd.delete(key(2), None).await.unwrap();

    // 4. Altered in place: version 2's record with its body changed.
    let mut altered = genuine_v2.clone();
    let at = altered.len() - 3;
    altered[at] ^= 0x20;
    etcd.put(key(2), altered, None).await.unwrap();
    refused(&gw, "changed in the store after this replica accepted it").await;
    refused(&other_replica, "changed in the store after this replica accepted it").await;
    assert_eq!(policy_version(&gw).await, v2);
    assert_eq!(policy_version(&other_replica).await, v2);
    assert_eq!(mallory_admin().await, Err(Code::PermissionDenied));
    // Counted in the metrics too.
    let scraped = secretgate_testkit::http_get(gw.metrics_addr().unwrap(), "/metrics", None).await;
    let refusals = scraped
        .lines()
        .find_map(|l| l.strip_prefix("secretgate_reload_failures_total{what=\"policy\"} "))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(refusals >= 4.0, "{refusals} refusals counted");

    // Put right, and a new push works again on top.
    etcd.put(key(2), genuine_v2, None).await.unwrap();
    let pushed = pusher.push_policy(push(TEST_POLICY, 0)).await.unwrap().into_inner();
    assert_eq!(pushed.version, 3);
    assert!(policy_version(&gw).await.starts_with("3:"));
    let mut admin = gw.admin(ADMIN).await;
    let values = admin.reload_status(ReloadStatusRequest {}).await.unwrap().into_inner().values;
    assert_eq!(values.iter().find(|v| v.what == "policy").unwrap().refused, "");
}

/// A gateway on the embedded store with its policy in the store, and its KEK's directory.
async fn embedded() -> (TestGateway, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    (TestGateway::start_with(|c| stored_policy(c, &kek)).await, keys)
}

#[tokio::test]
async fn two_pushes_on_one_version_one_wins_and_the_other_is_told() {
    let (gw, _kek) = embedded().await;
    let (mut a, mut b) = (control(&gw, ADMIN).await, control(&gw, ADMIN).await);
    let extra = |n: u32| format!("{TEST_POLICY}p, role:admin, /extra{n}/**, read, allow\n");
    let (ra, rb) =
        tokio::join!(a.push_policy(push(&extra(1), 1)), b.push_policy(push(&extra(2), 1)));
    let (won, lost) = match (ra, rb) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w.into_inner(), l),
        other => panic!("exactly one push must win: {other:?}"),
    };
    assert_eq!(won.version, 2);
    assert_eq!(lost.code(), Code::FailedPrecondition);
    assert!(lost.message().contains("another push got there first"), "{}", lost.message());
    // Building on a version that is not the newest is refused the same way.
    let stale = a.push_policy(push(TEST_POLICY, 1)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn history_rollback_and_refused_pushes() {
    let (gw, _kek) = embedded().await;
    let mut c = control(&gw, ADMIN).await;
    let mut store = gw.client(ADMIN).await;
    store
        .put(PutRequest { path: "/shared/x".into(), value: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(c.push_policy(push(&without_reader_read(), 0)).await.unwrap().get_ref().version, 2);
    assert_eq!(reader_get(&gw).await, Code::PermissionDenied);

    // A policy whose own tests fail is refused; nothing is stored.
    let mut failing = files(TEST_POLICY);
    failing.insert(
        "tests/reader.toml".into(),
        format!("[[case]]\nsubject = \"{READER}\"\npath = \"/shared/x\"\naction = \"write\"\nexpect = \"allow\"\n"),
    );
    let refused = c
        .push_policy(PushPolicyRequest { files: failing, base_version: 0, wait_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("policy tests fail"), "{}", refused.message());
    // A file that is not part of a policy is refused by name.
    let mut odd = files(TEST_POLICY);
    odd.insert("../../etc/passwd".into(), String::new());
    let refused = c
        .push_policy(PushPolicyRequest { files: odd, base_version: 0, wait_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("not a policy file"), "{}", refused.message());

    // Rollback: version 1's content as version 3.
    let rolled = c.rollback_policy(RollbackPolicyRequest { version: 1, wait_ms: 0 }).await.unwrap();
    assert_eq!(rolled.get_ref().version, 3);
    assert_eq!(reader_get(&gw).await, Code::Ok);
    let missing = c.rollback_policy(RollbackPolicyRequest { version: 9, wait_ms: 0 }).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);

    let h = c.policy_history(PolicyHistoryRequest { limit: 0 }).await.unwrap().into_inner();
    assert_eq!(h.in_force, 3);
    let listed: Vec<(u64, &str, &str)> =
        h.versions.iter().map(|v| (v.version, v.author.as_str(), v.note.as_str())).collect();
    assert_eq!(listed[0], (3, ADMIN, "rollback to version 1"));
    assert_eq!(listed[1], (2, ADMIN, "push"));
    assert_eq!(listed[2].0, 1);
    assert_eq!(listed[2].1, "import");
    assert_eq!(h.versions[0].fingerprint, h.versions[2].fingerprint, "same content");
    assert!(h.versions.iter().all(|v| v.problem.is_empty()));
    let rules: Vec<u64> = h.versions.iter().map(|v| v.rules).collect();
    assert_eq!(rules, [3, 2, 3]);

    // Only `admin` may push; the attempt is refused before anything is read or stored.
    let mut reader = control(&gw, READER).await;
    let denied = reader.push_policy(push(TEST_POLICY, 0)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // A restart takes the newest stored version, not the files.
    let mut gw = gw;
    gw.restart().await;
    assert!(policy_version(&gw).await.starts_with("3:"));
}

#[tokio::test]
async fn a_gateway_whose_policy_comes_from_files_refuses_control_calls() {
    let gw = TestGateway::start().await;
    let mut c = control(&gw, ADMIN).await;
    let refused = c.push_policy(push(TEST_POLICY, 0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("authz.source"), "{}", refused.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_of_100k_rules_is_pushed_in_parts_and_enforced_on_two_replicas() {
    let cluster = EtcdCluster::start().await;
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    let mut replicas: Vec<TestGateway> = Vec::new();
    for id in ["replica-a", "replica-b"] {
        replicas.push(
            TestGateway::start_with(|c| {
                cluster.configure(c, PREFIX, 5000);
                c.replica.id = id.into();
                stored_policy(c, &kek);
            })
            .await,
        );
    }
    // 100,000 rules and 100,000 role links (as `cargo bench --bench authz`): 8.9 MB of text.
    let mut csv = String::from(TEST_POLICY);
    for i in 0..100_000 {
        csv.push_str(&format!("p, role{i}, /apps/app{i}/**, read, allow\n"));
        csv.push_str(&format!("g, spiffe://test.example/svc{i}, role{i}\n"));
    }
    let started = Instant::now();
    let mut pusher = control(&replicas[0], ADMIN).await.max_encoding_message_size(16 << 20);
    let pushed = pusher
        .push_policy(PushPolicyRequest { files: files(&csv), base_version: 0, wait_ms: 30_000 })
        .await
        .unwrap()
        .into_inner();
    println!(
        "a 100k-rule policy ({:.1} MB): pushed, stored in parts and enforced by both replicas in {:.2} s",
        csv.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    assert_eq!((pushed.version, pushed.behind.len()), (2, 0), "{pushed:?}");
    // Stored in parts (over etcd's request limit), whole again on the other replica.
    let mut etcd = cluster.client(None).await;
    let parts = format!("{PREFIX}control/policy/parts/");
    let found = etcd
        .get(parts.as_str(), Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    assert!(found.kvs().len() >= 9, "{} parts", found.kvs().len());
    let svc = replicas[1].ca.client("spiffe://test.example/svc99999");
    let mut c = SecretsClient::new(replicas[1].channel(&svc).await.unwrap());
    let who = c.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(who.roles, ["role99999"]);
    assert!(who.policy_version.starts_with("2:"));
    let denied = c.get(GetRequest { path: "/apps/app1/x".into(), version: None }).await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let allowed = c.get(GetRequest { path: "/apps/app99999/x".into(), version: None }).await;
    assert_eq!(allowed.unwrap_err().code(), Code::NotFound, "allowed, and not there");

    // A part altered in etcd: the version does not add up and is refused, version 2 stays.
    let pushed = pusher.push_policy(push(&format!("{csv}# v3\n"), 0)).await.unwrap();
    assert_eq!(pushed.get_ref().version, 3);
    let manifest = etcd.get(format!("{PREFIX}control/policy/{:020}", 3), None).await.unwrap();
    let manifest = String::from_utf8(manifest.kvs()[0].value().to_vec()).unwrap();
    let id = manifest.split(' ').nth(2).unwrap();
    let part = format!("{parts}{id}/0001");
    etcd.put(part, b"tampered".to_vec(), None).await.unwrap();
    etcd.put(format!("{PREFIX}control/policy/{:020}", 4), manifest.replace(" 3 ", " 4 "), None)
        .await
        .unwrap();
    let why = refused(&replicas[1], "policy version 4 refused").await;
    assert!(why.contains("not a control record"), "{why}");
    assert!(policy_version(&replicas[1]).await.starts_with("3:"));
}
