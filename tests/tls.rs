//! The mTLS front door: which client certificates complete a handshake, over real TLS.

mod support;

use std::time::{Duration, Instant};

use rcgen::{DnType, ExtendedKeyUsagePurpose, SanType};
use secretgate::proto::v1::{GetRequest, secrets_client::SecretsClient};
use support::{Ca, Pem, TestGateway};
use time::OffsetDateTime;
use tokio::{io::AsyncReadExt, net::TcpStream};

fn spiffe(p: &mut rcgen::CertificateParams, ids: &[&str]) {
    p.subject_alt_names = ids.iter().map(|id| SanType::URI((*id).try_into().unwrap())).collect();
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
}

async fn refused(gw: &TestGateway, id: Option<&Pem>, alert: &str) {
    let err = gw.probe(id, false).await.expect_err("the handshake must be refused");
    assert!(err.contains(alert), "expected alert {alert}, got: {err}");
}

#[tokio::test]
async fn a_valid_client_certificate_is_accepted() {
    let gw = TestGateway::start().await;
    gw.probe(Some(&gw.ca.client("spiffe://test.example/app")), false).await.unwrap();
    let dns = gw.ca.issue(|p| {
        p.subject_alt_names = vec![SanType::DnsName("svc.example".try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    gw.probe(Some(&dns), false).await.unwrap();
    let cn = gw.ca.issue(|p| {
        p.distinguished_name.push(DnType::CommonName, "batch-job");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    gw.probe(Some(&cn), false).await.unwrap();
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let gw = TestGateway::start().await;
    refused(&gw, None, "CertificateRequired").await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let gw = TestGateway::start().await;
    let stranger = Ca::new("some other CA").client("spiffe://test.example/app");
    refused(&gw, Some(&stranger), "UnknownCA").await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let gw = TestGateway::start().await;
    let expired = gw.ca.issue(|p| {
        spiffe(p, &["spiffe://test.example/app"]);
        p.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
        p.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    });
    refused(&gw, Some(&expired), "CertificateExpired").await;
}

#[tokio::test]
async fn a_not_yet_valid_certificate_is_refused() {
    let gw = TestGateway::start().await;
    let future = gw.ca.issue(|p| {
        spiffe(p, &["spiffe://test.example/app"]);
        p.not_before = OffsetDateTime::now_utc() + time::Duration::days(1);
        p.not_after = OffsetDateTime::now_utc() + time::Duration::days(10);
    });
    refused(&gw, Some(&future), "CertificateExpired").await;
}

#[tokio::test]
async fn a_certificate_without_client_auth_usage_is_refused() {
    let gw = TestGateway::start().await;
    let server_only = gw.ca.issue(|p| {
        spiffe(p, &["spiffe://test.example/app"]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    refused(&gw, Some(&server_only), "UnsupportedCertificate").await;
    // webpki alone would accept a certificate with no EKU extension at all; we do not.
    let no_eku = gw.ca.issue(|p| {
        spiffe(p, &["spiffe://test.example/app"]);
        p.extended_key_usages.clear();
    });
    refused(&gw, Some(&no_eku), "UnsupportedCertificate").await;
}

#[tokio::test]
async fn a_certificate_with_two_spiffe_ids_is_refused() {
    let gw = TestGateway::start().await;
    let two = gw.ca.issue(|p| spiffe(p, &["spiffe://test.example/a", "spiffe://test.example/b"]));
    refused(&gw, Some(&two), "CertificateUnknown").await;
}

#[tokio::test]
async fn a_refused_client_cannot_make_a_request() {
    let gw = TestGateway::start().await;
    let stranger = Ca::new("some other CA").client("spiffe://test.example/app");
    let result = match gw.channel(&stranger).await {
        Err(e) => Err(e.to_string()),
        Ok(ch) => SecretsClient::new(ch)
            .get(GetRequest { path: "/x".into(), version: None })
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
    };
    assert!(result.is_err(), "a request over a refused handshake must fail");
}

#[tokio::test]
async fn tls_1_2_is_refused_by_default_and_allowed_when_configured() {
    let gw = TestGateway::start().await;
    let id = gw.ca.client("spiffe://test.example/app");
    let err = gw.probe(Some(&id), true).await.unwrap_err();
    assert!(err.contains("ProtocolVersion") || err.contains("alert"), "{err}");
    let gw12 = TestGateway::start_with(|c| c.tls.min_version = "1.2".into()).await;
    let id = gw12.ca.client("spiffe://test.example/app");
    gw12.probe(Some(&id), true).await.unwrap();
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let gw = TestGateway::start_with(|c| c.tls.handshake_timeout_secs = 1).await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the server must close the connection: {read:?}"
    );
    assert!(elapsed >= Duration::from_millis(900), "closed too early: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "closed too late: {elapsed:?}");
    // Meanwhile other clients were served.
    gw.probe(Some(&gw.ca.client("spiffe://test.example/app")), false).await.unwrap();
}
