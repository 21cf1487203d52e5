//! The keyring kept in the store (issue 20, items 1 and 6): `crypto.source = "store"`,
//! encrypted under the KEK, changed by Control RPCs on any replica, followed by every
//! replica; a promote waits for every live replica to hold the key, a write never commits a
//! value sealed under a primary that is no longer primary (the write fence), and a replica
//! whose registry lease lapsed serves nothing until it has caught up. Real gateways over
//! mTLS, on the embedded store and on a real 3-member etcd cluster.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use secretgate::{
    Gateway,
    config::{Config, Source},
    control::Kek,
    proto::v1::{
        AddKeyRequest, GetRequest, KeyRequest, KeyStatusRequest, KeyStatusResponse, PutRequest,
        RewrapRequest, TierStatusRequest, control_client::ControlClient,
        secrets_client::SecretsClient,
    },
};
use secretgate_testkit::{TestGateway, audit::ServedGateway, etcd::EtcdCluster};
use tonic::{Code, transport::Channel};

const ADMIN: &str = "spiffe://test.example/admin";
const PREFIX: &str = "/sg-keys/";

fn kek_file(dir: &Path) -> PathBuf {
    let path = dir.join("kek");
    Kek::generate(&path).unwrap();
    path
}

fn stored_keyring(c: &mut Config, kek: &Path) {
    c.crypto.source = Source::Store;
    c.crypto.kek = kek.to_owned();
}

async fn control(gw: &TestGateway) -> ControlClient<Channel> {
    ControlClient::new(gw.channel(&gw.ca.client(ADMIN)).await.unwrap())
}

async fn key_status(gw: &TestGateway) -> KeyStatusResponse {
    gw.admin(ADMIN).await.key_status(KeyStatusRequest {}).await.unwrap().into_inner()
}

fn records(s: &KeyStatusResponse, id: &str) -> u64 {
    s.keys.iter().find(|k| k.id == id).map_or(0, |k| k.records)
}

fn primary(s: &KeyStatusResponse) -> String {
    s.keys.iter().find(|k| k.state == "primary").unwrap().id.clone()
}

fn put(path: &str, value: &str) -> PutRequest {
    PutRequest { path: path.into(), value: value.as_bytes().to_vec(), ..Default::default() }
}

fn get(path: &str) -> GetRequest {
    GetRequest { path: path.into(), version: None }
}

async fn rewrap(gw: &TestGateway) {
    let mut admin = gw.admin(ADMIN).await;
    let mut stream = admin.rewrap(RewrapRequest {}).await.unwrap().into_inner();
    let mut last = None;
    while let Some(p) = stream.message().await.unwrap() {
        last = Some(p);
    }
    let last = last.unwrap();
    assert!(last.done && last.failed == 0, "{last:?}");
}

