//! Failure behaviour of a gateway in front of a real 3-member etcd cluster, seen by real
//! gRPC clients: a member killed under load, quorum lost and regained, the leader killed.
//!
//! The tests run one at a time (each starts its own cluster; together they would starve this
//! 2-core machine and turn timing bounds into noise).

use secretgate_testkit as support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use secretgate::proto::v1::{
    GetRequest, PutRequest, StoreStatusRequest, admin_client::AdminClient,
    secrets_client::SecretsClient,
};
use support::{TestGateway, etcd::EtcdCluster};
use tonic::{Code, Status, transport::Channel};

/// The store timeout the gateways under test are configured with.
const STORE_TIMEOUT: Duration = Duration::from_millis(2000);
/// What a failing request may take beyond the store timeout (scheduling on a busy machine).
const MARGIN: Duration = Duration::from_millis(1500);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn put(
    c: &mut SecretsClient<Channel>,
    path: &str,
    value: &[u8],
    expected: Option<u64>,
) -> Result<u64, Status> {
    let req = PutRequest { path: path.into(), value: value.to_vec(), expected_version: expected };
    c.put(req).await.map(|r| r.into_inner().version)
}

async fn get(
    c: &mut SecretsClient<Channel>,
    path: &str,
    version: Option<u64>,
) -> Result<(u64, Vec<u8>), Status> {
    let r = c.get(GetRequest { path: path.into(), version }).await?.into_inner();
    Ok((r.version, r.value))
}

