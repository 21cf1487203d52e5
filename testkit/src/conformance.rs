//! The store conformance suite: every `Store` backend must pass all of it. A backend's test
//! calls [`run_all`] with a function that makes a fresh, empty store keeping
//! [`MAX_VERSIONS`] versions per secret.

use std::{collections::BTreeSet, future::Future, sync::Arc};

use secretgate::{
    ChangeEvent, ChangeKind, PathPrefix, SecretMeta, SecretPath, Since, StoreError, VersionMeta,
    testing::Store,
};

/// Versions a conformance store must be configured to keep.
pub const MAX_VERSIONS: u32 = 3;

type BoxFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
type Case = (&'static str, fn(Arc<dyn Store>) -> BoxFuture);

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |s| Box::pin($name(s)))),*]
    };
}

const CASES: &[Case] = cases![
    put_then_get_round_trips,
    versions_count_up_and_old_versions_stay_readable,
    compare_and_set_create_only_and_conflicts,
    concurrent_writers_exactly_one_wins,
    only_the_newest_versions_are_kept,
    delete_is_soft_and_idempotent,
    missing_secrets_are_not_found,
    list_is_segment_wise_sorted_and_paginated,
    values_are_opaque_bytes,
    paths_are_case_sensitive,
    scan_walks_every_kept_version_in_order,
    replace_is_compare_and_set_on_the_value,
    audit_checkpoints_are_kept_per_log_and_invisible_to_secrets,
    undelete_restores_and_destroy_removes_for_good,
    changes_report_every_change_once_in_order,
    control_versions_are_created_once_each_in_order,
    sealed_writes_are_fenced_on_the_next_control_version,
    large_control_records_round_trip,
];

/// Runs every case, each on a fresh store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    for (name, case) in CASES {
        eprintln!("conformance: {name}");
        case(make().await).await;
    }
}

fn p(s: &str) -> SecretPath {
    SecretPath::parse(s).unwrap()
}

async fn put_then_get_round_trips(s: Arc<dyn Store>) {
    let info = s.put(&p("/app/db"), 0, b"s3cret").await.unwrap();
    assert_eq!(info.version, 1);
    assert!(info.deleted.is_none());
    let e = s.get(&p("/app/db"), None).await.unwrap();
    assert_eq!((e.version, e.current_version, e.value.as_slice()), (1, 1, &b"s3cret"[..]));
    assert_eq!(e.created, info.created);
    assert_eq!(s.current_version(&p("/app/db")).await.unwrap(), 1);
}

async fn versions_count_up_and_old_versions_stay_readable(s: Arc<dyn Store>) {
    for v in 1..=3u64 {
        let info = s.put(&p("/a"), v - 1, format!("value-{v}").as_bytes()).await.unwrap();
        assert_eq!(info.version, v);
    }
    let e = s.get(&p("/a"), Some(2)).await.unwrap();
    assert_eq!((e.version, e.current_version, e.value.as_slice()), (2, 3, &b"value-2"[..]));
    assert_eq!(s.get(&p("/a"), None).await.unwrap().value.as_slice(), b"value-3");
    let meta = s.versions(&p("/a")).await.unwrap();
    assert_eq!(meta.current_version, 3);
    assert_eq!(meta.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [3, 2, 1]);
    assert!(meta.versions.windows(2).all(|w| w[0].created >= w[1].created));
}

async fn compare_and_set_create_only_and_conflicts(s: Arc<dyn Store>) {
    s.put(&p("/c"), 0, b"one").await.unwrap();
    assert!(matches!(
        s.put(&p("/c"), 0, b"again").await,
        Err(StoreError::Conflict { expected: 0, current: 1 })
    ));
    assert!(matches!(
        s.put(&p("/c"), 7, b"future").await,
        Err(StoreError::Conflict { expected: 7, current: 1 })
    ));
    assert!(matches!(
        s.put(&p("/new"), 1, b"x").await,
        Err(StoreError::Conflict { expected: 1, current: 0 })
    ));
    assert_eq!(s.put(&p("/c"), 1, b"two").await.unwrap().version, 2);
    assert_eq!(s.get(&p("/c"), None).await.unwrap().value.as_slice(), b"two");
}

