//! The mTLS front door: which client certificates complete a handshake, over real TLS.

use secretgate_testkit as support;

use std::time::{Duration, Instant};

use rcgen::{DnType, ExtendedKeyUsagePurpose, SanType};
use secretgate::{
    Reloaded,
    proto::v1::{GetRequest, secrets_client::SecretsClient},
};
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
    // Refused in the handshake (its CA is not trusted): the request never reaches a handler.
    let err = result.expect_err("a request over a refused handshake must fail");
    assert!(err.contains("received fatal alert: UnknownCA"), "{err}");
}

#[tokio::test]
async fn tls_1_2_is_refused_by_default_and_allowed_when_configured() {
    let gw = TestGateway::start().await;
    let id = gw.ca.client("spiffe://test.example/app");
    let err = gw.probe(Some(&id), true).await.unwrap_err();
    assert!(err.contains("received fatal alert: ProtocolVersion"), "{err}");
    let gw12 =
        TestGateway::start_with(|c| c.tls.min_version = secretgate::config::TlsVersion::Tls12)
            .await;
    let id = gw12.ca.client("spiffe://test.example/app");
    gw12.probe(Some(&id), true).await.unwrap();
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let gw = TestGateway::start_with(|c| {
        c.tls.handshake_timeout_secs = secretgate::config::Ranged::of::<1>()
    })
    .await;
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

// Revocation (`tls.client_crl`): CRLs made with rcgen, checked in real handshakes and on
// requests over connections made before the revocation.

fn next_week() -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::days(7)
}

/// Writes `pem` over `path` atomically, as a CA's publishing job would.
fn publish(path: &std::path::Path, pem: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A gateway whose CA signed `crl(ca)`, written next to its other files as
/// `client-crl.pem` and checked for changes every second.
async fn with_crl(ca: Ca, crl: impl FnOnce(&Ca) -> String) -> Result<TestGateway, String> {
    with_cas_and_crl(ca, &[], crl).await
}

/// Like [`with_crl`], with the CAs `also` in the client CA bundle too.
async fn with_cas_and_crl(
    ca: Ca,
    also: &[&Ca],
    crl: impl FnOnce(&Ca) -> String,
) -> Result<TestGateway, String> {
    let bundle = also.iter().fold(ca.cert_pem.clone(), |b, other| b + other.cert_pem.as_str());
    let pem = crl(&ca);
    TestGateway::try_start(ca, support::TEST_POLICY, |c| {
        std::fs::write(&c.tls.client_ca, bundle).unwrap();
        c.tls.client_crl = c.tls.client_ca.with_file_name("client-crl.pem");
        c.tls.reload_interval_secs = secretgate::config::Ranged::of::<1>();
        std::fs::write(&c.tls.client_crl, pem).unwrap();
    })
    .await
    .map_err(|e| e.to_string())
}

fn crl_path(gw: &TestGateway) -> &std::path::Path {
    &gw.config.tls.client_crl
}

async fn get(client: &mut SecretsClient<tonic::transport::Channel>) -> Result<(), tonic::Status> {
    // NotFound is an answer: the caller got past authentication and authorization.
    match client.get(GetRequest { path: "/app/none".into(), version: None }).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(s),
    }
}