#[tokio::test]
async fn add_promote_rewrap_retire_on_the_keyring_kept_in_the_store() {
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    let mut gw = TestGateway::start_with(|c| stored_keyring(c, &kek)).await;
    let file_before = std::fs::read(&gw.config.crypto.keyring).unwrap();
    let s = key_status(&gw).await;
    assert!(s.keyring_version.starts_with("1:"), "imported as version 1: {s:?}");
    let k1 = primary(&s);
    let mut client = gw.client(ADMIN).await;
    client.put(put("/a/x", "one")).await.unwrap();
    let mut c = control(&gw).await;

    let added = c.add_key(AddKeyRequest { wait_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(added.version, 2);
    assert_eq!(added.enforcing.len(), 1);
    let k2 = added.id.clone();
    let promoted = c.promote_key(KeyRequest { id: k2.clone(), wait_ms: 0 }).await.unwrap();
    assert_eq!(promoted.get_ref().version, 3);
    client.put(put("/a/y", "two")).await.unwrap();
    let s = key_status(&gw).await;
    assert_eq!((primary(&s), records(&s, &k1), records(&s, &k2)), (k2.clone(), 1, 1));

    // Retiring a key that still seals records, or the primary, is refused.
    let refused = c.retire_key(KeyRequest { id: k1.clone(), wait_ms: 0 }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("rewrap"), "{}", refused.message());
    let refused = c.retire_key(KeyRequest { id: k2.clone(), wait_ms: 0 }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // An unknown key is refused at once, not after waiting for the tier.
    let started = Instant::now();
    let unknown = c.promote_key(KeyRequest { id: "k-none".into(), wait_ms: 0 }).await;
    assert_eq!(unknown.unwrap_err().code(), Code::FailedPrecondition);
    assert!(started.elapsed() < Duration::from_secs(5));
    rewrap(&gw).await;
    let retired = c.retire_key(KeyRequest { id: k1.clone(), wait_ms: 0 }).await.unwrap();
    assert_eq!(retired.get_ref().version, 4);
    let s = key_status(&gw).await;
    assert!(s.keyring_version.starts_with("4:"));
    assert_eq!(records(&s, &k2), 2);
    for (path, value) in [("/a/x", "one"), ("/a/y", "two")] {
        let got = client.get(get(path)).await.unwrap().into_inner();
        assert_eq!(got.value, value.as_bytes());
    }
    // Only `admin` may change keys; the file is not touched (the store is the source).
    let mut reader = ControlClient::new(
        gw.channel(&gw.ca.client("spiffe://test.example/reader")).await.unwrap(),
    );
    let denied = reader.add_key(AddKeyRequest { wait_ms: 0 }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(std::fs::read(&gw.config.crypto.keyring).unwrap(), file_before);
    // A restart loads the stored keyring, not the file.
    gw.restart().await;
    assert!(key_status(&gw).await.keyring_version.starts_with("4:"));
    let mut client = gw.client(ADMIN).await;
    assert_eq!(client.get(get("/a/x")).await.unwrap().into_inner().value, b"one");
}

/// A replica on `cluster` with the stored keyring under `kek`, renewing every second.
async fn replica(cluster: &EtcdCluster, id: &str, kek: &Path) -> TestGateway {
    TestGateway::start_with(|c| {
        cluster.configure(c, PREFIX, 5000);
        c.replica.id = id.into();
        c.replica.lease_secs = secretgate::config::Ranged::of::<3>();
        stored_keyring(c, kek);
    })
    .await
}

async fn live_replicas(gw: &TestGateway, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut admin = gw.admin(ADMIN).await;
        let s = admin.tier_status(TierStatusRequest {}).await.unwrap().into_inner();
        if s.replicas.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "not {n} live replicas: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes and reads through `client` until `stop`; counts answers and failures.
fn load(
    mut client: SecretsClient<Channel>,
    name: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut errors = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let path = format!("/load/{name}/{}", i % 16);
            let value = format!("{name}-{i}");
            let answer = match i % 3 {
                0 => client.put(put(&path, &value)).await.map(|_| ()),
                _ => match client.get(get(&format!("/load/{name}/{}", (i + 8) % 16))).await {
                    Err(s) if s.code() == Code::NotFound => Ok(()),
                    other => other.map(|_| ()),
                },
            };
            match answer {
                Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                Err(s) => {
                    errors.push(format!("{path}: {s:?}"));
                    failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            i += 1;
        }
        errors
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_rotate_under_load_with_no_failed_request() {
    let cluster = EtcdCluster::start().await;
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    let mut replicas = Vec::new();
    for id in ["replica-a", "replica-b", "replica-c"] {
        replicas.push(replica(&cluster, id, &kek).await);
    }
    live_replicas(&replicas[0], 3).await;
    let k1 = primary(&key_status(&replicas[0]).await);
    let (stop, ok, failed) = (Arc::default(), Arc::default(), Arc::default());
    let mut tasks = Vec::new();
    for (i, gw) in replicas.iter().enumerate() {
        let client = gw.client(ADMIN).await;
        let args = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        tasks.push(load(client, format!("r{i}"), args.0, args.1, args.2));
    }
    let mut c = control(&replicas[1]).await;
    let added = c.add_key(AddKeyRequest { wait_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(added.enforcing, ["replica-a", "replica-b", "replica-c"]);
    let k2 = added.id;
    let promoted = c.promote_key(KeyRequest { id: k2.clone(), wait_ms: 0 }).await.unwrap();
    assert!(promoted.get_ref().behind.is_empty(), "{promoted:?}");
    rewrap(&replicas[2]).await;
    // Writes went on during the rewrap: every one after the promote is under the new key,
    // whichever replica took it (the write fence).
    let retired = c.retire_key(KeyRequest { id: k1.clone(), wait_ms: 0 }).await;
    let retired = retired.unwrap().into_inner();
    assert!(retired.behind.is_empty(), "{retired:?}");
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("rotation under load: {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok > 50, "the load ran ({ok} requests)");
    // Every value opens on every replica.
    for gw in &replicas {
        let s = key_status(gw).await;
        assert_eq!((primary(&s), records(&s, &k1)), (k2.clone(), 0));
        let mut client = gw.client(ADMIN).await;
        for r in 0..3 {
            for k in 0..16 {
                match client.get(get(&format!("/load/r{r}/{k}"))).await {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => panic!("/load/r{r}/{k} on {}: {s:?}", gw.addr()),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_does_not_hold_up_a_promote_and_catches_up_before_it_answers() {
    let cluster = EtcdCluster::start().await;
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    let a = replica(&cluster, "replica-a", &kek).await;
    let b = replica(&cluster, "replica-b", &kek).await;
    let mut c = ServedGateway::prepare("")
        .with_store(&cluster.store_toml(PREFIX))
        .with_config("[replica]\nid = \"replica-c\"\nlease_secs = 3\n")
        .with_env("SECRETGATE_CRYPTO_SOURCE", "store")
        .with_env("SECRETGATE_CRYPTO_KEK", kek.to_str().unwrap());
    c.serve("warn").await;
    live_replicas(&a, 3).await;
    let mut on_c = c.client(ADMIN).await;
    on_c.put(put("/s/before", "old")).await.unwrap();
    let pid = c.pid().unwrap().to_string();
    let signal = |s: &str| {
        assert!(std::process::Command::new("kill").args([s, &pid]).status().unwrap().success())
    };

    signal("-STOP");
    let mut ctl = control(&a).await;
    // The paused replica cannot follow the new key; it stays listed until its lease expires.
    let added = ctl.add_key(AddKeyRequest { wait_ms: 500 }).await.unwrap().into_inner();
    assert_eq!(added.behind, ["replica-c"]);
    let started = Instant::now();
    let promoted = ctl
        .promote_key(KeyRequest { id: added.id.clone(), wait_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    let waited = started.elapsed();
    println!("promote with a paused replica: went ahead after {:.1} s", waited.as_secs_f64());
    assert_eq!(promoted.enforcing, ["replica-a", "replica-b"], "the paused one dropped out");
    let mut on_a = a.client(ADMIN).await;
    on_a.put(put("/s/after", "new")).await.unwrap();
    let s = key_status(&b).await;
    assert_eq!(records(&s, &added.id), 1, "sealed under the new primary");

    // Resumed: every answer is right or a refusal to serve; never a value it cannot open.
    signal("-CONT");
    let mut on_c = c.client(ADMIN).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut refused = 0;
    loop {
        match on_c.get(get("/s/after")).await {
            Ok(r) => {
                assert_eq!(r.into_inner().value, b"new");
                break;
            }
            Err(s) if s.code() == Code::Unavailable => refused += 1,
            Err(s) => panic!("the resumed replica answered {s:?}\n{}", c.gateway_log()),
        }
        assert!(Instant::now() < deadline, "the resumed replica never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("resumed replica: {refused} requests refused while it caught up");
    assert_eq!(on_c.get(get("/s/before")).await.unwrap().into_inner().value, b"old");
    live_replicas(&a, 3).await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_etcd_writes_of_the_keyring_are_refused_by_every_replica() {
    let cluster = EtcdCluster::start().await;
    let keys = tempfile::tempdir().unwrap();
    let kek = kek_file(keys.path());
    let a = replica(&cluster, "replica-a", &kek).await;
    let b = replica(&cluster, "replica-b", &kek).await;
    let added = control(&a).await.add_key(AddKeyRequest { wait_ms: 0 }).await.unwrap();
    assert_eq!(added.get_ref().version, 2);
    let in_force = key_status(&a).await.keyring_version;
    assert!(in_force.starts_with("2:"));
    let mut etcd = cluster.client(None).await;
    let key = |v: u64| format!("{PREFIX}control/keyring/{v:020}");
    let genuine_v1 = etcd.get(key(1), None).await.unwrap().kvs()[0].value().to_vec();
    // The imported key's material (base64 in the file) is nowhere in etcd in the clear.
    let file = std::fs::read_to_string(&a.config.crypto.keyring).unwrap();
    let secret = file.lines().find_map(|l| l.strip_prefix("secret = \"")).unwrap();
    let secret = secret.trim_end_matches('"');
    let all = etcd.get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert!(all.kvs().iter().all(|kv| !String::from_utf8_lossy(kv.value()).contains(secret)));
    // Each raw write, then: both replicas refuse it, keep version 2 and say why.
    let refused_everywhere = async |expected: &str| {
        for gw in [&a, &b] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = key_status(gw).await;
                assert_eq!(s.keyring_version, in_force);
                if s.reload_error.contains(expected) {
                    break;
                }
                assert!(Instant::now() < deadline, "not refused with {expected:?}: {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // A forged keyring (sealed under another KEK, with a key of the attacker's).
    let other = Kek::from_bytes(&[9u8; 32]);
    let ring = secretgate::testing::Keyring::generate().unwrap();
    let content = secretgate::control::keyring::SealedKeyring::seal(&other, 3, &ring).unwrap();
    let body = serde_json::json!({
        "version": 3, "created": "2026-12-04T00:00:00Z", "author": ADMIN, "note": "forged",
        "content": content,
    });
    let forged =
        secretgate::control::record::seal(&other, "keyring", 3, body.to_string().as_bytes());
    etcd.put(key(3), forged, None).await.unwrap();
    refused_everywhere("not authenticated").await;
    // The genuine version 1 replayed as version 3.
    etcd.put(key(3), genuine_v1, None).await.unwrap();
    refused_everywhere("stored as another").await;
    // Version 2 deleted: version 1 is the newest again.
    etcd.delete(key(3), None).await.unwrap();
    etcd.delete(key(2), None).await.unwrap();
    refused_everywhere("older than version 2 in force").await;
    // Writes and reads go on under the keyring in force.
    let mut client = b.client(ADMIN).await;
    client.put(put("/k/x", "v")).await.unwrap();
    assert_eq!(a.client(ADMIN).await.get(get("/k/x")).await.unwrap().into_inner().value, b"v");
    // A forged next version blocks sealed writes (the write fence: no replica may seal under
    // a keyring the store has moved past), as UNAVAILABLE; reads go on; removing it lifts it.
    etcd.put(key(3), b"forged".to_vec(), None).await.unwrap();
    let blocked = client.put(put("/k/x", "w")).await.unwrap_err();
    assert_eq!(blocked.code(), Code::Unavailable, "{blocked:?}");
    assert_eq!(a.client(ADMIN).await.get(get("/k/x")).await.unwrap().into_inner().value, b"v");
    etcd.delete(key(3), None).await.unwrap();
    client.put(put("/k/x", "w")).await.unwrap();
}

async fn reseal(gw: &TestGateway) -> Result<secretgate::proto::v1::ResealResponse, tonic::Status> {
    let mut c = control(gw).await;
    let request = secretgate::proto::v1::ResealRequest { wait_ms: 0 };
    c.reseal_control_state(request).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn kek_rotation_reseals_every_control_object_online() {
    let keys = tempfile::tempdir().unwrap();
    let old = kek_file(keys.path());
    let new = keys.path().join("kek-new");
    Kek::generate(&new).unwrap();
    let mut gw = TestGateway::start_with(|c| {
        stored_keyring(c, &old);
        c.authz.source = Source::Store;
        c.tls.client_trust_source = Source::Store;
    })
    .await;
    let mut client = gw.client(ADMIN).await;
    client.put(put("/k/x", "kept")).await.unwrap();
    // Only the new KEK: nothing stored can be opened, and the gateway says so at start.
    gw.stop().await;
    gw.config.crypto.kek = new.clone();
    let refused = Gateway::start(&gw.config.clone().check().unwrap()).await.err().unwrap();
    assert!(refused.to_string().contains("not authenticated"), "{refused}");
    // New KEK, previous still accepted: serves; the reseal stores each object again.
    gw.config.crypto.previous_kek = old.clone();
    gw.start_again().await;
    let resealed = reseal(&gw).await.unwrap();
    let kinds: Vec<(&str, u64)> =
        resealed.objects.iter().map(|o| (o.kind.as_str(), o.version)).collect();
    assert_eq!(kinds, [("keyring", 2), ("policy", 2), ("trust", 2)]);
    assert_eq!(resealed.kek_id, Kek::load(&new).unwrap().id());
    // The previous KEK removed: the resealed versions open; every value is still there.
    gw.stop().await;
    gw.config.crypto.previous_kek = PathBuf::new();
    gw.start_again().await;
    assert!(key_status(&gw).await.keyring_version.starts_with("2:"));
    let mut client = gw.client(ADMIN).await;
    assert_eq!(client.get(get("/k/x")).await.unwrap().into_inner().value, b"kept");
    // A gateway whose policy and keyring come from files has nothing to reseal.
    let files = TestGateway::start().await;
    assert_eq!(reseal(&files).await.unwrap_err().code(), Code::FailedPrecondition);
}