async fn concurrent_writers_exactly_one_wins(s: Arc<dyn Store>) {
    for expected in 0..2u64 {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    s.put(&p("/race"), expected, format!("w{i}").as_bytes()).await
                })
            })
            .collect();
        let mut wins = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(info) => wins.push((i, info.version)),
                Err(StoreError::Conflict { expected: e, current }) => {
                    assert_eq!((e, current), (expected, expected + 1));
                }
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(wins.len(), 1, "exactly one writer must win: {wins:?}");
        let (winner, version) = wins[0];
        assert_eq!(version, expected + 1);
        let e = s.get(&p("/race"), None).await.unwrap();
        assert_eq!(e.value.as_slice(), format!("w{winner}").as_bytes());
    }
}

async fn only_the_newest_versions_are_kept(s: Arc<dyn Store>) {
    for v in 1..=5u64 {
        s.put(&p("/k"), v - 1, &[v as u8]).await.unwrap();
    }
    let meta = s.versions(&p("/k")).await.unwrap();
    assert_eq!(meta.current_version, 5);
    let kept: Vec<u64> = meta.versions.iter().map(|v| v.version).collect();
    assert_eq!(kept.len(), MAX_VERSIONS as usize);
    assert_eq!(kept, [5, 4, 3]);
    assert!(matches!(s.get(&p("/k"), Some(1)).await, Err(StoreError::VersionNotFound(1))));
    assert!(matches!(s.get(&p("/k"), Some(6)).await, Err(StoreError::VersionNotFound(6))));
    assert_eq!(s.get(&p("/k"), Some(3)).await.unwrap().value.as_slice(), [3]);
}

async fn delete_is_soft_and_idempotent(s: Arc<dyn Store>) {
    s.put(&p("/d"), 0, b"v1").await.unwrap();
    let deleted = s.delete(&p("/d")).await.unwrap();
    assert_eq!(deleted.version, 1);
    assert!(deleted.deleted.is_some());
    assert!(matches!(s.get(&p("/d"), None).await, Err(StoreError::NotFound)));
    assert!(matches!(s.get(&p("/d"), Some(1)).await, Err(StoreError::VersionDeleted(1))));
    let again = s.delete(&p("/d")).await.unwrap();
    assert_eq!(again, deleted, "deleting twice changes nothing");
    let meta: SecretMeta = s.versions(&p("/d")).await.unwrap();
    assert!(!meta.is_live());
    assert!(s.list(&PathPrefix::Root, None, 10).await.unwrap().is_empty());
    // A deleted secret keeps its version counter: create-only fails, CAS on 1 works.
    assert!(matches!(s.put(&p("/d"), 0, b"x").await, Err(StoreError::Conflict { current: 1, .. })));
    let v2: VersionMeta = s.put(&p("/d"), 1, b"v2").await.unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(s.get(&p("/d"), None).await.unwrap().value.as_slice(), b"v2");
    assert_eq!(s.list(&PathPrefix::Root, None, 10).await.unwrap(), [p("/d")]);
}

async fn missing_secrets_are_not_found(s: Arc<dyn Store>) {
    assert!(matches!(s.get(&p("/none"), None).await, Err(StoreError::NotFound)));
    assert!(matches!(s.get(&p("/none"), Some(1)).await, Err(StoreError::NotFound)));
    assert!(matches!(s.delete(&p("/none")).await, Err(StoreError::NotFound)));
    assert!(matches!(s.versions(&p("/none")).await, Err(StoreError::NotFound)));
    assert_eq!(s.current_version(&p("/none")).await.unwrap(), 0);
}

