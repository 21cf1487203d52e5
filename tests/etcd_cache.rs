//! The consistent read cache (issue 17) against a real 3-member etcd: reads are answered
//! from memory, and a read that starts after a write was acknowledged (by another replica,
//! or written straight into etcd) always sees it, also while the member serving the watch is
//! killed, paused, or compacted past.

use std::time::{Duration, Instant};

use etcd_client::{CompactionOptions, GetOptions};
use secretgate::{
    proto::v1::{GetRequest, PutRequest, StoreStatusRequest, secrets_client::SecretsClient},
    testing::EtcdStore,
};
use secretgate_testkit::{
    TestGateway,
    etcd::{EtcdCluster, MEMBERS},
};
use tonic::{Code, transport::Channel};

const ADMIN: &str = "spiffe://test.example/admin";
const PREFIX: &str = "/sg-cache/";

/// The tests of this file run one at a time: they count the process's cache hits.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Two replicas on `cluster`: one store prefix, one keyring.
async fn replicas(cluster: &EtcdCluster) -> (TestGateway, TestGateway) {
    let a = cluster.gateway(PREFIX, 5000).await;
    let keyring = a.config.crypto.keyring.clone();
    let b = TestGateway::start_with(|c| {
        cluster.configure(c, PREFIX, 5000);
        c.crypto.keyring = keyring;
    })
    .await;
    (a, b)
}

async fn put(c: &mut SecretsClient<Channel>, path: &str, value: &str) -> u64 {
    let req = PutRequest { path: path.into(), value: value.into(), expected_version: None };
    c.put(req).await.unwrap().into_inner().version
}

async fn get(c: &mut SecretsClient<Channel>, path: &str) -> Result<(u64, Vec<u8>), Code> {
    match c.get(GetRequest { path: path.into(), version: None }).await {
        Ok(r) => Ok((r.get_ref().version, r.into_inner().value)),
        Err(s) => Err(s.code()),
    }
}

