//! `Secrets.Watch` through real mTLS on a real gateway (issue 18): events as they happen,
//! authorized one by one against the policy in force, resumable, bounded, audited. The
//! core cases run on both the embedded store and a real 3-member etcd cluster; the
//! etcd-only ones (other replicas, raw etcd writes, compaction) are in tests/watch_etcd.rs.

use std::time::Duration;

use secretgate::{
    Config,
    audit::Phase,
    proto::v1::{
        ChangeKind, DeleteRequest, DestroyRequest, PutRequest, UndeleteRequest, WatchResponse,
        secrets_client::SecretsClient,
    },
};
use secretgate_testkit::{
    TEST_POLICY, TestGateway, audit::read_log, etcd::EtcdCluster, watch as w, watch::Watch,
    write_policy,
};
use tonic::{Code, transport::Channel};

/// Where a test gateway keeps its secrets: the embedded store, or a real 3-member etcd
/// cluster started for the test.
enum Store {
    Embedded,
    Etcd(Box<EtcdCluster>),
}

impl Store {
    fn configure(&self, c: &mut Config) {
        if let Self::Etcd(cluster) = self {
            cluster.configure(c, "/sg-watch/", 5000);
        }
    }

    async fn gateway(&self, f: impl FnOnce(&mut Config)) -> TestGateway {
        TestGateway::start_with(|c| {
            self.configure(c);
            f(c);
        })
        .await
    }
}

/// Each named test once on the embedded store and once on etcd.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Store::Embedded).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let cluster = secretgate_testkit::etcd::EtcdCluster::start().await;
                    super::$name(super::Store::Etcd(Box::new(cluster))).await
                }
            )*
        }
    };
}

on_both_stores![
    a_watcher_sees_each_change_within_a_second_and_never_a_value,
    a_watcher_never_sees_what_it_may_not_read_and_the_log_counts_it_once,
    a_policy_change_stops_events_at_once_and_ends_the_stream_when_no_grant_is_left,
    opening_is_refused_without_a_grant_and_past_the_limit_per_principal,
    after_a_restart_a_resumed_watch_gets_exactly_the_changes_it_missed,
    a_watcher_whose_certificate_is_revoked_is_cut_off,
];

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";

fn put(path: &str) -> PutRequest {
    PutRequest { path: path.into(), value: b"v".to_vec(), expected_version: None }
}

async fn watcher(gw: &TestGateway, who: &str, prefix: &str, from: u64) -> Watch {
    Watch::open(&mut gw.client(who).await, prefix, from).await.unwrap()
}

async fn a_watcher_sees_each_change_within_a_second_and_never_a_value(store: Store) {
    let gw = store.gateway(|_| {}).await;
    let mut admin = gw.client(ADMIN).await;
    let mut watch = watcher(&gw, READER, "/shared", 0).await;
    admin.put(put("/shared/db")).await.unwrap();
    admin.put(put("/shared/db")).await.unwrap();
    admin.delete(DeleteRequest { path: "/shared/db".into() }).await.unwrap();
    admin.undelete(UndeleteRequest { path: "/shared/db".into(), version: 2 }).await.unwrap();
    admin.destroy(DestroyRequest { path: "/shared/db".into(), version: 1 }).await.unwrap();
    let events = watch.events(5, Duration::from_secs(1)).await;
    let seen: Vec<_> = events.iter().map(|e| (e.path.as_str(), e.version, e.kind())).collect();
    assert_eq!(
        seen,
        [
            ("/shared/db", 1, ChangeKind::Written),
            ("/shared/db", 2, ChangeKind::Written),
            ("/shared/db", 2, ChangeKind::Deleted),
            ("/shared/db", 2, ChangeKind::Undeleted),
            ("/shared/db", 1, ChangeKind::Destroyed),
        ]
    );
    assert!(events.windows(2).all(|p| p[0].revision < p[1].revision));
    assert!(events.iter().all(|e| e.time.is_some()));
    assert_eq!(watch.revision, events[4].revision, "the stream says where to resume");
}