async fn list_is_segment_wise_sorted_and_paginated(s: Arc<dyn Store>) {
    let all = ["/app", "/app/a", "/app/b/c", "/app-x/y", "/app.d", "/apple", "/zz", "/app/gone"];
    for path in all {
        s.put(&p(path), 0, b"v").await.unwrap();
    }
    s.delete(&p("/app/gone")).await.unwrap();
    let app = PathPrefix::parse("/app").unwrap();
    assert_eq!(s.list(&app, None, 100).await.unwrap(), [p("/app"), p("/app/a"), p("/app/b/c")]);
    let everything = s.list(&PathPrefix::Root, None, 100).await.unwrap();
    let mut expected: Vec<SecretPath> =
        all.iter().filter(|x| **x != "/app/gone").map(|x| p(x)).collect();
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(everything, expected);
    // Page through one at a time: every live path exactly once, in order.
    let mut seen = Vec::new();
    let mut after: Option<SecretPath> = None;
    loop {
        let page = s.list(&PathPrefix::Root, after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last().cloned() else { break };
        seen.extend(page);
        after = Some(last);
    }
    assert_eq!(seen, expected);
    let unique: BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len());
    // Resuming after the prefix itself continues into its subtree.
    assert_eq!(s.list(&app, Some(&p("/app")), 100).await.unwrap(), [p("/app/a"), p("/app/b/c")]);
    assert!(s.list(&PathPrefix::parse("/nothing").unwrap(), None, 10).await.unwrap().is_empty());
}

async fn values_are_opaque_bytes(s: Arc<dyn Store>) {
    let binary: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    s.put(&p("/bin"), 0, &binary).await.unwrap();
    assert_eq!(s.get(&p("/bin"), None).await.unwrap().value.as_slice(), binary.as_slice());
    s.put(&p("/empty"), 0, b"").await.unwrap();
    assert!(s.get(&p("/empty"), None).await.unwrap().value.is_empty());
}

async fn paths_are_case_sensitive(s: Arc<dyn Store>) {
    s.put(&p("/Case"), 0, b"upper").await.unwrap();
    s.put(&p("/case"), 0, b"lower").await.unwrap();
    assert_eq!(s.get(&p("/Case"), None).await.unwrap().value.as_slice(), b"upper");
    assert_eq!(s.get(&p("/case"), None).await.unwrap().value.as_slice(), b"lower");
}

async fn scan_walks_every_kept_version_in_order(s: Arc<dyn Store>) {
    for v in 1..=4u64 {
        s.put(&p("/b"), v - 1, format!("b{v}").as_bytes()).await.unwrap();
    }
    s.put(&p("/a"), 0, b"a1").await.unwrap();
    s.put(&p("/c"), 0, b"c1").await.unwrap();
    s.delete(&p("/c")).await.unwrap();
    s.put(&p("/b/x"), 0, b"bx1").await.unwrap();
    s.put(&p("/b-y"), 0, b"by1").await.unwrap();
    let all = s.scan(None, 100).await.unwrap();
    let got: Vec<(String, u64)> = all.iter().map(|r| (r.path.to_string(), r.version)).collect();
    let mut sorted = got.clone();
    sorted.sort();
    let expected =
        [("/a", 1), ("/b", 2), ("/b", 3), ("/b", 4), ("/b-y", 1), ("/b/x", 1), ("/c", 1)];
    let want: Vec<(String, u64)> = expected.iter().map(|(p, v)| (p.to_string(), *v)).collect();
    assert_eq!(sorted, want, "pruned versions are gone, deleted ones are included");
    let b: Vec<u64> = all.iter().filter(|r| r.path.as_str() == "/b").map(|r| r.version).collect();
    assert_eq!(b, [2, 3, 4], "versions of one secret in order");
    let b2 = all.iter().find(|r| r.path.as_str() == "/b" && r.version == 2).unwrap();
    assert_eq!(b2.value.as_slice(), b"b2");
    let want = got;
    // Paging with limit 2 visits the same records once each.
    let mut paged = Vec::new();
    let mut after: Option<(SecretPath, u64)> = None;
    loop {
        let page = s.scan(after.as_ref().map(|(p, v)| (p, *v)), 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.path.clone(), last.version));
        paged.extend(page.into_iter().map(|r| (r.path.to_string(), r.version)));
    }
    assert_eq!(paged, want);
}

