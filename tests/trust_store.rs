//! The client trust kept in the store (issue 20, item 4): `tls.client_trust_source =
//! "store"`, pushed with `Control/PushTrust`, followed by every replica, only moving
//! forward. Real gateways and real mTLS handshakes on a real 3-member etcd cluster.

use std::time::{Duration, Instant};

use secretgate::{
    config::Source,
    control::Kek,
    proto::v1::{
        PushTrustRequest, ReloadStatusRequest, WhoAmIRequest, admin_client::AdminClient,
        control_client::ControlClient, secrets_client::SecretsClient,
    },
};
use secretgate_testkit::{Pem, TestGateway, connect, etcd::EtcdCluster};
use time::OffsetDateTime;
use tonic::transport::Channel;

const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";
const PREFIX: &str = "/sg-trust/";

/// Whether `identity` gets an answer from `gw` on a new connection.
async fn accepted(gw: &TestGateway, identity: &Pem) -> bool {
    match connect(&gw.ca, gw.addr(), identity).await {
        Ok(channel) => SecretsClient::new(channel).who_am_i(WhoAmIRequest {}).await.is_ok(),
        Err(_) => false,
    }
}

async fn admin(a: &TestGateway, gw: &TestGateway) -> AdminClient<Channel> {
    AdminClient::new(connect(&gw.ca, gw.addr(), &a.ca.client(ADMIN)).await.unwrap())
}

/// Waits until `gw` accepts (or refuses) `identity` on new connections.
async fn until_accepted(gw: &TestGateway, identity: &Pem, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted(gw, identity).await != want {
        assert!(
            Instant::now() < deadline,
            "{} never {}",
            gw.addr(),
            if want { "accepted" } else { "refused" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `gw` reports the newest stored client trust refused with `expected`.
async fn refused(a: &TestGateway, gw: &TestGateway, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let values =
            admin(a, gw).await.reload_status(ReloadStatusRequest {}).await.unwrap().into_inner();
        let trust = values.values.into_iter().find(|v| v.what == "client trust").unwrap();
        if trust.refused.contains(expected) {
            assert!(trust.version.starts_with("2:"), "{trust:?}");
            return;
        }
        assert!(Instant::now() < deadline, "not refused with {expected:?}: {trust:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_revocation_holds_on_every_replica_and_cannot_be_rolled_back_in_etcd() {
    let cluster = EtcdCluster::start().await;
    let keys = tempfile::tempdir().unwrap();
    let kek = keys.path().join("kek");
    Kek::generate(&kek).unwrap();
    let replica = |id: &'static str| {
        let kek = kek.clone();
        let cluster = &cluster;
        async move {
            TestGateway::start_with(|c| {
                cluster.configure(c, PREFIX, 5000);
                c.replica.id = id.into();
                c.replica.lease_secs = secretgate::config::Ranged::of::<3>();
                c.crypto.kek = kek;
                c.tls.client_trust_source = Source::Store;
            })
            .await
        }
    };
    let a = replica("replica-a").await;
    let b = replica("replica-b").await;
    // The first replica's files seeded version 1: its CA is the tier's, on both replicas;
    // b's own CA file is not used.
    let reader = a.ca.client(READER);
    assert!(accepted(&a, &reader).await && accepted(&b, &reader).await);
    assert!(!accepted(&b, &b.ca.client(READER)).await, "b's own CA is not trusted");

    let crl = a.ca.crl(&[&reader], OffsetDateTime::now_utc() + time::Duration::days(7));
    let mut control =
        ControlClient::new(connect(&a.ca, a.addr(), &a.ca.client(ADMIN)).await.unwrap());
    let pushed = control
        .push_trust(PushTrustRequest {
            client_ca: a.ca.cert_pem.clone(),
            client_crl: crl,
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((pushed.version, pushed.enforcing.len()), (2, 2), "{pushed:?}");
    for gw in [&a, &b] {
        until_accepted(gw, &reader, false).await;
        assert!(accepted(gw, &a.ca.client(ADMIN)).await);
    }

    // Raw etcd writes that would bring back the CRL-less version 1: refused everywhere.
    let mut etcd = cluster.client(None).await;
    let key = |v: u64| format!("{PREFIX}control/trust/{v:020}");
    let v1 = etcd.get(key(1), None).await.unwrap().kvs()[0].value().to_vec();
    etcd.put(key(3), v1, None).await.unwrap();
    for gw in [&a, &b] {
        refused(&a, gw, "stored as another").await;
        assert!(!accepted(gw, &reader).await);
    }
    etcd.delete(key(3), None).await.unwrap();
    etcd.delete(key(2), None).await.unwrap();
    for gw in [&a, &b] {
        refused(&a, gw, "older than version 2 in force").await;
        assert!(!accepted(gw, &reader).await);
    }
    // A bundle that does not parse is refused by the gateway, and nothing is stored.
    let bad = control
        .push_trust(PushTrustRequest {
            client_ca: "garbage".into(),
            client_crl: String::new(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}
