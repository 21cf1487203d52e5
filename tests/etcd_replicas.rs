//! Two gateway replicas on one etcd cluster. Each builds its writes on the metadata it last
//! saw (one round trip when nobody else wrote); these tests make that guess stale on purpose
//! and check that the compare-and-set still decides: no lost or doubled version, a version
//! conflict only when etcd says so, and a replica's read after another's acknowledged write
//! sees it.

use secretgate::proto::v1::{DeleteRequest, GetRequest, PutRequest, VersionsRequest};
use secretgate_testkit::{TestGateway, etcd::EtcdCluster};
use tonic::Code;

const ADMIN: &str = "spiffe://test.example/admin";

/// Two replicas on `cluster`: one store prefix, one keyring (each its own PKI and audit log).
async fn replicas(cluster: &EtcdCluster) -> (TestGateway, TestGateway) {
    let a = cluster.gateway("/sg-replicas/", 5000).await;
    let keyring = a.config.crypto.keyring.clone();
    let b = TestGateway::start_with(|c| {
        cluster.configure(c, "/sg-replicas/", 5000);
        c.crypto.keyring = keyring;
    })
    .await;
    (a, b)
}

fn put(path: &str, value: &str, expected: Option<u64>) -> PutRequest {
    PutRequest { path: path.into(), value: value.as_bytes().to_vec(), expected_version: expected }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_a_replica_whose_view_is_stale_are_decided_by_etcd() {
    let cluster = EtcdCluster::start().await;
    let (gw_a, gw_b) = replicas(&cluster).await;
    let (mut a, mut b) = (gw_a.client(ADMIN).await, gw_b.client(ADMIN).await);

    a.put(put("/db", "a1", None)).await.unwrap();
    // B sees version 1, then A moves the secret on: B's view is stale.
    let seen = b.get(GetRequest { path: "/db".into(), version: None }).await.unwrap();
    assert_eq!(seen.into_inner().version, 1);
    assert_eq!(a.put(put("/db", "a2", Some(1))).await.unwrap().into_inner().version, 2);

    // A guarded write that expects what B saw is a conflict, named by etcd's answer.
    let conflict = b.put(put("/db", "b-on-1", Some(1))).await.unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition);
    assert!(conflict.message().contains("current version is 2"), "{}", conflict.message());
    // One that expects the real current version goes through although B last saw 1...
    a.put(put("/db", "a3", Some(2))).await.unwrap();
    assert_eq!(b.put(put("/db", "b4", Some(3))).await.unwrap().into_inner().version, 4);
    // ... and an unguarded one lands on top of whatever is current, never on a stale base.
    a.put(put("/db", "a5", None)).await.unwrap();
    assert_eq!(b.put(put("/db", "b6", None)).await.unwrap().into_inner().version, 6);
    // A delete on A (a metadata change without a new version) is no obstacle either.
    a.delete(DeleteRequest { path: "/db".into() }).await.unwrap();
    assert_eq!(b.put(put("/db", "b7", Some(6))).await.unwrap().into_inner().version, 7);

    let versions = a.versions(VersionsRequest { path: "/db".into() }).await.unwrap().into_inner();
    let numbers: Vec<u64> = versions.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions.current_version, 7);
    assert_eq!(numbers, (1..=7).rev().collect::<Vec<u64>>(), "no version lost or doubled");
    let deleted = a.get(GetRequest { path: "/db".into(), version: Some(6) }).await.unwrap_err();
    assert_eq!(deleted.code(), Code::NotFound);
    for (version, value) in [(4, "b4"), (5, "a5"), (7, "b7")] {
        let got = a.get(GetRequest { path: "/db".into(), version: Some(version) }).await;
        assert_eq!(got.unwrap().into_inner().value, value.as_bytes(), "version {version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_another_replicas_acknowledged_write_sees_it() {
    let cluster = EtcdCluster::start().await;
    let (gw_a, gw_b) = replicas(&cluster).await;
    let (mut a, mut b) = (gw_a.client(ADMIN).await, gw_b.client(ADMIN).await);
    for round in 0..50u64 {
        let path = format!("/k{}", round % 7);
        let (writer, reader) = if round % 2 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
        let value = format!("v{round}");
        let written = writer.put(put(&path, &value, None)).await.unwrap().into_inner().version;
        let read = reader.get(GetRequest { path, version: None }).await.unwrap().into_inner();
        assert_eq!((read.version, read.value), (written, value.into_bytes()), "round {round}");
    }
}

/// Puts that come together go to etcd as the nested transactions of one request; each is
/// still decided by its own compare: a stale or racing put fails alone, the others of its
/// request commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_go_to_etcd_together_each_decided_by_its_own_compare() {
    let cluster = EtcdCluster::start().await;
    let (gw_a, gw_b) = replicas(&cluster).await;
    let (a, mut b) = (gw_a.client(ADMIN).await, gw_b.client(ADMIN).await);
    for i in 0..40 {
        a.clone().put(put(&format!("/c/k{i}"), "v1", None)).await.unwrap();
    }
    // 0..40: a put expecting version 1 (right); 0..12 also a second one racing it; 40..52
    // expect version 5 of a secret at 1 (stale); 52..54, new, take 6 unguarded puts each.
    let mut calls = Vec::new();
    let mut plan: Vec<(usize, Option<u64>)> = (0..40).map(|i| (i, Some(1))).collect();
    plan.extend((0..12).map(|i| (i, Some(1))));
    for i in 40..52 {
        a.clone().put(put(&format!("/c/k{i}"), "v1", None)).await.unwrap();
        plan.push((i, Some(5)));
    }
    plan.extend((52..54).flat_map(|i| std::iter::repeat_n((i, None), 6)));
    for (n, (i, expected)) in plan.iter().copied().enumerate() {
        let mut client = a.clone();
        let value = format!("w{n}");
        let path = format!("/c/k{i}");
        calls.push(tokio::spawn(async move {
            client.put(put(&path, &value, expected)).await.map(|r| r.into_inner().version)
        }));
    }
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    for i in 0..54 {
        let outcomes: Vec<_> =
            plan.iter().zip(&results).filter(|((j, _), _)| *j == i).map(|(_, r)| r).collect();
        let won: Vec<u64> = outcomes.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
        for lost in outcomes.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(lost.code(), Code::FailedPrecondition, "/c/k{i}: {lost:?}");
        }
        let want: Vec<u64> = match i {
            0..40 => vec![2],
            40..52 => vec![],
            _ => (1..=6).collect(),
        };
        let mut won_sorted = won.clone();
        won_sorted.sort_unstable();
        assert_eq!(won_sorted, want, "/c/k{i}: {outcomes:?}");
        let read = b.get(GetRequest { path: format!("/c/k{i}"), version: None }).await.unwrap();
        assert_eq!(read.into_inner().version, want.last().copied().unwrap_or(1), "/c/k{i}");
    }
    // Secrets written in one request share its revision: the puts were combined.
    let mut etcd = cluster.client(None).await;
    let mut revisions = std::collections::HashMap::<i64, usize>::new();
    for i in 0..40 {
        let got = etcd.get(format!("/sg-replicas/meta/c/k{i}"), None).await.unwrap();
        *revisions.entry(got.kvs()[0].mod_revision()).or_default() += 1;
    }
    let most = revisions.values().max().copied().unwrap_or(0);
    assert!(most > 1, "every put had a request of its own: {revisions:?}");
}