async fn replace_is_compare_and_set_on_the_value(s: Arc<dyn Store>) {
    s.put(&p("/r"), 0, b"old1").await.unwrap();
    s.put(&p("/r"), 1, b"old2").await.unwrap();
    let before = s.versions(&p("/r")).await.unwrap();
    assert!(s.replace(&p("/r"), 1, b"old1", b"new1").await.unwrap());
    assert_eq!(s.get(&p("/r"), Some(1)).await.unwrap().value.as_slice(), b"new1");
    assert_eq!(s.get(&p("/r"), None).await.unwrap().value.as_slice(), b"old2");
    assert_eq!(s.versions(&p("/r")).await.unwrap(), before, "metadata unchanged");
    assert!(!s.replace(&p("/r"), 1, b"old1", b"again").await.unwrap(), "stale old value");
    assert_eq!(s.get(&p("/r"), Some(1)).await.unwrap().value.as_slice(), b"new1");
    assert!(!s.replace(&p("/r"), 9, b"x", b"y").await.unwrap(), "missing version");
    assert!(!s.replace(&p("/none"), 1, b"x", b"y").await.unwrap(), "missing secret");
    assert!(s.get(&p("/r"), Some(9)).await.is_err());
}

async fn audit_checkpoints_are_kept_per_log_and_invisible_to_secrets(s: Arc<dyn Store>) {
    assert_eq!(s.audit_checkpoint("log-a").await.unwrap(), None);
    assert!(s.audit_checkpoints().await.unwrap().is_empty());
    s.put_audit_checkpoint("log-a", b"{\"seq\":1}").await.unwrap();
    s.put_audit_checkpoint("log-a", b"{\"seq\":2}").await.unwrap();
    s.put_audit_checkpoint("log-b", b"{\"seq\":9}").await.unwrap();
    assert_eq!(s.audit_checkpoint("log-a").await.unwrap().unwrap(), b"{\"seq\":2}");
    assert_eq!(s.audit_checkpoint("log-b").await.unwrap().unwrap(), b"{\"seq\":9}");
    let all = s.audit_checkpoints().await.unwrap();
    let want = [("log-a", &b"{\"seq\":2}"[..]), ("log-b", &b"{\"seq\":9}"[..])];
    let all: Vec<(&str, &[u8])> = all.iter().map(|(i, l)| (i.as_str(), l.as_slice())).collect();
    assert_eq!(all, want);
    assert!(s.list(&PathPrefix::Root, None, 100).await.unwrap().is_empty());
    assert!(s.scan(None, 100).await.unwrap().is_empty());
}