async fn a_watcher_never_sees_what_it_may_not_read_and_the_log_counts_it_once(store: Store) {
    let gw = store.gateway(|_| {}).await;
    let mut admin = gw.client(ADMIN).await;
    // The reader may read /shared only; watching everything, it sees only that.
    let mut watch = watcher(&gw, READER, "/", 0).await;
    for p in ["/secret/a", "/shared/a", "/secret/b", "/sharedx", "/shared/b/c"] {
        admin.put(put(p)).await.unwrap();
    }
    let events = watch.events(2, Duration::from_secs(2)).await;
    let paths: Vec<_> = events.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/shared/a", "/shared/b/c"]);
    watch.quiet(Duration::from_millis(300)).await;
    drop(watch);
    // One record when the stream opened and one when it ended, with the counts; none per
    // change (three hidden writes, no record naming them for the reader).
    let records = w::records_of(&gw, READER).await;
    assert_eq!(records.iter().filter(|r| r.phase == Some(Phase::Open)).count(), 1);
    let close = records.iter().find(|r| r.phase == Some(Phase::Outcome)).unwrap();
    assert_eq!(close.status.as_deref(), Some("CANCELLED"));
    let summary = close.reason.as_deref().unwrap();
    assert!(summary.contains("2 changes sent, 3 skipped"), "{summary}");
    assert_eq!(records.len(), 2, "{records:?}");
}

async fn a_policy_change_stops_events_at_once_and_ends_the_stream_when_no_grant_is_left(
    store: Store,
) {
    let gw = store.gateway(|_| {}).await;
    let mut admin = gw.client(ADMIN).await;
    let mut watch = watcher(&gw, READER, "/shared", 0).await;
    admin.put(put("/shared/a/1")).await.unwrap();
    assert_eq!(watch.events(1, Duration::from_secs(1)).await[0].path, "/shared/a/1");

    // Narrow the reader to /shared/b: /shared/a is hidden from the next event on.
    let narrower = TEST_POLICY.replace("/shared/**, read", "/shared/b/**, read");
    write_policy(&gw.config.authz.policies, &narrower);
    w::until_decided(&mut gw.client(READER).await, "/shared/a/x", Code::PermissionDenied).await;
    admin.put(put("/shared/a/2")).await.unwrap();
    admin.put(put("/shared/b/1")).await.unwrap();
    let events = watch.events(1, Duration::from_secs(2)).await;
    assert_eq!(events[0].path, "/shared/b/1", "{events:?}");

    // No read grant left under the prefix: the stream ends.
    let none = TEST_POLICY.replace("/shared/**, read", "/elsewhere/**, read");
    write_policy(&gw.config.authz.policies, &none);
    let end = watch.end(Duration::from_secs(15)).await;
    assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
    assert!(end.message().contains("may not read anything at or below /shared"), "{end:?}");
}

async fn opening_is_refused_without_a_grant_and_past_the_limit_per_principal(store: Store) {
    let gw = store
        .gateway(|c| {
            c.watch.max_per_principal = secretgate::config::Ranged::of::<2>();
        })
        .await;
    let mut reader = gw.client(READER).await;
    let denied = Watch::open(&mut reader, "/secret", 0).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let bad = Watch::open(&mut reader, "/shared/../x", 0).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let _one = Watch::open(&mut reader, "/shared", 0).await.unwrap();
    let _two = Watch::open(&mut reader, "/shared", 0).await.unwrap();
    let third = Watch::open(&mut reader, "/shared", 0).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    assert!(third.message().contains("watch.max_per_principal"), "{third:?}");
    // Another principal has its own count; closing one gives the slot back.
    let _admin = Watch::open(&mut gw.client(ADMIN).await, "/", 0).await.unwrap();
    drop(_one);
    w::until_opens(&mut reader, "/shared").await;
}

