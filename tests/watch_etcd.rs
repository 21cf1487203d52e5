//! `Secrets.Watch` on a real 3-member etcd cluster: events from the replica's one watch
//! feed, from any replica and from writes made straight into etcd; resumable across a
//! gateway restart from etcd's own history and across a feed moved off a stalled member;
//! resync required once etcd compacted it away.

use std::time::Duration;

use secretgate::proto::v1::{
    ChangeKind, DeleteRequest, DestroyRequest, PutRequest, UndeleteRequest, WatchEvent,
};
use secretgate_testkit::{TestGateway, etcd::EtcdCluster, watch::Watch};
use tonic::Code;

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";

fn put(path: &str) -> PutRequest {
    PutRequest { path: path.into(), value: b"v".to_vec(), expected_version: None }
}

async fn watcher(gw: &TestGateway, prefix: &str, from: u64) -> Watch {
    Watch::open(&mut gw.client(READER).await, prefix, from).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_one_replica_sees_writes_through_another_and_straight_into_etcd() {
    let cluster = EtcdCluster::start().await;
    let a = cluster.gateway("/sg-watch/", 5000).await;
    let keyring = a.config.crypto.keyring.clone();
    let b = TestGateway::start_with(|c| {
        cluster.configure(c, "/sg-watch/", 5000);
        c.crypto.keyring = keyring;
    })
    .await;
    let mut watch = watcher(&b, "/shared", 0).await;
    let mut admin = a.client(ADMIN).await;
    admin.put(put("/shared/x")).await.unwrap();
    admin.delete(DeleteRequest { path: "/shared/x".into() }).await.unwrap();
    let events = watch.events(2, Duration::from_secs(1)).await;
    let seen: Vec<_> = events.iter().map(|e| (e.path.as_str(), e.version, e.kind())).collect();
    assert_eq!(
        seen,
        [("/shared/x", 1, ChangeKind::Written), ("/shared/x", 1, ChangeKind::Deleted)]
    );

    // Metadata written into etcd by someone else (a restore, another tool) is a change too.
    let mut etcd = cluster.client(None).await;
    let meta = r#"{"current_version":1,"versions":[{"version":1,"created":5,"deleted":null}]}"#;
    let put = etcd.put("/sg-watch/meta/shared/raw", meta, None).await.unwrap();
    let raw = watch.events(1, Duration::from_secs(2)).await;
    assert_eq!((raw[0].path.as_str(), raw[0].kind()), ("/shared/raw", ChangeKind::Written));
    assert_eq!(raw[0].revision as i64, put.header().unwrap().revision());
    // Garbage under the prefix is skipped (and logged), never sent.
    etcd.put("/sg-watch/meta/shared/bad", "not json", None).await.unwrap();
    watch.quiet(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_resumed_watch_gets_the_missed_changes_from_etcd_history() {
    let cluster = EtcdCluster::start().await;
    let mut gw = cluster.gateway("/sg-watch-restart/", 5000).await;
    let mut admin = gw.client(ADMIN).await;
    let mut watch = watcher(&gw, "/shared", 0).await;
    admin.put(put("/shared/before")).await.unwrap();
    watch.events(1, Duration::from_secs(1)).await;
    let resume = watch.revision;
    gw.stop().await;
    assert_eq!(watch.end(Duration::from_secs(2)).await.code(), Code::Unavailable);
    // Changes while no gateway runs: straight into etcd, and through another gateway.
    let mut etcd = cluster.client(None).await;
    let meta = r#"{"current_version":1,"versions":[{"version":1,"created":5,"deleted":null}]}"#;
    etcd.put("/sg-watch-restart/meta/shared/while-down", meta, None).await.unwrap();
    gw.start_again().await;
    let mut admin = gw.client(ADMIN).await;
    admin.put(put("/shared/after")).await.unwrap();
    let mut resumed = watcher(&gw, "/shared", resume).await;
    let events = resumed.events(2, Duration::from_secs(5)).await;
    let paths: Vec<_> = events.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/shared/while-down", "/shared/after"]);
    resumed.quiet(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_etcd_compacted_away_gets_the_resync_error() {
    let cluster = EtcdCluster::start().await;
    let mut gw = cluster.gateway("/sg-watch-compact/", 5000).await;
    let mut admin = gw.client(ADMIN).await;
    let mut watch = watcher(&gw, "/shared", 0).await;
    admin.put(put("/shared/a")).await.unwrap();
    watch.events(1, Duration::from_secs(1)).await;
    let old = watch.revision;
    drop(watch);
    admin.put(put("/shared/b")).await.unwrap();
    let mut etcd = cluster.client(None).await;
    // History moves on outside the prefix after the newest change under it.
    let now = etcd.put("/elsewhere/x", "x", None).await.unwrap().header().unwrap().revision();
    etcd.compact(now, None).await.unwrap();
    let newest = etcd.get("/sg-watch-compact/meta/shared/b", None).await.unwrap();
    let newest = newest.kvs()[0].mod_revision() as u64;
    // A gateway starting now cannot read back past the compaction...
    gw.restart().await;
    let gone = Watch::open(&mut gw.client(READER).await, "/shared", old).await.unwrap_err();
    assert_eq!(gone.code(), Code::OutOfRange, "{gone:?}");
    assert!(gone.message().starts_with("resync required"), "{gone:?}");
    // ...but a client that saw the newest change resumes: nothing happened after it.
    let mut resumed = watcher(&gw, "/shared", newest).await;
    resumed.quiet(Duration::from_millis(300)).await;
    // From now on it works.
    let mut fresh = watcher(&gw, "/shared", 0).await;
    admin = gw.client(ADMIN).await;
    admin.put(put("/shared/c")).await.unwrap();
    assert_eq!(fresh.events(1, Duration::from_secs(1)).await[0].path, "/shared/c");
}

/// A quiet prefix whose history etcd compacts (auto-compaction does this all the time)
/// must not make watchers resync when the gateway's watch breaks and finds its restart
/// revision compacted: nothing under the prefix changed in the lost history, and the list
/// the gateway reads again shows that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_feed_over_compacted_quiet_history_does_not_make_watchers_resync() {
    let mut cluster = EtcdCluster::start().await;
    let gw = cluster.gateway("/sg-watch-quiet/", 5000).await;
    let mut admin = gw.client(ADMIN).await;
    let mut watch = watcher(&gw, "/shared", 0).await;
    admin.put(put("/shared/a")).await.unwrap();
    watch.events(1, Duration::from_secs(1)).await;
    // History moves on outside the prefix, and is compacted past the feed's head.
    let mut etcd = cluster.client(None).await;
    etcd.put("/elsewhere/1", "x", None).await.unwrap();
    let now = etcd.put("/elsewhere/2", "x", None).await.unwrap().header().unwrap().revision();
    etcd.compact(now, None).await.unwrap();
    // Every member restarts in turn, so the gateway's watch breaks wherever it was.
    for i in 0..3 {
        cluster.kill(i);
        cluster.restart(i).await;
    }
    admin.put(put("/shared/b")).await.unwrap();
    let next = watch.try_message(Duration::from_secs(15)).await;
    let events = next.expect("the stream goes on, no resync").expect("an event");
    assert_eq!(events.events[0].path, "/shared/b");
}

/// What each change was, named alike whoever tells it: a replica whose cache holds the
/// metadata before each change (etcd sends no previous values then), one with the cache off
/// (etcd sends them), and the first after a restart, replaying etcd's history from a list
/// made just before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_is_named_alike_with_the_cache_on_off_and_after_a_restart() {
    let cluster = EtcdCluster::start().await;
    // A short history, so that after the restart the replay starts after etcd's first
    // revision and the cache is listed as of the revision before it.
    let mut a = TestGateway::start_with(|c| {
        cluster.configure(c, "/sg-watch-kinds/", 5000);
        c.watch.history_events = secretgate::config::Ranged::of::<12>();
    })
    .await;
    let keyring = a.config.crypto.keyring.clone();
    let b = TestGateway::start_with(|c| {
        cluster.configure(c, "/sg-watch-kinds/", 5000);
        c.crypto.keyring = keyring;
        if let secretgate::config::StoreConfig::Etcd(etcd) = &mut c.store {
            etcd.cache = false;
        }
    })
    .await;
    let mut admin = a.client(ADMIN).await;
    for _ in 0..20 {
        admin.put(put("/shared/padding")).await.unwrap();
    }
    // Opened after the padding: a stream that is not polled while more than the 12 kept
    // changes arrive falls out of the history and must resync.
    let (mut on, mut off) = (watcher(&a, "/shared/k", 0).await, watcher(&b, "/shared/k", 0).await);
    admin.put(put("/shared/k/x")).await.unwrap();
    admin.put(put("/shared/k/x")).await.unwrap();
    admin.delete(DeleteRequest { path: "/shared/k/x".into() }).await.unwrap();
    admin.undelete(UndeleteRequest { path: "/shared/k/x".into(), version: 2 }).await.unwrap();
    admin.destroy(DestroyRequest { path: "/shared/k/x".into(), version: 1 }).await.unwrap();
    admin.put(put("/shared/k/y")).await.unwrap();
    let named = |events: Vec<WatchEvent>| -> Vec<(String, u64, ChangeKind)> {
        events.into_iter().map(|e| (e.path.clone(), e.version, e.kind())).collect()
    };
    let want: Vec<(String, u64, ChangeKind)> = [
        ("/shared/k/x", 1, ChangeKind::Written),
        ("/shared/k/x", 2, ChangeKind::Written),
        ("/shared/k/x", 2, ChangeKind::Deleted),
        ("/shared/k/x", 2, ChangeKind::Undeleted),
        ("/shared/k/x", 1, ChangeKind::Destroyed),
        ("/shared/k/y", 1, ChangeKind::Written),
    ]
    .into_iter()
    .map(|(p, v, k)| (p.to_owned(), v, k))
    .collect();
    let seen = on.events(6, Duration::from_secs(2)).await;
    // The restarted replica is asked to resume from just before the first of them.
    let start = seen[0].revision - 1;
    assert_eq!(named(seen), want, "cache on");
    assert_eq!(named(off.events(6, Duration::from_secs(2)).await), want, "cache off");
    a.stop().await;
    a.start_again().await;
    let mut replayed = watcher(&a, "/shared/k", start).await;
    assert_eq!(named(replayed.events(6, Duration::from_secs(5)).await), want, "after a restart");
}

/// A feed whose member stops answering (paused: its watch hangs, it does not close) is
/// moved to another member and replays what it missed from etcd's history; the changes
/// made meanwhile are named as they were made, from a cache listed as of where the feed
/// stopped (so etcd is not asked for previous values). Each member is paused in turn, so
/// the one serving the feed is paused at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_feed_is_stalled_are_named_alike_after_it_moves() {
    let cluster = EtcdCluster::start().await;
    let a = cluster.gateway("/sg-watch-stall/", 10_000).await;
    let mut on = watcher(&a, "/shared", 0).await;
    let mut admin = a.client(ADMIN).await;
    admin.put(put("/shared/before")).await.unwrap();
    on.events(1, Duration::from_secs(5)).await;
    let named = |events: Vec<WatchEvent>| -> Vec<(String, u64, ChangeKind)> {
        events.into_iter().map(|e| (e.path.clone(), e.version, e.kind())).collect()
    };
    for m in 0..3 {
        cluster.pause(m);
        let x = format!("/shared/m{m}/x");
        let y = format!("/shared/m{m}/y");
        admin.put(put(&x)).await.unwrap();
        admin.put(put(&x)).await.unwrap();
        admin.delete(DeleteRequest { path: x.clone() }).await.unwrap();
        admin.undelete(UndeleteRequest { path: x.clone(), version: 2 }).await.unwrap();
        admin.destroy(DestroyRequest { path: x.clone(), version: 1 }).await.unwrap();
        admin.put(put(&y)).await.unwrap();
        let want = vec![
            (x.clone(), 1, ChangeKind::Written),
            (x.clone(), 2, ChangeKind::Written),
            (x.clone(), 2, ChangeKind::Deleted),
            (x.clone(), 2, ChangeKind::Undeleted),
            (x.clone(), 1, ChangeKind::Destroyed),
            (y.clone(), 1, ChangeKind::Written),
        ];
        // A stalled feed is given up after its quiet time and progress deadline (7 s).
        let seen = named(on.events(6, Duration::from_secs(30)).await);
        assert_eq!(seen, want, "member m{m} paused");
        cluster.resume(m);
        cluster.wait_healthy().await;
    }
}
