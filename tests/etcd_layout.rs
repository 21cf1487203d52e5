//! What the gateway leaves in etcd, read raw with a direct etcd client: every key under the
//! configured prefix, in the documented layout, with pruned versions gone.

mod support;

use etcd_client::GetOptions;
use secretgate::proto::v1::{DeleteRequest, PutRequest};
use support::{
    TestGateway,
    etcd::{EtcdCluster, require_binary},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_is_under_the_prefix_in_the_documented_layout() {
    let cluster = EtcdCluster::start().await;
    let gw = TestGateway::start_with(|c| {
        cluster.configure(c, "/sg-test/", 5000);
        c.limits.max_versions = 3;
    })
    .await;
    let mut c = gw.client("spiffe://test.example/app").await;
    for v in 1..=5u64 {
        let req = PutRequest {
            path: "/app/db".into(),
            value: format!("db-{v}").into_bytes(),
            expected_version: Some(v - 1),
        };
        c.put(req).await.unwrap();
    }
    for path in ["/app/api-key", "/z"] {
        c.put(PutRequest { path: path.into(), value: b"v".to_vec(), expected_version: None })
            .await
            .unwrap();
    }
    c.delete(DeleteRequest { path: "/z".into() }).await.unwrap();

    let mut etcd = cluster.client(None).await;
    let all = etcd.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    let keys: Vec<String> = all.kvs().iter().map(|kv| kv.key_str().unwrap().to_owned()).collect();
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
}

/// The etcd tests never skip: without the binary they fail and say how to install it.
#[test]
#[should_panic(expected = "install etcd: apt-get install etcd-server etcd-client")]
fn a_missing_etcd_binary_fails_with_the_install_command() {
    require_binary("etcd-that-is-not-installed");
}