async fn undelete_restores_and_destroy_removes_for_good(s: Arc<dyn Store>) {
    let path = p("/life");
    s.put(&path, 0, b"v1").await.unwrap();
    s.put(&path, 1, b"v2").await.unwrap();
    s.delete(&path).await.unwrap();
    assert!(matches!(s.get(&path, None).await, Err(StoreError::NotFound)));
    // Undelete brings the current version back, and the secret is live again.
    let back = s.undelete(&path, 2).await.unwrap();
    assert_eq!((back.version, back.deleted, back.destroyed), (2, None, None));
    assert_eq!(s.get(&path, None).await.unwrap().value.as_slice(), b"v2");
    assert_eq!(
        s.undelete(&path, 2).await.unwrap(),
        back,
        "undeleting a live version changes nothing"
    );
    assert_eq!(s.list(&PathPrefix::Root, None, 10).await.unwrap(), std::slice::from_ref(&path));
    // Destroy: the metadata says when; the value is gone from reads, scans and undelete.
    let gone = s.destroy(&path, 1).await.unwrap();
    assert!(gone.destroyed.is_some());
    assert!(matches!(s.get(&path, Some(1)).await, Err(StoreError::VersionDestroyed(1))));
    assert!(matches!(s.undelete(&path, 1).await, Err(StoreError::VersionDestroyed(1))));
    assert_eq!(s.destroy(&path, 1).await.unwrap(), gone, "destroying twice changes nothing");
    let scanned: Vec<u64> = s.scan(None, 10).await.unwrap().iter().map(|v| v.version).collect();
    assert_eq!(scanned, [2], "a destroyed version's value is not stored");
    let meta = s.versions(&path).await.unwrap();
    assert_eq!(meta.versions.iter().find(|v| v.version == 1).unwrap().destroyed, gone.destroyed);
    // Destroying the current version leaves the secret not found, its counter kept.
    s.destroy(&path, 2).await.unwrap();
    assert!(matches!(s.get(&path, None).await, Err(StoreError::NotFound)));
    assert!(s.list(&PathPrefix::Root, None, 10).await.unwrap().is_empty());
    assert!(matches!(s.put(&path, 0, b"x").await, Err(StoreError::Conflict { current: 2, .. })));
    // Versions that are not kept, and secrets that never were.
    assert!(matches!(s.undelete(&path, 9).await, Err(StoreError::VersionNotFound(9))));
    assert!(matches!(s.destroy(&path, 9).await, Err(StoreError::VersionNotFound(9))));
    assert!(matches!(s.undelete(&p("/never"), 1).await, Err(StoreError::NotFound)));
    assert!(matches!(s.destroy(&p("/never"), 1).await, Err(StoreError::NotFound)));
}

/// The events after `after`, once at least `n` are there (a backend's feed may follow its
/// commits asynchronously: etcd's watch).
async fn changes_after(s: &Arc<dyn Store>, after: u64, n: usize) -> Vec<ChangeEvent> {
    let changes = s.changes();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match changes.since(after, 1000) {
            Since::Events(e, _) if e.len() >= n => {
                return e.iter().map(|e| ChangeEvent::clone(e)).collect();
            }
            Since::Gone(start) => panic!("the feed lost history: complete after {start}"),
            Since::Events(..) => {}
        }
        assert!(std::time::Instant::now() < deadline, "fewer than {n} changes after {after}");
        let mut head = changes.subscribe();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), head.changed()).await;
    }
}

async fn changes_report_every_change_once_in_order(s: Arc<dyn Store>) {
    let before = s.changes().head();
    let (a, b) = (p("/w/a"), p("/w/b"));
    s.put(&a, 0, b"1").await.unwrap();
    s.put(&a, 1, b"2").await.unwrap();
    s.delete(&a).await.unwrap();
    s.delete(&a).await.unwrap(); // changes nothing: no event
    s.undelete(&a, 2).await.unwrap();
    s.destroy(&a, 1).await.unwrap();
    let old = s.get(&a, Some(2)).await.unwrap().value;
    assert!(s.replace(&a, 2, &old, b"rewrapped").await.unwrap()); // same version: no event
    s.put(&b, 0, b"3").await.unwrap();
    let events = changes_after(&s, before, 6).await;
    let seen: Vec<(&str, u64, ChangeKind)> =
        events.iter().map(|e| (e.path.as_str(), e.version, e.kind)).collect();
    assert_eq!(
        seen,
        [
            ("/w/a", 1, ChangeKind::Written),
            ("/w/a", 2, ChangeKind::Written),
            ("/w/a", 2, ChangeKind::Deleted),
            ("/w/a", 2, ChangeKind::Undeleted),
            ("/w/a", 1, ChangeKind::Destroyed),
            ("/w/b", 1, ChangeKind::Written),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].revision < w[1].revision), "{events:?}");
    let meta = s.versions(&a).await.unwrap();
    assert_eq!(events[0].time, meta.versions[1].created, "a write's time is its version's");
    assert_eq!(Some(events[4].time), meta.versions[1].destroyed);
    // Resuming after any event gives exactly the ones after it.
    let rest = changes_after(&s, events[2].revision, 3).await;
    assert_eq!(rest, events[3..]);
}