/// A gateway whose CRL revokes the first of two admin certificates, with both.
async fn one_revoked() -> (TestGateway, Pem, Pem) {
    let ca = Ca::new(support::TEST_CA);
    let revoked = ca.client("spiffe://test.example/admin");
    let kept = ca.client("spiffe://test.example/admin");
    let gw = with_crl(ca, |ca| ca.crl(&[&revoked], next_week())).await.unwrap();
    (gw, revoked, kept)
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_in_the_handshake_and_others_are_accepted() {
    let (gw, revoked, kept) = one_revoked().await;
    refused(&gw, Some(&revoked), "CertificateRevoked").await;
    gw.probe(Some(&kept), false).await.unwrap();
    get(&mut SecretsClient::new(gw.channel(&kept).await.unwrap())).await.unwrap();
    // The refusal is in the audit log, with the reason.
    handshake_record(&gw, "Revoked").await;
}

#[tokio::test]
async fn revoking_a_connected_certificate_stops_its_next_request_without_a_restart() {
    let ca = Ca::new(support::TEST_CA);
    let victim = ca.client("spiffe://test.example/admin");
    let other = ca.client("spiffe://test.example/admin");
    let gw = with_crl(ca, |ca| ca.crl(&[], next_week())).await.unwrap();
    let mut victim_client = SecretsClient::new(gw.channel(&victim).await.unwrap());
    let mut other_client = SecretsClient::new(gw.channel(&other).await.unwrap());
    get(&mut victim_client).await.unwrap();

    publish(crl_path(&gw), &gw.ca.crl(&[&victim], next_week()));
    let cut = Cut { message: "revoked", alert: "CertificateRevoked" };
    cut.off(&gw, &mut victim_client, &victim, &mut other_client).await;
}

#[tokio::test]
async fn a_broken_crl_update_is_refused_and_the_crls_in_force_stay() {
    let (gw, revoked, kept) = one_revoked().await;
    let mut client = SecretsClient::new(gw.channel(&kept).await.unwrap());
    // Garbage, then a file removed: each is refused; the revocation stays in force.
    publish(crl_path(&gw), "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n");
    gw.refused_reload(Reloaded::ClientTrust, "does not parse").await;
    refused(&gw, Some(&revoked), "CertificateRevoked").await;
    get(&mut client).await.unwrap();
    std::fs::remove_file(crl_path(&gw)).unwrap();
    gw.refused_reload(Reloaded::ClientTrust, "cannot read").await;
    refused(&gw, Some(&revoked), "CertificateRevoked").await;
    get(&mut client).await.unwrap();
    // A good file is taken again: the certificate is reinstated.
    publish(crl_path(&gw), &gw.ca.crl(&[], next_week()));
    accepted_soon(&gw, &revoked).await;
}

#[tokio::test]
async fn a_gateway_does_not_start_with_an_unusable_crl_and_says_why() {
    type Crl = Box<dyn FnOnce(&Ca) -> String>;
    let cases: [(&str, Crl); 5] = [
        ("no X509 CRL found", Box::new(|_| "not a CRL\n".to_owned())),
        (
            "does not parse",
            Box::new(|_| {
                "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n".to_owned()
            }),
        ),
        (
            "expired at",
            Box::new(|ca| ca.crl(&[], OffsetDateTime::now_utc() - time::Duration::hours(1))),
        ),
        // A CA with the same name but another key: its CRL claims to be ours.
        (
            "is not signed by that client CA's key",
            Box::new(|_| Ca::new(support::TEST_CA).crl(&[], next_week())),
        ),
        (
            "second CRL from the same issuer",
            Box::new(|ca| format!("{}{}", ca.crl(&[], next_week()), ca.crl(&[], next_week()))),
        ),
    ];
    for (expected, crl) in cases {
        let err = with_crl(Ca::new(support::TEST_CA), crl).await.err().expect(expected);
        assert!(
            err.contains("client CRL") && err.contains(expected),
            "expected {expected:?}: {err}"
        );
        assert!(err.contains("client-crl.pem"), "the error names the file: {err}");
    }
}

#[tokio::test]
async fn every_ca_of_the_bundle_needs_a_crl() {
    let other = Ca::new("second client CA");
    let err = with_cas_and_crl(Ca::new(support::TEST_CA), &[&other], |ca| ca.crl(&[], next_week()))
        .await
        .err()
        .expect("a CA without a CRL must be refused");
    assert!(err.contains("no CRL from the client CA") && err.contains("second client CA"), "{err}");
    // With a CRL from each, clients of both CAs are accepted, and revocations of both apply.
    let (kept, revoked) =
        (other.client("spiffe://test.example/a"), other.client("spiffe://test.example/b"));
    let gw = with_cas_and_crl(Ca::new(support::TEST_CA), &[&other], |ca| {
        format!("{}{}", ca.crl(&[], next_week()), other.crl(&[&revoked], next_week()))
    })
    .await
    .unwrap();
    gw.probe(Some(&gw.ca.client("spiffe://test.example/admin")), false).await.unwrap();
    gw.probe(Some(&kept), false).await.unwrap();
    refused(&gw, Some(&revoked), "CertificateRevoked").await;
}

#[tokio::test]
async fn a_crl_past_its_next_update_refuses_every_certificate_of_its_ca() {
    let ca = Ca::new(support::TEST_CA);
    let id = ca.client("spiffe://test.example/admin");
    let soon = OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let gw = with_crl(ca, |ca| ca.crl(&[], soon)).await.unwrap();
    gw.probe(Some(&id), false).await.unwrap();
    // Accepted until the CRL's next update passes (3 s from its making), refused after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match gw.probe(Some(&id), false).await {
            Err(e) => break e,
            Ok(()) => assert!(Instant::now() < deadline, "a stale CRL must fail closed"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // (The CRL holds its next update in whole seconds.)
    let next_update = soon - time::Duration::seconds(1);
    assert!(OffsetDateTime::now_utc() >= next_update, "refused before the next update: {err}");
    // webpki refuses a chain whose CRL has expired as an unknown issuer.
    assert!(err.contains("received fatal alert: UnknownCA"), "{err}");
    let refusal = handshake_record(&gw, "xpired").await;
    println!("{refusal}");
}

/// The first `handshake` record whose line contains `text` (refusals are written without
/// holding up the accept loop, so this waits a little for them).
async fn handshake_record(gw: &TestGateway, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&gw.config.audit.path).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| l.contains("\"handshake\"") && l.contains(text)) {
            return l.to_owned();
        }
        assert!(Instant::now() < deadline, "no handshake record with {text:?} in:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Client CA bundle changes: `tls.client_ca` is reloaded (with `tls.client_crl`), and open
// connections are checked against the new trust before their next request.

/// Waits (up to 10 s) until a request on `client` is refused; returns the refusal.
async fn next_refusal(client: &mut SecretsClient<tonic::transport::Channel>) -> tonic::Status {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(client).await {
            Err(s) => return s,
            Ok(()) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(()) => panic!("still accepted after 10 s"),
        }
    }
}

/// How a connection is cut off: the refusal's message and the alert of a new handshake.
struct Cut {
    message: &'static str,
    alert: &'static str,
}

impl Cut {
    /// Waits until a request on `client` (a connection of `id`) is refused, and checks that
    /// it is UNAUTHENTICATED with the message, that the connection stays refused, that a new
    /// handshake fails with the alert, that `other` carries on, and that the refusal is
    /// audited.
    async fn off(
        &self,
        gw: &TestGateway,
        client: &mut SecretsClient<tonic::transport::Channel>,
        id: &Pem,
        other: &mut SecretsClient<tonic::transport::Channel>,
    ) {
        let status = next_refusal(client).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains(self.message), "{status:?}");
        assert_eq!(get(client).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        refused(gw, Some(id), self.alert).await;
        get(other).await.unwrap();
        assert!(refusal_audited(gw, id, self.message), "the refusal is not audited");
    }
}

/// Waits (up to 10 s) until a handshake with `id` is accepted.
async fn accepted_soon(gw: &TestGateway, id: &Pem) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = gw.probe(Some(id), false).await {
        assert!(Instant::now() < deadline, "not accepted within 10 s: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True if the audit log has an UNAUTHENTICATED request record of `id`'s certificate whose
/// message contains `text`.
fn refusal_audited(gw: &TestGateway, id: &Pem, text: &str) -> bool {
    let log = std::fs::read_to_string(&gw.config.audit.path).unwrap();
    let serial =
        support::serial(id).iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    log.lines().any(|l| {
        l.contains(&serial)
            && l.contains("\"request\"")
            && l.contains("\"UNAUTHENTICATED\"")
            && l.contains(text)
    })
}

#[tokio::test]
async fn a_client_ca_added_or_removed_takes_effect_without_a_restart() {
    let gw = TestGateway::start_with(|c| {
        c.tls.reload_interval_secs = secretgate::config::Ranged::of::<1>()
    })
    .await;
    let bundle = gw.config.tls.client_ca.clone();
    let old_id = gw.ca.client("spiffe://test.example/admin");
    let mut old = SecretsClient::new(gw.channel(&old_id).await.unwrap());
    get(&mut old).await.unwrap();
    let next_ca = Ca::new("next client CA");
    let new_id = next_ca.client("spiffe://test.example/admin");
    refused(&gw, Some(&new_id), "UnknownCA").await;

    // Both CAs, as during a CA rotation: the new CA's clients come in, the old ones carry on.
    publish(&bundle, &format!("{}{}", gw.ca.cert_pem, next_ca.cert_pem));
    accepted_soon(&gw, &new_id).await;
    let mut new = SecretsClient::new(gw.channel(&new_id).await.unwrap());
    get(&mut new).await.unwrap();
    get(&mut old).await.unwrap();

    // The old CA removed: its open connection is refused at its next request (and stays
    // refused), and so is a new handshake; the new CA's clients carry on.
    publish(&bundle, &next_ca.cert_pem);
    let cut = Cut { message: "no longer trusted", alert: "UnknownCA" };
    cut.off(&gw, &mut old, &old_id, &mut new).await;
}

#[tokio::test]
async fn a_broken_client_ca_bundle_is_refused_and_the_trust_in_force_stays() {
    let gw = TestGateway::start_with(|c| {
        c.tls.reload_interval_secs = secretgate::config::Ranged::of::<1>()
    })
    .await;
    let bundle = gw.config.tls.client_ca.clone();
    let id = gw.ca.client("spiffe://test.example/admin");
    let mut open = SecretsClient::new(gw.channel(&id).await.unwrap());
    for broken in ["garbage", "removed", "empty"] {
        match broken {
            "garbage" => {
                publish(&bundle, "-----BEGIN CERTIFICATE-----\nbm90\n-----END CERTIFICATE-----\n")
            }
            "removed" => std::fs::remove_file(&bundle).unwrap(),
            _ => publish(&bundle, ""),
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        get(&mut open).await.unwrap_or_else(|e| panic!("{broken} bundle: {e:?}"));
        gw.probe(Some(&id), false).await.unwrap_or_else(|e| panic!("{broken} bundle: {e}"));
    }
}

#[tokio::test]
async fn a_new_client_ca_waits_for_its_crl_and_the_pair_is_taken_together() {
    let next_ca = Ca::new("next client CA");
    let new_id = next_ca.client("spiffe://test.example/admin");
    let gw = with_crl(Ca::new(support::TEST_CA), |ca| ca.crl(&[], next_week())).await.unwrap();
    let old_id = gw.ca.client("spiffe://test.example/admin");
    let mut old = SecretsClient::new(gw.channel(&old_id).await.unwrap());
    // The bundle first: without a CRL from the new CA the pair is refused, the trust in force
    // stays (the new CA's clients are still refused, the old ones carry on).
    publish(&gw.config.tls.client_ca, &format!("{}{}", gw.ca.cert_pem, next_ca.cert_pem));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    refused(&gw, Some(&new_id), "UnknownCA").await;
    get(&mut old).await.unwrap();
    // Then its CRL: the pair is taken.
    let crls = format!("{}{}", gw.ca.crl(&[], next_week()), next_ca.crl(&[], next_week()));
    publish(crl_path(&gw), &crls);
    accepted_soon(&gw, &new_id).await;
    get(&mut old).await.unwrap();
}

#[tokio::test]
async fn a_certificate_that_expires_while_connected_is_refused_at_its_next_request() {
    let gw = TestGateway::start().await;
    let expires = OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let short = gw.ca.issue(|p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://test.example/admin".try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_after = expires;
    });
    let mut client = SecretsClient::new(gw.channel(&short).await.unwrap());
    get(&mut client).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let status = get(&mut client).await.expect_err("an expired certificate must be refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    assert!(refusal_audited(&gw, &short, "expired"), "the refusal is not audited");
}

// Server certificate rotation: `tls.cert` and `tls.key` are reloaded when they change.

/// The serial number of the certificate the gateway presents in a new handshake.
async fn served_serial(gw: &TestGateway) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let id = gw.ca.client("spiffe://test.example/admin");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(gw.ca.cert_pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    use x509_parser::prelude::FromDer;
    x509_parser::prelude::X509Certificate::from_der(&leaf).unwrap().1.raw_serial().to_vec()
}

#[tokio::test]
async fn a_rotated_server_certificate_is_presented_without_a_restart() {
    let gw = TestGateway::start_with(|c| {
        c.tls.reload_interval_secs = secretgate::config::Ranged::of::<1>()
    })
    .await;
    let (cert, key) = (gw.config.tls.cert.clone(), gw.config.tls.key.clone());
    let first = served_serial(&gw).await;
    let mut open =
        SecretsClient::new(gw.channel(&gw.ca.client("spiffe://test.example/admin")).await.unwrap());
    get(&mut open).await.unwrap();

    // The certificate first, the key a few reloads later, as a careless rotation does: the
    // pair in between does not match and is refused; the old pair stays until the key comes.
    let next = gw.ca.server();
    std::fs::write(&cert, &next.cert).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served_serial(&gw).await, first, "a certificate without its key must not be taken");
    std::fs::write(&key, &next.key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_serial(&gw).await != support::serial(&next) {
        assert!(Instant::now() < deadline, "the new certificate was not presented within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Connections made before the rotation carry on.
    get(&mut open).await.unwrap();
    // A key of another certificate is refused; the pair in force stays.
    std::fs::write(&key, &gw.ca.server().key).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served_serial(&gw).await, support::serial(&next));
}

#[tokio::test]
async fn a_gateway_does_not_start_with_a_key_of_another_certificate() {
    let ca = Ca::new(support::TEST_CA);
    let other = ca.server();
    let err = TestGateway::try_start(ca, support::TEST_POLICY, |c| {
        std::fs::write(&c.tls.key, &other.key).unwrap();
    })
    .await
    .err()
    .expect("a mismatched key must be refused")
    .to_string();
    assert!(
        err.contains("server-key.pem")
            && err.contains("cannot be used with the server certificate"),
        "{err}"
    );
}