/// Writes on one replica and reads on the other, `rounds` times over a few keys; every
/// read must return the version just acknowledged.
async fn ping_pong(
    a: &mut SecretsClient<Channel>,
    b: &mut SecretsClient<Channel>,
    rounds: u64,
    tag: &str,
) {
    for round in 0..rounds {
        let path = format!("/k{}", round % 5);
        let value = format!("{tag}-{round}");
        let (writer, reader) = if round % 2 == 0 { (&mut *a, &mut *b) } else { (&mut *b, &mut *a) };
        let version = put(writer, &path, &value).await;
        let read = get(reader, &path).await;
        assert_eq!(read, Ok((version, value.into_bytes())), "{tag} round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_from_memory_and_see_writes_made_straight_into_etcd() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start().await;
    let (gw_a, gw_b) = replicas(&cluster).await;
    let (mut a, mut b) = (gw_a.client(ADMIN).await, gw_b.client(ADMIN).await);
    put(&mut a, "/p", "one").await;
    let hits = EtcdStore::cache_hits();
    ping_pong(&mut a, &mut b, 40, "warm").await;
    // Once the feeds are filled, reads are answered from memory (after the barrier).
    let deadline = Instant::now() + Duration::from_secs(10);
    while EtcdStore::cache_hits() < hits + 20 {
        assert!(Instant::now() < deadline, "reads never came from the cache");
        ping_pong(&mut a, &mut b, 10, "more").await;
    }

    let status = gw_b.admin(ADMIN).await.store_status(StoreStatusRequest {}).await;
    let status = status.unwrap().into_inner();
    assert_eq!((status.backend.as_str(), status.cache.as_str()), ("etcd", "serving"));
    assert!(status.cache_entries >= 10 && status.cache_hits > 0, "{status:?}");
    assert!(status.cache_bytes > 0 && status.cache_bytes <= status.cache_max_bytes);
    let denied = gw_b.admin("spiffe://test.example/reader").await;
    let denied = denied.clone().store_status(StoreStatusRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Roll /p's metadata back to version 1 straight in etcd: the next read sees version 1,
    // not the cached version 2.
    let mut raw = cluster.client(None).await;
    let meta_key = format!("{PREFIX}meta/p");
    let v1_meta = raw.get(meta_key.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    assert_eq!(put(&mut a, "/p", "two").await, 2);
    assert_eq!(get(&mut b, "/p").await, Ok((2, b"two".to_vec())));
    raw.put(meta_key.as_str(), v1_meta, None).await.unwrap();
    assert_eq!(get(&mut b, "/p").await, Ok((1, b"one".to_vec())));
    // And a metadata key deleted straight in etcd is gone at once.
    raw.delete(meta_key.as_str(), None).await.unwrap();
    assert_eq!(get(&mut b, "/p").await, Err(Code::NotFound));
    assert_eq!(get(&mut a, "/p").await, Err(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_pausing_or_compacting_under_the_watch_never_gives_a_stale_read() {
    let _serial = SERIAL.lock().await;
    let mut cluster = EtcdCluster::start().await;
    let (gw_a, gw_b) = replicas(&cluster).await;
    let (mut a, mut b) = (gw_a.client(ADMIN).await, gw_b.client(ADMIN).await);
    ping_pong(&mut a, &mut b, 20, "before").await;
    // Each member in turn: whichever serves a replica's watch is among them.
    for i in 0..MEMBERS {
        cluster.kill(i);
        ping_pong(&mut a, &mut b, 20, &format!("killed m{i}")).await;
        cluster.restart(i).await;
        ping_pong(&mut a, &mut b, 10, &format!("restarted m{i}")).await;
    }
    for i in 0..MEMBERS {
        cluster.pause(i);
        ping_pong(&mut a, &mut b, 10, &format!("paused m{i}")).await;
        // Compact everything written so far while the member is behind: a watch on it
        // wakes up past the compaction and is cancelled.
        let mut raw = cluster.client(Some((i + 1) % MEMBERS)).await;
        let now = raw.get("x", Some(GetOptions::new())).await.unwrap();
        let revision = now.header().unwrap().revision();
        raw.compact(revision, Some(CompactionOptions::new().with_physical())).await.unwrap();
        cluster.resume(i);
        ping_pong(&mut a, &mut b, 20, &format!("resumed m{i}")).await;
    }
    cluster.wait_healthy().await;
    ping_pong(&mut a, &mut b, 20, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_readers_never_read_older_than_acknowledged() {
    let _serial = SERIAL.lock().await;
    use std::sync::{Arc, Mutex};
    let cluster = EtcdCluster::start().await;
    let (gw_a, gw_b) = replicas(&cluster).await;
    let clients = [gw_a.client(ADMIN).await, gw_b.client(ADMIN).await];
    const KEYS: usize = 4;
    // The highest version acknowledged per key.
    let acked = Arc::new(Mutex::new([0u64; KEYS]));
    for k in 0..KEYS {
        let v = put(&mut clients[0].clone(), &format!("/s{k}"), "0").await;
        acked.lock().unwrap()[k] = v;
    }
    let until = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let mut c = clients[t % 2].clone();
        let acked = Arc::clone(&acked);
        tasks.push(tokio::spawn(async move {
            let mut n = t;
            let mut reads = 0;
            while Instant::now() < until {
                n = n.wrapping_mul(7).wrapping_add(3);
                let k = n % KEYS;
                let path = format!("/s{k}");
                if t < 2 {
                    let v = put(&mut c, &path, &format!("{t}-{n}")).await;
                    let mut a = acked.lock().unwrap();
                    a[k] = a[k].max(v);
                } else {
                    let floor = acked.lock().unwrap()[k];
                    let (v, _) = get(&mut c, &path).await.unwrap();
                    assert!(v >= floor, "read version {v} of {path}, {floor} was acknowledged");
                    reads += 1;
                }
            }
            reads
        }));
    }
    let mut reads = 0;
    for t in tasks {
        reads += t.await.unwrap();
    }
    assert!(reads > 100, "only {reads} reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_every_read_goes_to_etcd() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start().await;
    let gw = TestGateway::start_with(|c| {
        cluster.configure(c, PREFIX, 5000);
        if let secretgate::config::StoreConfig::Etcd(e) = &mut c.store {
            e.cache = false;
        }
    })
    .await;
    let mut a = gw.client(ADMIN).await;
    let hits = EtcdStore::cache_hits();
    for n in 0..20 {
        let version = put(&mut a, "/off", &format!("v{n}")).await;
        assert_eq!(get(&mut a, "/off").await, Ok((version, format!("v{n}").into_bytes())));
    }
    assert_eq!(EtcdStore::cache_hits(), hits, "a read came from memory with store.cache = false");
    let status = gw.admin(ADMIN).await.store_status(StoreStatusRequest {}).await;
    assert_eq!(status.unwrap().into_inner().cache, "off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_budget_the_cache_empties_itself_and_reads_go_to_etcd() {
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start().await;
    let gw = TestGateway::start_with(|c| {
        cluster.configure(c, PREFIX, 5000);
        if let secretgate::config::StoreConfig::Etcd(e) = &mut c.store {
            e.cache_max_mib = secretgate::config::Ranged::of::<1>();
        }
    })
    .await;
    let mut a = gw.client(ADMIN).await;
    let mut admin = gw.admin(ADMIN).await;
    // 24 values of 60 kB: more than the 1 MiB budget once sealed and cached.
    let big = "x".repeat(60_000);
    for n in 0..24 {
        put(&mut a, &format!("/big{n}"), &big).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = admin.store_status(StoreStatusRequest {}).await.unwrap().into_inner();
        if s.cache == "over budget" {
            assert_eq!((s.cache_entries, s.cache_bytes), (0, 0), "emptied: {s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never over budget: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reads still answer, from etcd.
    let hits = EtcdStore::cache_hits();
    for n in 0..24 {
        let (_, value) = get(&mut a, &format!("/big{n}")).await.unwrap();
        assert_eq!(value.len(), 60_000);
    }
    assert_eq!(EtcdStore::cache_hits(), hits, "a read came from an emptied cache");
}

/// A rewrap replaces a value key in place. The barrier checks only the metadata's revision,
/// so the replace must move it too (same bytes): then a read on another replica that starts
/// after the replace was acknowledged returns the new bytes, never the ones it had cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_value_moves_its_metadata_and_is_read_at_once_elsewhere() {
    use secretgate::{SecretPath, testing::Store};
    let _serial = SERIAL.lock().await;
    let cluster = EtcdCluster::start().await;
    let mut config = secretgate::Config::default();
    cluster.configure(&mut config, PREFIX, 5000);
    let secretgate::config::StoreConfig::Etcd(etcd) = &config.store else { unreachable!() };
    let (a, b) = (EtcdStore::connect(etcd, 10).unwrap(), EtcdStore::connect(etcd, 10).unwrap());
    let mut raw = cluster.client(None).await;
    let meta_key = format!("{PREFIX}meta/r");
    let meta = |raw: &mut etcd_client::Client| {
        let mut raw = raw.clone();
        let key = meta_key.clone();
        async move {
            let r = raw.get(key, None).await.unwrap();
            let kv = &r.kvs()[0];
            (kv.value().to_vec(), kv.mod_revision())
        }
    };
    let path = SecretPath::parse("/r").unwrap();
    a.put(&path, 0, b"sealed-0").await.unwrap();
    let (bytes, mut revision) = meta(&mut raw).await;
    let hits = EtcdStore::cache_hits();
    for round in 1..=100u32 {
        let (old, new) = (format!("sealed-{}", round - 1), format!("sealed-{round}"));
        assert!(a.replace(&path, 1, old.as_bytes(), new.as_bytes()).await.unwrap());
        let (now, moved) = meta(&mut raw).await;
        assert_eq!(now, bytes, "a replace leaves the metadata's bytes alone");
        assert!(moved > revision, "round {round}: the replace did not move the metadata");
        revision = moved;
        let read = b.get(&path, None).await.unwrap();
        assert_eq!(
            &read.value[..],
            new.as_bytes(),
            "round {round}: the other replica read old bytes"
        );
    }
    assert!(EtcdStore::cache_hits() > hits, "no read came from memory");
    // A replace whose metadata is gone (put straight into etcd that way) changes nothing.
    raw.delete(meta_key.as_str(), None).await.unwrap();
    assert!(!a.replace(&path, 1, b"sealed-100", b"sealed-x").await.unwrap());
}
