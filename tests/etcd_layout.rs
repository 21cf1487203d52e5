//! What the gateway leaves in etcd, read raw with a direct etcd client: every key under the
//! configured prefix, in the documented layout, with pruned versions gone, and no plaintext
//! value anywhere, also after a key rotation with online rewrap.

use secretgate_testkit as support;

use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use secretgate::{
    proto::v1::{DeleteRequest, GetRequest, KeyStatusRequest, PutRequest, RewrapRequest},
    testing::Keyring,
};
use support::{
    TestGateway,
    etcd::{EtcdCluster, require_binary},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_is_under_the_prefix_in_the_documented_layout() {
    let cluster = EtcdCluster::start().await;
    let gw = TestGateway::start_with(|c| {
        cluster.configure(c, "/sg-test/", 5000);
        c.limits.max_versions = secretgate::config::Ranged::of::<3>();
    })
    .await;
    let mut c = gw.client("spiffe://test.example/admin").await;
    for v in 1..=5u64 {
        let req = PutRequest {
            path: "/app/db".into(),
            value: format!("plaintext-db-{v}").into_bytes(),
            expected_version: Some(v - 1),
        };
        c.put(req).await.unwrap();
    }
    for path in ["/app/api-key", "/z"] {
        let value = format!("plaintext-{path}").into_bytes();
        c.put(PutRequest { path: path.into(), value, expected_version: None }).await.unwrap();
    }
    c.delete(DeleteRequest { path: "/z".into() }).await.unwrap();

    let mut etcd = cluster.client(None).await;
    let all = etcd.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    let mut keys: Vec<String> =
        all.kvs().iter().map(|kv| kv.key_str().unwrap().to_owned()).collect();
    // The audit log's latest signed checkpoint may already be kept (one key per log).
    for kv in all.kvs().iter().filter(|kv| kv.key_str().unwrap().starts_with("/sg-test/audit/")) {
        let cp: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
        assert_eq!(cp["kind"], "checkpoint", "{cp}");
    }
    // Each replica's record in the registry (one key per live replica, bound to its lease).
    for kv in all.kvs().iter().filter(|kv| kv.key_str().unwrap().starts_with("/sg-test/replicas/"))
    {
        let record: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
        let id = kv.key_str().unwrap().strip_prefix("/sg-test/replicas/").unwrap();
        assert_eq!(record["id"], id, "{record}");
        assert_ne!(kv.lease(), 0, "a replica's record is bound to its lease");
    }
    keys.retain(|k| !k.starts_with("/sg-test/audit/") && !k.starts_with("/sg-test/replicas/"));
    let outside: Vec<&String> = keys.iter().filter(|k| !k.starts_with("/sg-test/")).collect();
    assert!(outside.is_empty(), "keys outside the prefix: {outside:?}");
    let d = |path: &str, v: u64| format!("/sg-test/data{path}@{v:020}");
    let mut expected = vec![
        "/sg-test/meta/app/api-key".to_owned(),
        "/sg-test/meta/app/db".to_owned(),
        "/sg-test/meta/z".to_owned(),
        d("/app/api-key", 1),
        d("/app/db", 3),
        d("/app/db", 4),
        d("/app/db", 5),
        d("/z", 1),
    ];
    expected.sort();
    assert_eq!(keys, expected, "versions 1 and 2 of /app/db are pruned in the same write");

    // Metadata is JSON with the current version; a deleted secret keeps its history.
    let meta = etcd.get("/sg-test/meta/z", None).await.unwrap();
    let meta: serde_json::Value = serde_json::from_slice(meta.kvs()[0].value()).unwrap();
    assert_eq!(meta["current_version"], 1);
    assert!(meta["versions"][0]["deleted"].is_u64(), "{meta}");
    assert_no_plaintext(&mut etcd).await;

    // Rotate: add and promote a key, rewrap online through the Admin API (a scan and
    // value compare-and-set transactions on etcd), then every record is under the new key.
    let keyring = gw.config.crypto.keyring.clone();
    let mut ring = Keyring::load(&keyring).unwrap();
    let new_key = ring.add().unwrap();
    ring.promote(new_key.as_str()).unwrap();
    ring.save(&keyring).unwrap();
    let mut a = gw.admin("spiffe://test.example/admin").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let primary = |s: &secretgate::proto::v1::KeyStatusResponse| {
        s.keys.iter().find(|k| k.state == "primary").map(|k| k.id.clone())
    };
    while primary(&a.key_status(KeyStatusRequest {}).await.unwrap().into_inner()).as_deref()
        != Some(new_key.as_str())
    {
        assert!(Instant::now() < deadline, "gateway did not reload the keyring");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = a.rewrap(RewrapRequest {}).await.unwrap().into_inner();
    let mut last = None;
    while let Some(p) = stream.message().await.unwrap() {
        last = Some(p);
    }
    let last = last.unwrap();
    assert!(last.done && last.failed == 0 && last.rewrapped == 5, "{last:?}");
    let status = a.key_status(KeyStatusRequest {}).await.unwrap().into_inner();
    for key in &status.keys {
        let want = if key.id == new_key.as_str() { 5 } else { 0 };
        assert_eq!(key.records, want, "{status:?}");
    }
    for (path, version, want) in
        [("/app/db", 3, "plaintext-db-3"), ("/app/db", 5, "plaintext-db-5")]
    {
        let got = c.get(GetRequest { path: path.into(), version: Some(version) }).await.unwrap();
        assert_eq!(got.into_inner().value, want.as_bytes());
    }
    assert_no_plaintext(&mut etcd).await;
}

/// No raw value under any key contains a written plaintext (all of which start `plaintext-`).
async fn assert_no_plaintext(etcd: &mut etcd_client::Client) {
    let all = etcd.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    let data = all.kvs().iter().filter(|kv| kv.key_str().unwrap().contains("/data/")).count();
    assert_eq!(data, 5, "the check below looks at the values");
    for kv in all.kvs() {
        let hit = kv.value().windows(b"plaintext-".len()).any(|w| w == b"plaintext-");
        assert!(!hit, "plaintext in the value of {}", kv.key_str().unwrap());
    }
}

/// The etcd tests never skip: without the binary they fail and say how to install it.
#[test]
#[should_panic(expected = "install etcd: apt-get install etcd-server etcd-client")]
fn a_missing_etcd_binary_fails_with_the_install_command() {
    require_binary("etcd-that-is-not-installed");
}