async fn control_versions_are_created_once_each_in_order(s: Arc<dyn Store>) {
    let mut changes = s.control_changes();
    changes.borrow_and_update();
    s.put_control("policy", 1, b"v1").await.unwrap();
    // The change shows on the store's signal (on etcd through its watch feed).
    tokio::time::timeout(std::time::Duration::from_secs(10), changes.changed())
        .await
        .expect("a control change is signalled")
        .unwrap();
    s.put_control("policy", 1, b"v1").await.expect("a retried create finds its own record");
    assert!(matches!(
        s.put_control("policy", 1, b"other").await,
        Err(StoreError::Conflict { expected: 0, current: 1 })
    ));
    assert!(matches!(
        s.put_control("policy", 3, b"gap").await,
        Err(StoreError::Conflict { expected: 2, current: 1 })
    ));
    s.put_control("policy", 2, b"v2").await.unwrap();
    s.put_control("keyring", 1, b"k1").await.unwrap();
    let all = s.control_versions("policy", None, 10).await.unwrap();
    assert_eq!(all, [(2, b"v2".to_vec()), (1, b"v1".to_vec())]);
    assert_eq!(s.control_versions("policy", None, 1).await.unwrap(), [(2, b"v2".to_vec())]);
    assert_eq!(s.control_versions("policy", Some(2), 10).await.unwrap(), [(1, b"v1".to_vec())]);
    assert_eq!(s.control_versions("keyring", None, 10).await.unwrap(), [(1, b"k1".to_vec())]);
    assert!(s.control_versions("trust", None, 10).await.unwrap().is_empty());
    // Control state is outside the secret namespace.
    assert!(s.list(&PathPrefix::parse("/").unwrap(), None, 100).await.unwrap().is_empty());
}

async fn sealed_writes_are_fenced_on_the_next_control_version(s: Arc<dyn Store>) {
    s.fence_writes("keyring", 2);
    s.put(&p("/f"), 0, b"one").await.unwrap();
    s.put_control("keyring", 1, b"k1").await.unwrap();
    s.put(&p("/f"), 1, b"two").await.unwrap();
    s.put_control("keyring", 2, b"k2").await.unwrap();
    // Version 2 exists: sealed writes fail and change nothing; other writes go on.
    assert!(matches!(
        s.put(&p("/f"), 2, b"three").await,
        Err(StoreError::Fenced { version: 2, .. })
    ));
    assert!(matches!(
        s.replace(&p("/f"), 2, b"two", b"rewrapped").await,
        Err(StoreError::Fenced { version: 2, .. })
    ));
    let e = s.get(&p("/f"), None).await.unwrap();
    assert_eq!((e.version, e.value.as_slice()), (2, &b"two"[..]));
    s.delete(&p("/f")).await.unwrap();
    s.undelete(&p("/f"), 2).await.unwrap();
    // Moved on to the version in force: writes go through again.
    s.fence_writes("keyring", 3);
    assert_eq!(s.put(&p("/f"), 2, b"three").await.unwrap().version, 3);
    assert!(s.replace(&p("/f"), 3, b"three", b"rewrapped").await.unwrap());
}

async fn large_control_records_round_trip(s: Arc<dyn Store>) {
    // Over etcd's default request limit (1.5 MiB): stored in parts there.
    let big: Vec<u8> =
        (0..3_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    s.put_control("policy", 1, &big).await.unwrap();
    s.put_control("policy", 1, &big).await.expect("a retried create finds its own record");
    assert!(matches!(
        s.put_control("policy", 1, &big[1..]).await,
        Err(StoreError::Conflict { expected: 0, current: 1 })
    ));
    s.put_control("policy", 2, b"small").await.unwrap();
    let all = s.control_versions("policy", None, 10).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].0, all[0].1.as_slice()), (2, &b"small"[..]));
    assert_eq!(all[1].0, 1);
    assert!(all[1].1 == big, "the large record reads back whole");
}