async fn after_a_restart_a_resumed_watch_gets_exactly_the_changes_it_missed(store: Store) {
    let mut gw = store.gateway(|_| {}).await;
    let mut admin = gw.client(ADMIN).await;
    let mut watch = watcher(&gw, READER, "/shared", 0).await;
    admin.put(put("/shared/before")).await.unwrap();
    let seen = watch.events(1, Duration::from_secs(1)).await;
    let resume = watch.revision;
    assert_eq!(resume, seen[0].revision);

    gw.stop().await;
    // Shutdown ends the stream with UNAVAILABLE and where to resume, without waiting.
    let end = watch.end(Duration::from_secs(2)).await;
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(w::resume_revision(&end), Some(resume), "{end:?}");
    gw.start_again().await;
    let mut admin = gw.client(ADMIN).await;
    for p in ["/shared/missed-1", "/secret/hidden", "/shared/missed-2"] {
        admin.put(put(p)).await.unwrap();
    }
    let mut resumed = watcher(&gw, READER, "/shared", resume).await;
    let events = resumed.events(2, Duration::from_secs(2)).await;
    let paths: Vec<_> = events.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/shared/missed-1", "/shared/missed-2"]);
    resumed.quiet(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_forgotten_history_is_told_to_resync() {
    let gw = TestGateway::start_with(|c| {
        c.watch.history_events = secretgate::config::Ranged::of::<3>();
    })
    .await;
    let mut admin = gw.client(ADMIN).await;
    for _ in 0..5 {
        admin.put(put("/shared/x")).await.unwrap();
    }
    let mut reader = gw.client(READER).await;
    let gone = Watch::open(&mut reader, "/shared", 1).await.unwrap_err();
    assert_eq!(gone.code(), Code::OutOfRange, "{gone:?}");
    assert!(gone.message().starts_with("resync required"), "{gone:?}");
    assert!(gone.message().contains("history starts after revision 2"), "{gone:?}");
    // From what is kept, it works.
    let mut ok = Watch::open(&mut reader, "/shared", 2).await.unwrap();
    assert_eq!(ok.events(3, Duration::from_secs(1)).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_sends_heartbeats_with_its_resume_revision() {
    let gw = TestGateway::start_with(|c| {
        c.watch.heartbeat_secs = secretgate::config::Ranged::of::<1>();
    })
    .await;
    let mut admin = gw.client(ADMIN).await;
    admin.put(put("/secret/outside")).await.unwrap();
    let mut watch = watcher(&gw, READER, "/shared", 0).await;
    admin.put(put("/secret/hidden")).await.unwrap();
    let beat: WatchResponse = watch.message(Duration::from_secs(3)).await.unwrap();
    assert!(beat.events.is_empty());
    assert_eq!(beat.revision, 2, "every change up to the hidden write was handled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_watcher_is_cut_off_with_a_resume_revision_while_others_carry_on() {
    let gw = TestGateway::start_with(|c| {
        c.watch.max_lag_events = secretgate::config::Ranged::of::<300>();
    })
    .await;
    // The slow one never reads until the end: once its HTTP/2 window (16 KiB here) and the
    // gateway's send buffer for the stream (hyper's, 400 KiB) are full, the gateway stops
    // taking its changes, and more than the limit pile up behind it. Long paths (~440 bytes
    // an event) fill those 416 KiB with about 950 of the 1500 changes.
    let mut small = w::small_window_client(&gw, READER, 16 * 1024).await;
    let mut slow = Watch::open(&mut small, "/shared", 0).await.unwrap();
    let writes = 1500;
    // The brisk one reads all along.
    let mut brisk = watcher(&gw, READER, "/shared", 0).await;
    let brisk = tokio::spawn(async move { brisk.events(writes, Duration::from_secs(120)).await });
    let long = format!("/shared/{}", "p".repeat(400));
    let mut writers = Vec::new();
    // Two writers, so the reader (in the same process, on a busy 2-core machine) is not
    // starved of CPU and cut off itself.
    for n in 0..2 {
        let mut admin: SecretsClient<Channel> = gw.client(ADMIN).await;
        let long = long.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..writes / 2 {
                admin.put(put(&format!("{long}/{n}/{i:04}"))).await.unwrap();
            }
        }));
    }
    for t in writers {
        t.await.unwrap();
    }
    assert_eq!(brisk.await.unwrap().len(), writes, "the reading watcher got every change");

    let (received, end) = slow.drain(Duration::from_secs(10)).await;
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("too slow"), "{end:?}");
    let resume = w::resume_revision(&end).expect("a resume revision");
    assert!(received.len() < writes, "cut off before the end");
    assert_eq!(resume, slow.revision, "it resumes where its last message ended");
    // Resuming from there gives the rest, exactly.
    let mut again = watcher(&gw, READER, "/shared", resume).await;
    let rest = again.events(writes - received.len(), Duration::from_secs(10)).await;
    let mut all: Vec<_> = received.iter().chain(&rest).map(|e| e.revision).collect();
    all.dedup();
    assert_eq!(all.len(), writes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_a_refused_opening() {
    let gw = TestGateway::start().await;
    let mut reader = gw.client(READER).await;
    Watch::open(&mut reader, "/secret", 0).await.unwrap_err();
    let log = read_log(&gw.config.audit.path);
    let refused = log
        .iter()
        .map(|(_, r)| r)
        .find(|r| r.method.as_deref() == Some("secretgate.v1.Secrets/Watch"))
        .unwrap();
    assert_eq!(refused.status.as_deref(), Some("PERMISSION_DENIED"));
    assert_eq!(refused.path.as_deref(), Some("/secret"));
}

async fn a_watcher_whose_certificate_is_revoked_is_cut_off(store: Store) {
    use secretgate_testkit::{Ca, TEST_CA};
    let next_week = time::OffsetDateTime::now_utc() + time::Duration::days(7);
    let ca = Ca::new(TEST_CA);
    let victim = ca.client(READER);
    let empty_crl = ca.crl(&[], next_week);
    let gw = TestGateway::try_start(ca, TEST_POLICY, |c| {
        store.configure(c);
        c.tls.client_crl = c.tls.client_ca.with_file_name("client-crl.pem");
        c.tls.reload_interval_secs = secretgate::config::Ranged::of::<1>();
        c.watch.heartbeat_secs = secretgate::config::Ranged::of::<1>();
        std::fs::write(&c.tls.client_crl, empty_crl).unwrap();
    })
    .await
    .unwrap();
    let mut client = SecretsClient::new(gw.channel(&victim).await.unwrap());
    let mut watch = Watch::open(&mut client, "/shared", 0).await.unwrap();
    let mut admin = gw.client(ADMIN).await;
    admin.put(put("/shared/a")).await.unwrap();
    watch.events(1, Duration::from_secs(1)).await;
    let resume = watch.revision;

    let crl = gw.ca.crl(&[&victim], next_week);
    let tmp = gw.config.tls.client_crl.with_extension("tmp");
    std::fs::write(&tmp, crl).unwrap();
    std::fs::rename(&tmp, &gw.config.tls.client_crl).unwrap();
    // The next check (a change, or the heartbeat) ends the stream.
    let (events, end) = watch.drain(Duration::from_secs(10)).await;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(end.message().contains("revoked"), "{end:?}");
    assert_eq!(w::resume_revision(&end), Some(resume));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_the_request_timeout() {
    let gw = TestGateway::start_with(|c| {
        c.limits.request_timeout_secs = secretgate::config::Ranged::of::<1>();
        c.watch.heartbeat_secs = secretgate::config::Ranged::of::<1>();
    })
    .await;
    let mut watch = watcher(&gw, READER, "/shared", 0).await;
    for _ in 0..3 {
        let beat = watch.message(Duration::from_secs(3)).await.expect("a heartbeat");
        assert!(beat.events.is_empty());
    }
    gw.client(ADMIN).await.put(put("/shared/late")).await.unwrap();
    assert_eq!(watch.events(1, Duration::from_secs(1)).await[0].path, "/shared/late");
}
