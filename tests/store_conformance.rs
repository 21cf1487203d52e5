//! The store conformance suite against both backends: the embedded (redb) store and a real
//! 3-member etcd cluster.

use secretgate_testkit as support;

use std::sync::Arc;

use secretgate::{
    Config,
    config::StoreConfig,
    testing::{EmbeddedStore, EtcdStore, Store},
};
use support::{
    conformance::{MAX_VERSIONS, run_all},
    etcd::EtcdCluster,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    run_all(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("store-{n}.redb"));
        async move { Arc::new(EmbeddedStore::open(&path, MAX_VERSIONS).unwrap()) as Arc<dyn Store> }
    })
    .await;
}

/// Every case gets a fresh prefix on one shared cluster, so cases cannot see each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let cluster = EtcdCluster::start().await;
    let counter = std::sync::atomic::AtomicUsize::new(0);
    run_all(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut config = Config::default();
        cluster.configure(&mut config, &format!("/conformance-{n}/"), 5000);
        async move {
            let StoreConfig::Etcd(etcd) = &config.store else {
                unreachable!("configured for etcd")
            };
            Arc::new(EtcdStore::connect(etcd, MAX_VERSIONS).unwrap()) as Arc<dyn Store>
        }
    })
    .await;
}

#[tokio::test]
async fn embedded_store_survives_reopen_and_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/store.redb");
    let path_ = secretgate::SecretPath::parse("/persist").unwrap();
    {
        let s = EmbeddedStore::open(&path, 10).unwrap();
        s.put(&path_, 0, b"kept").await.unwrap();
    }
    let s = EmbeddedStore::open(&path, 10).unwrap();
    assert_eq!(s.get(&path_, None).await.unwrap().value.as_slice(), b"kept");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join("nested")), 0o700);
}

#[test]
fn a_store_file_in_use_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _first = EmbeddedStore::open(&path, 10).unwrap();
    let err = EmbeddedStore::open(&path, 10).unwrap_err().to_string();
    assert!(err.contains("store.redb"), "{err}");
}

/// The embedded store keeps its newest changes in the file: a watcher can resume across a
/// restart, and one that resumes from before what is kept is told so.
#[tokio::test]
async fn embedded_changes_survive_reopen_and_only_the_newest_are_kept() {
    use secretgate::Since;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let secret = secretgate::SecretPath::parse("/c").unwrap();
    {
        let s = EmbeddedStore::open_with_history(&path, 10, 4).unwrap();
        for v in 0..6 {
            s.put(&secret, v, b"x").await.unwrap();
        }
        assert_eq!(s.changes().head(), 6);
    }
    let s = EmbeddedStore::open_with_history(&path, 10, 4).unwrap();
    let changes = s.changes();
    assert_eq!((changes.start(), changes.head()), (2, 6), "the newest 4 of 6 are kept");
    let Since::Events(events, upto) = changes.since(2, 100) else { panic!("gone") };
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    assert_eq!((versions, upto), (vec![3, 4, 5, 6], 6));
    assert!(matches!(changes.since(1, 100), Since::Gone(2)), "revision 2 is forgotten");
    s.put(&secret, 6, b"x").await.unwrap();
    assert_eq!(s.changes().head(), 7, "revisions go on from the file's");
}
