//! The rest of the versioned-KV lifecycle (issue 18, item 3): Undelete and Destroy through
//! real mTLS, authorized (`delete`, `destroy`) and audited; a destroyed version's ciphertext
//! gone from etcd at once and, after compaction, from its history too; and what destroy
//! leaves in the embedded store's file.

use std::sync::Arc;

use etcd_client::GetOptions;
use secretgate::{
    audit::Phase,
    proto::v1::{
        DeleteRequest, DestroyRequest, GetRequest, PutRequest, UndeleteRequest, VersionsRequest,
    },
    testing::{EmbeddedStore, Store},
};
use secretgate_testkit::{TestGateway, audit::read_log, etcd::EtcdCluster};
use tonic::Code;

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";

fn put(path: &str, value: &[u8]) -> PutRequest {
    PutRequest { path: path.into(), value: value.to_vec(), expected_version: None }
}

fn get(path: &str, version: u64) -> GetRequest {
    GetRequest { path: path.into(), version: Some(version) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelete_and_destroy_are_authorized_audited_and_final() {
    let gw = TestGateway::start().await;
    let mut admin = gw.client(ADMIN).await;
    let path = "/shared/db";
    admin.put(put(path, b"v1")).await.unwrap();
    admin.put(put(path, b"v2")).await.unwrap();
    admin.delete(DeleteRequest { path: path.into() }).await.unwrap();

    // The reader may read /shared but not delete there, so not undelete, and not destroy.
    let mut reader = gw.client(READER).await;
    let undelete = UndeleteRequest { path: path.into(), version: 2 };
    let denied = reader.undelete(undelete.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let destroy = |version| DestroyRequest { path: path.into(), version };
    let denied = reader.destroy(destroy(1)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(reader.get(get(path, 2)).await.unwrap_err().code(), Code::NotFound);

    assert_eq!(admin.undelete(undelete).await.unwrap().into_inner().version, 2);
    let back = reader.get(GetRequest { path: path.into(), version: None }).await.unwrap();
    assert_eq!(back.into_inner().value, b"v2");

    let destroyed = admin.destroy(destroy(1)).await.unwrap().into_inner();
    assert!(destroyed.destroyed_time.is_some());
    let gone = reader.get(get(path, 1)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(gone.message().contains("version 1 of secret /shared/db was destroyed"), "{gone:?}");
    let again = admin.undelete(UndeleteRequest { path: path.into(), version: 1 }).await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound, "a destroyed version stays gone");
    let versions = reader.versions(VersionsRequest { path: path.into() }).await.unwrap();
    let v1 = versions.into_inner().versions.into_iter().find(|v| v.version == 1).unwrap();
    assert_eq!(v1.destroyed_time, destroyed.destroyed_time);
    let missing = admin.destroy(destroy(7)).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Each change is audited: an intent and an allowed outcome with the version; the
    // refusals as denied outcomes.
    let log = read_log(&gw.config.audit.path);
    let outcomes = |method: &str| {
        log.iter()
            .map(|(_, r)| r)
            .filter(|r| r.method.as_deref() == Some(method) && r.phase == Some(Phase::Outcome))
            .map(|r| (r.principal.clone().unwrap(), r.status.clone().unwrap(), r.version))
            .collect::<Vec<_>>()
    };
    let undeletes = outcomes("secretgate.v1.Secrets/Undelete");
    assert!(
        undeletes.contains(&(READER.into(), "PERMISSION_DENIED".into(), None)),
        "{undeletes:?}"
    );
    assert!(undeletes.contains(&(ADMIN.into(), "OK".into(), Some(2))), "{undeletes:?}");
    let destroys = outcomes("secretgate.v1.Secrets/Destroy");
    assert!(destroys.contains(&(READER.into(), "PERMISSION_DENIED".into(), None)), "{destroys:?}");
    assert!(destroys.contains(&(ADMIN.into(), "OK".into(), Some(1))), "{destroys:?}");
    let intents = log.iter().filter(|(_, r)| {
        r.method.as_deref() == Some("secretgate.v1.Secrets/Destroy")
            && r.phase == Some(Phase::Intent)
    });
    assert_eq!(intents.count(), 2, "the admin's two destroys record their intent first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_ciphertext_is_gone_from_etcd_now_and_from_its_history_after_compaction() {
    let cluster = EtcdCluster::start().await;
    let gw = TestGateway::start_with(|c| cluster.configure(c, "/sg-life/", 5000)).await;
    let mut admin = gw.client(ADMIN).await;
    admin.put(put("/app/db", b"first")).await.unwrap();
    admin.put(put("/app/db", b"second")).await.unwrap();
    let key = format!("/sg-life/data/app/db@{:020}", 1);
    let mut etcd = cluster.client(None).await;
    let before = etcd.get(key.as_str(), None).await.unwrap();
    let sealed = before.kvs().first().expect("version 1's ciphertext is stored").value().to_vec();
    let revision = before.header().unwrap().revision();

    admin.destroy(DestroyRequest { path: "/app/db".into(), version: 1 }).await.unwrap();
    let now = etcd.get(key.as_str(), None).await.unwrap();
    assert!(now.kvs().is_empty(), "the ciphertext is gone at the current revision");
    // The cache forgets it at once: a read of the version says destroyed, not the value.
    let err = admin.get(get("/app/db", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // etcd's history still has it (MVCC) until a compaction passes the destroy.
    let old = GetOptions::new().with_revision(revision);
    let history = etcd.get(key.as_str(), Some(old.clone())).await.unwrap();
    assert_eq!(history.kvs().first().map(|kv| kv.value().to_vec()), Some(sealed));

    let current = now.header().unwrap().revision();
    etcd.compact(current, None).await.unwrap();
    let compacted = etcd.get(key.as_str(), Some(old)).await.unwrap_err().to_string();
    assert!(compacted.contains("compacted"), "{compacted}");
    // The secret's other version is untouched.
    let v2 = admin.get(get("/app/db", 2)).await.unwrap().into_inner();
    assert_eq!(v2.value, b"second");
}

/// What destroy leaves in the redb file, checked on the raw bytes: redb frees the pages that
/// held the value (copy-on-write; it does not zero them), so the ciphertext can survive in
/// freed pages until redb reuses them. This test pins that down for SECURITY.md: right after
/// the destroy the bytes may still be in the file; after enough later writes the pages are
/// reused and they are gone.
#[tokio::test]
async fn what_destroy_leaves_in_the_redb_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.redb");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&file, 10).unwrap());
    // A distinctive 2 KiB value standing in for a ciphertext (the store sees opaque bytes).
    let marker: Vec<u8> =
        (0..2048u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let path = secretgate::SecretPath::parse("/app/db").unwrap();
    store.put(&path, 0, &marker).await.unwrap();
    store.put(&path, 1, b"second").await.unwrap();
    store.destroy(&path, 1).await.unwrap();
    let found = |bytes: &[u8]| bytes.windows(marker.len()).any(|w| w == marker.as_slice());
    let right_after = found(&std::fs::read(&file).unwrap());
    // Later writes reuse the freed pages.
    let other = secretgate::SecretPath::parse("/app/other").unwrap();
    for v in 0..200u64 {
        store.put(&other, v, &vec![b'x'; 2048]).await.unwrap();
    }
    let later = found(&std::fs::read(&file).unwrap());
    eprintln!(
        "destroyed bytes in the redb file: right after {right_after}, after 200 writes {later}"
    );
    assert!(!later, "the freed pages were reused by 200 later writes");
}