/// Retries `op` (on a clone of `client`) while it fails with UNAVAILABLE, up to `within`.
async fn eventually<T, F, Fut>(
    within: Duration,
    client: &SecretsClient<Channel>,
    mut op: F,
) -> Result<T, Status>
where
    F: FnMut(SecretsClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + within;
    loop {
        match op(client.clone()).await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// The etcd leader the gateway reports (admin StoreStatus), once it knows one other than
/// `not` (waits up to 10 s).
async fn leader_seen(admin: &mut AdminClient<Channel>, not: Option<&str>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = admin.store_status(StoreStatusRequest {}).await.unwrap().into_inner();
        if !s.etcd_leader.is_empty() && Some(s.etcd_leader.as_str()) != not {
            return s.etcd_leader;
        }
        assert!(Instant::now() < deadline, "no etcd leader reported: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client's view of a load run.
#[derive(Default)]
struct Seen {
    /// (path, version) → value of every write answered OK.
    acked: BTreeMap<(String, u64), Vec<u8>>,
    acked_after_kill: usize,
    reads_after_kill: usize,
    unavailable: usize,
    slowest: Duration,
}

/// Writes (compare-and-set) and reads its own four secrets until `stop`, retrying
/// UNAVAILABLE, and checks that no read is older than the newest write it saw acknowledged.
async fn client_load(
    mut c: SecretsClient<Channel>,
    id: usize,
    killed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut current: BTreeMap<String, u64> = BTreeMap::new();
    for n in 0..5_000usize {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let path = format!("/load/c{id}/k{}", n % 4);
        let value = format!("client {id} op {n}").into_bytes();
        let expected = *current.get(&path).unwrap_or(&0);
        let started = Instant::now();
        let result = put(&mut c, &path, &value, Some(expected)).await;
        seen.slowest = seen.slowest.max(started.elapsed());
        match result {
            Ok(version) => {
                assert_eq!(version, expected + 1);
                seen.acked.insert((path.clone(), version), value);
                current.insert(path.clone(), version);
                seen.acked_after_kill += usize::from(killed.load(Ordering::Relaxed));
            }
            Err(s) if s.code() == Code::Unavailable => seen.unavailable += 1,
            // An earlier write whose outcome was unknown did commit: catch up.
            Err(s) if s.code() == Code::FailedPrecondition => {
                if let Ok((version, _)) = get(&mut c, &path, None).await {
                    current.insert(path.clone(), version);
                }
            }
            Err(s) => panic!("client {id}: unexpected write error {s:?}"),
        }
        match get(&mut c, &path, None).await {
            Ok((version, _)) => {
                let newest_acked = current.get(&path).copied().unwrap_or(0);
                assert!(
                    version >= newest_acked,
                    "stale read of {path}: {version} < {newest_acked}"
                );
                seen.reads_after_kill += usize::from(killed.load(Ordering::Relaxed));
            }
            Err(s) if matches!(s.code(), Code::Unavailable | Code::NotFound) => {}
            Err(s) => panic!("client {id}: unexpected read error {s:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_killed_under_load_loses_no_acknowledged_write() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = EtcdCluster::start().await;
    let gw = cluster.gateway("/secretgate/", STORE_TIMEOUT.as_millis() as u64).await;
    let (killed, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let mut clients = Vec::new();
    for id in 0..4 {
        let c = gw.client("spiffe://test.example/admin").await;
        clients.push(tokio::spawn(client_load(c, id, killed.clone(), stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = cluster.leader().await.expect("a leader before the kill");
    let victim = (leader + 1) % 3;
    cluster.kill(victim);
    killed.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acked = BTreeMap::new();
    for (id, client) in clients.into_iter().enumerate() {
        let seen = client.await.unwrap();
        eprintln!(
            "client {id}: {} acked ({} after the kill), {} reads after the kill, \
             {} unavailable, slowest write {:?}",
            seen.acked.len(),
            seen.acked_after_kill,
            seen.reads_after_kill,
            seen.unavailable,
            seen.slowest
        );
        assert!(seen.acked_after_kill > 0, "client {id} made no progress after the kill");
        assert!(seen.reads_after_kill > 0, "client {id} read nothing after the kill");
        assert!(seen.slowest < STORE_TIMEOUT + MARGIN, "client {id}: {:?}", seen.slowest);
        acked.extend(seen.acked);
    }
    let c = gw.client("spiffe://test.example/admin").await;
    for ((path, version), value) in &acked {
        let (v, got) = eventually(Duration::from_secs(5), &c, |mut c| async move {
            get(&mut c, path, Some(*version)).await
        })
        .await
        .unwrap_or_else(|s| panic!("{path} v{version}: {s:?}"));
        assert_eq!((v, &got), (*version, value), "{path} version {version}");
    }
    eprintln!("{} acknowledged writes read back", acked.len());
}

/// Writes versions 1, 2, 3, … of `path` until one fails; returns the path, the last version
/// acknowledged, the error, and how long the failing request took.
async fn write_until_error(
    mut c: SecretsClient<Channel>,
    path: String,
) -> (String, u64, Status, Duration) {
    for v in 1..100_000u64 {
        let started = Instant::now();
        if let Err(e) = put(&mut c, &path, format!("w{v}").as_bytes(), Some(v - 1)).await {
            return (path, v - 1, e, started.elapsed());
        }
    }
    panic!("{path}: no error while the quorum was lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_fails_fast_without_stale_reads_and_recovers_without_restart() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start().await;
    let gw = cluster.gateway("/secretgate/", STORE_TIMEOUT.as_millis() as u64).await;
    let mut c = gw.client("spiffe://test.example/admin").await;
    assert_eq!(put(&mut c, "/q/a", b"before", Some(0)).await.unwrap(), 1);

    // Writers busy when the quorum goes: their writes in flight must end UNAVAILABLE too.
    let writers: Vec<_> =
        (0..3).map(|w| tokio::spawn(write_until_error(c.clone(), format!("/q/w{w}")))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Keep the leader running alone: it must not go on serving reads as if it still led.
    let leader = cluster.leader().await.expect("a leader");
    let paused: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &i in &paused {
        cluster.pause(i);
    }
    let mut in_flight = Vec::new();
    for w in writers {
        let (path, acked, err, took) = w.await.unwrap();
        eprintln!(
            "writer {path}: {acked} acked, then {:?} after {took:?}: {}",
            err.code(),
            err.message()
        );
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(took <= STORE_TIMEOUT + MARGIN, "{path}: {took:?}");
        in_flight.push((path, acked, err.message().contains("outcome is unknown")));
    }
    let mut outcome_unknown = false;
    for round in 0..2 {
        let started = Instant::now();
        let err = put(&mut c, "/q/a", format!("during {round}").as_bytes(), None).await;
        let took = started.elapsed();
        let err = err.expect_err("a write without quorum must fail");
        eprintln!("write without quorum: {:?} after {took:?}: {}", err.code(), err.message());
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        let msg = err.message();
        assert!(msg.contains("no quorum") || msg.contains("outcome is unknown"), "{msg}");
        outcome_unknown |= msg.contains("outcome is unknown");
        assert!(took <= STORE_TIMEOUT + MARGIN, "write took {took:?}");

        let started = Instant::now();
        let read = get(&mut c, "/q/a", None).await;
        let took = started.elapsed();
        let err = read.expect_err("a read without quorum must not answer as if current");
        eprintln!("read without quorum: {:?} after {took:?}: {}", err.code(), err.message());
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(took <= STORE_TIMEOUT + MARGIN, "read took {took:?}");
    }

    for &i in &paused {
        cluster.resume(i);
    }
    let started = Instant::now();
    let (version, _) =
        eventually(
            Duration::from_secs(15),
            &c,
            |mut c| async move { get(&mut c, "/q/a", None).await },
        )
        .await
        .expect("reads resume after the members return");
    eprintln!("reads resumed after {:?} (version {version})", started.elapsed());
    // A write whose outcome was unknown may have committed once the quorum returned.
    assert!(version == 1 || outcome_unknown, "version {version} without an unknown outcome");
    // Every acknowledged write is there. The write that failed is there only if its outcome
    // was reported unknown: a write reported as "no quorum" was never applied.
    for (path, acked, unknown) in &in_flight {
        let (current, _) = get(&mut c, path, None).await.unwrap();
        assert!(current == *acked || (*unknown && current == acked + 1), "{path}: {current}");
        for v in 1..=*acked {
            assert_eq!(get(&mut c, path, Some(v)).await.unwrap().1, format!("w{v}").into_bytes());
        }
    }
    let v = eventually(Duration::from_secs(10), &c, |mut c| async move {
        put(&mut c, "/q/a", b"after", Some(version)).await
    })
    .await
    .expect("writes resume after the members return");
    assert_eq!(v, version + 1);
    assert_eq!(get(&mut c, "/q/a", None).await.unwrap(), (v, b"after".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_a_new_one_is_elected_and_the_gateway_follows() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = EtcdCluster::start().await;
    let gw: TestGateway = cluster.gateway("/secretgate/", STORE_TIMEOUT.as_millis() as u64).await;
    let mut c = gw.client("spiffe://test.example/admin").await;
    for i in 0..10u64 {
        put(&mut c, &format!("/l/{i}"), format!("value {i}").as_bytes(), Some(0)).await.unwrap();
    }
    let old = cluster.leader().await.expect("a leader");
    // The gateway sends its requests to the leader, and says which member that is.
    let mut admin = gw.admin("spiffe://test.example/admin").await;
    assert_eq!(leader_seen(&mut admin, None).await, cluster.endpoints()[old]);
    cluster.kill(old);
    let killed_at = Instant::now();

    let v = eventually(Duration::from_secs(10), &c, |mut c| async move {
        put(&mut c, "/l/0", b"new leader", Some(1)).await
    })
    .await
    .expect("writes resume under a new leader");
    let resumed = killed_at.elapsed();
    assert_eq!(v, 2);
    let new = cluster.leader().await.expect("a new leader");
    eprintln!("leader m{old} killed; m{new} leads; gateway wrote again after {resumed:?}");
    assert_ne!(new, old);
    assert!(resumed < Duration::from_secs(10));
    let followed = leader_seen(&mut admin, Some(&cluster.endpoints()[old])).await;
    assert_eq!(followed, cluster.endpoints()[new], "the gateway follows the new leader");
    for i in 1..10u64 {
        let (version, value) = get(&mut c, &format!("/l/{i}"), None).await.unwrap();
        assert_eq!((version, value), (1, format!("value {i}").into_bytes()));
    }
    assert_eq!(get(&mut c, "/l/0", None).await.unwrap(), (2, b"new leader".to_vec()));

    // The old leader comes back as a follower and the cluster is whole again.
    cluster.restart(old).await;
    assert_eq!(put(&mut c, "/l/1", b"three members", Some(1)).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stuck_on_a_paused_member_are_retried_elsewhere_and_apply_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start().await;
    let gw = cluster.gateway("/secretgate/", STORE_TIMEOUT.as_millis() as u64).await;
    let mut c = gw.client("spiffe://test.example/admin").await;
    // The gateway sends its requests to the leader once it knows it; that is the member
    // paused, on an open connection, so requests to it hang after being sent.
    let leader = cluster.leader().await.expect("a leader");
    let mut admin = gw.admin("spiffe://test.example/admin").await;
    assert_eq!(leader_seen(&mut admin, None).await, cluster.endpoints()[leader]);
    assert_eq!(get(&mut c, "/p/none", None).await.unwrap_err().code(), Code::NotFound);
    let paused = leader;
    cluster.pause(paused);
    // A try sent to the paused member hangs; the store retries it on another member with
    // the same compare, so at most one try can apply, and it recognizes its own write.
    let (mut acked, mut slow, mut unknown) = (BTreeMap::new(), 0, 0);
    let until = Instant::now() + Duration::from_secs(5);
    for n in 0..2_000u64 {
        if Instant::now() > until {
            break;
        }
        let path = format!("/p/{}", n % 5);
        let version = n / 5 + 1;
        let value = format!("write {n}").into_bytes();
        let started = Instant::now();
        match put(&mut c, &path, &value, Some(version - 1)).await {
            Ok(written) => assert_eq!(written, version),
            // While the paused leader is being replaced every member may hold a try past the
            // operation's time: the answer then says so, and the secret tells what happened
            // (applied once, or not at all: then it is written again).
            Err(e)
                if e.code() == Code::Unavailable && e.message().contains("outcome is unknown") =>
            {
                unknown += 1;
                // It was held up too: its tries hung past the operation's time.
                slow += usize::from(started.elapsed() > STORE_TIMEOUT / 4);
                // A first write that did not apply leaves no secret: version 0.
                let now = eventually(STORE_TIMEOUT * 5, &c, |mut c| {
                    let path = path.clone();
                    async move {
                        match get(&mut c, &path, None).await {
                            Err(e) if e.code() == Code::NotFound && version == 1 => {
                                Ok((0, Vec::new()))
                            }
                            other => other,
                        }
                    }
                })
                .await
                .unwrap();
                if now.0 == version - 1 {
                    let again = eventually(STORE_TIMEOUT * 5, &c, |mut c| {
                        let (path, value) = (path.clone(), value.clone());
                        async move { put(&mut c, &path, &value, Some(version - 1)).await }
                    });
                    assert_eq!(again.await.unwrap(), version);
                } else {
                    assert_eq!(now, (version, value.clone()), "{path}: applied once or not at all");
                }
                acked.insert((path, version), value);
                continue;
            }
            Err(e) => panic!("{path} version {version}: {e:?}"),
        }
        let took = started.elapsed();
        assert!(took < STORE_TIMEOUT + MARGIN, "{took:?}");
        slow += usize::from(took > STORE_TIMEOUT / 4);
        acked.insert((path, version), value);
    }
    let unread = cluster.unread_bytes(paused);
    eprintln!(
        "{} writes with one member paused, {slow} of them slowed by it, {unknown} with an \
         unknown outcome; {unread} bytes sent to it unread",
        acked.len()
    );
    // The load did reach the paused member (else the test shows nothing about retries):
    // requests sit unread in its sockets, and the writes whose try hung there were slow.
    assert!(unread > 0, "nothing was sent to the paused member");
    assert!(slow > 0, "no write was held up by the paused member");
    assert!(unknown <= 3, "{unknown} writes ended with an unknown outcome");
    // Released, the paused member delivers what it was sent: none of it may apply again.
    cluster.resume(paused);
    cluster.wait_healthy().await;
    for ((path, version), value) in &acked {
        assert_eq!(&get(&mut c, path, Some(*version)).await.unwrap().1, value);
    }
    for i in 0..5u64 {
        let path = format!("/p/{i}");
        let newest = acked.keys().filter(|(p, _)| *p == path).map(|(_, v)| *v).max();
        assert_eq!(Some(get(&mut c, &path, None).await.unwrap().0), newest, "{path}");
    }
}
