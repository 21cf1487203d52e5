//! secretgate's integration test harness, shared by its tests and benchmarks: a throw-away
//! PKI made with rcgen, a real gateway on a free loopback port, real clients (tonic over TLS,
//! or raw rustls for handshakes), real etcd clusters ([`etcd`]), the audit log harness
//! ([`audit`]) and the store conformance suite ([`conformance`]).

pub mod audit;
pub mod bench;
pub mod conformance;
pub mod etcd;
pub mod h2;
pub mod watch;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use secretgate::{
    Config, Gateway, Reloaded,
    config::StoreConfig,
    proto::v1::{admin_client::AdminClient, secrets_client::SecretsClient},
};
use time::OffsetDateTime;
use tokio::{io::AsyncReadExt, net::TcpStream};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// The name of the CA of every test gateway.
pub const TEST_CA: &str = "test client and server CA";

/// A test certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub cert_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let cert_pem = issuer.pem();
        Self { issuer, cert_pem }
    }

    /// Signs a certificate; `f` adjusts the parameters (SANs, EKUs, validity…).
    pub fn issue(&self, f: impl FnOnce(&mut CertificateParams)) -> Pem {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + time::Duration::days(1);
        f(&mut p);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Pem { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// A PEM CRL signed by this CA revoking `revoked`, next updated at `next_update`.
    pub fn crl(&self, revoked: &[&Pem], next_update: OffsetDateTime) -> String {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: (now - time::Duration::hours(1))
                .min(next_update - time::Duration::hours(1)),
            next_update,
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|pem| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&serial(pem)),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }

    pub fn server(&self) -> Pem {
        self.issue(|p| {
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        })
    }

    /// A client certificate with one SPIFFE ID.
    pub fn client(&self, spiffe: &str) -> Pem {
        self.issue(|p| {
            p.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        })
    }
}

/// The serial number bytes of a PEM certificate.
pub fn serial(pem: &Pem) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(&der).unwrap();
    cert.raw_serial().to_vec()
}

/// A gateway running in this process on 127.0.0.1 with a fresh PKI and store.
pub struct TestGateway {
    pub ca: Ca,
    pub dir: tempfile::TempDir,
    pub config: Config,
    gateway: Option<Gateway>,
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with a config adjusted by `f`.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_policy(TEST_POLICY, f).await
    }

    /// Starts with the policy `csv` and a config adjusted by `f`.
    pub async fn start_with_policy(csv: &str, f: impl FnOnce(&mut Config)) -> Self {
        Self::try_start(Ca::new(TEST_CA), csv, f).await.unwrap()
    }

    /// Starts with the CA `ca` (made with the name [`TEST_CA`]), the policy `csv` and a config
    /// adjusted by `f`; returns why the gateway refused to start, if it did.
    pub async fn try_start(
        ca: Ca,
        csv: &str,
        f: impl FnOnce(&mut Config),
    ) -> Result<Self, secretgate::StartError> {
        let dir = tempfile::tempdir().unwrap();
        let server = ca.server();
        write(dir.path(), "server.pem", &server.cert);
        write(dir.path(), "server-key.pem", &server.key);
        write(dir.path(), "ca.pem", &ca.cert_pem);
        let mut config = Config { listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
        // Off unless a test turns it on: gateways in parallel tests would all want its port.
        config.metrics.listen = String::new();
        config.tls.cert = dir.path().join("server.pem");
        config.tls.key = dir.path().join("server-key.pem");
        config.tls.client_ca = dir.path().join("ca.pem");
        config.store = StoreConfig::Embedded { path: dir.path().join("store/secretgate.redb") };
        config.crypto.keyring = dir.path().join("keyring.toml");
        config.crypto.reload_interval_secs = secretgate::config::Ranged::of::<1>();
        secretgate::testing::Keyring::generate().unwrap().save(&config.crypto.keyring).unwrap();
        config.authz.policies = dir.path().join("policies");
        config.authz.reload_interval_secs = secretgate::config::Ranged::of::<1>();
        write_policy(&config.authz.policies, csv);
        config.replica.state_file = dir.path().join("replica-state.json");
        config.audit.path = dir.path().join("audit/audit.log");
        config.audit.signing_key = dir.path().join("audit.key");
        secretgate::audit::SigningKey::generate().unwrap().save(&config.audit.signing_key).unwrap();
        f(&mut config);
        let gateway = Gateway::start(&config.clone().check().unwrap()).await?;
        Ok(Self { ca, dir, config, gateway: Some(gateway) })
    }

    /// The embedded store's file (the gateway must use the embedded store).
    pub fn store_path(&self) -> &Path {
        match &self.config.store {
            StoreConfig::Embedded { path } => path,
            StoreConfig::Etcd(_) => panic!("this gateway uses etcd"),
        }
    }

    /// Waits (10 s at most) until the gateway reports that the newest files of `what` were
    /// refused with an error containing `expected`; returns the error.
    pub async fn refused_reload(&self, what: Reloaded, expected: &str) -> String {
        let gateway = self.gateway.as_ref().expect("gateway is running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let error = gateway.reload_error(what);
            if let Some(e) = error.as_ref().filter(|e| e.contains(expected)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} reload refused with {expected:?} within 10 s (last error: {error:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.as_ref().expect("gateway is running").local_addr()
    }

    /// The metrics endpoint's address, when `metrics.listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().expect("gateway is running").metrics_addr()
    }

    /// Stops the gateway and starts a new one on the same config, store and port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Stops the gateway (releasing the store) until [`TestGateway::start_again`].
    pub async fn stop(&mut self) {
        let old = self.gateway.take().expect("gateway is running");
        self.config.listen = old.local_addr();
        old.shutdown().await;
    }

    /// Starts the gateway again on the same config, store and port.
    pub async fn start_again(&mut self) {
        assert!(self.gateway.is_none(), "gateway is already running");
        let config = self.config.clone().check().unwrap();
        self.gateway = Some(Gateway::start(&config).await.unwrap());
    }

    /// An `Admin` client authenticated as `spiffe`.
    pub async fn admin(&self, spiffe: &str) -> AdminClient<Channel> {
        AdminClient::new(self.channel(&self.ca.client(spiffe)).await.unwrap())
    }

    /// Writes a client certificate and key for `spiffe` into the test directory, for the
    /// CLI; returns the CLI's connection arguments.
    pub fn cli_args(&self, spiffe: &str) -> Vec<String> {
        let id = self.ca.client(spiffe);
        let stem = spiffe.rsplit('/').next().unwrap_or("client");
        let cert = write(self.dir.path(), &format!("{stem}.pem"), &id.cert);
        let key = write(self.dir.path(), &format!("{stem}-key.pem"), &id.key);
        let ca = self.dir.path().join("ca.pem");
        vec![
            "--addr".into(),
            self.addr().to_string(),
            "--ca".into(),
            ca.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]
    }

    /// A gRPC client authenticated as `spiffe`.
    pub async fn client(&self, spiffe: &str) -> SecretsClient<Channel> {
        SecretsClient::new(self.channel(&self.ca.client(spiffe)).await.unwrap())
    }

    /// A TLS channel presenting `identity`.
    pub async fn channel(&self, identity: &Pem) -> Result<Channel, tonic::transport::Error> {
        connect(&self.ca, self.addr(), identity).await
    }

    /// Does a raw TLS handshake presenting `identity` (or none) and reports how the server
    /// answered: `Ok` once it speaks HTTP/2 to us, `Err(text)` with the TLS alert otherwise.
    pub async fn probe(&self, identity: Option<&Pem>, tls12: bool) -> Result<(), String> {
        probe(self.addr(), &self.ca.cert_pem, identity, tls12).await
    }
}

/// Raw TLS probe, see [`TestGateway::probe`].
pub async fn probe(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&Pem>,
    tls12: bool,
) -> Result<(), String> {
    let mut tls = tls_connect(addr, ca_pem, identity, tls12).await?;
    // In TLS 1.3 the server judges the client certificate after the client has finished
    // its side of the handshake, so a refusal arrives as an alert on the first read. An
    // accepted client instead receives the server's HTTP/2 SETTINGS frame.
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Err(_) => Err("no answer within 10 s".into()),
        Ok(Ok(0)) => Err("connection closed without an alert".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// The HTTP/2 settings (identifier, value) of the SETTINGS frame a gateway at `addr` sends
/// first on a new connection from `identity`.
pub async fn h2_settings(addr: SocketAddr, ca_pem: &str, identity: &Pem) -> Vec<(u16, u32)> {
    let mut tls = tls_connect(addr, ca_pem, Some(identity), false).await.unwrap();
    let mut frame = vec![0u8; 9];
    tls.read_exact(&mut frame).await.unwrap();
    let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
    assert_eq!(frame[3], 4, "the server's first frame is not SETTINGS: {frame:?}");
    let mut payload = vec![0u8; len];
    tls.read_exact(&mut payload).await.unwrap();
    payload
        .chunks_exact(6)
        .map(|s| {
            let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            (u16::from_be_bytes([s[0], s[1]]), value)
        })
        .collect()
}

/// A TLS 1.3 (or 1.2) connection offering `h2`, trusting `ca_pem`, presenting `identity`.
async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&Pem>,
    tls12: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = client_tls(ca_pem, identity, tls12);
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tls_over(tcp, config).await
}

/// A TLS client configuration trusting `ca_pem` and presenting `identity`, offering `h2`.
fn client_tls(ca_pem: &str, identity: Option<&Pem>, tls12: bool) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// `GET path` over HTTP/1.1 at `addr` (over TLS trusting `ca_pem` when given, with no
/// client certificate): the whole response, status line, headers and body.
pub async fn http_get(addr: SocketAddr, path: &str, ca_pem: Option<&str>) -> String {
    http_get_with(addr, path, ca_pem, "").await
}

/// [`http_get`] with further header lines (each ending in `\r\n`).
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    ca_pem: Option<&str>,
    headers: &str,
) -> String {
    use tokio::io::AsyncWriteExt;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut response = Vec::new();
    let exchange = async {
        match ca_pem {
            None => {
                let mut tcp = tcp;
                tcp.write_all(request.as_bytes()).await.unwrap();
                tcp.read_to_end(&mut response).await.unwrap();
            }
            Some(ca) => {
                let mut config = client_tls(ca, None, false);
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let mut tls = tls_over(tcp, config).await.unwrap();
                tls.write_all(request.as_bytes()).await.unwrap();
                // A server may end TLS without close_notify after `Connection: close`.
                let _ = tls.read_to_end(&mut response).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("no answer within 10 s");
    String::from_utf8(response).unwrap()
}

/// A TLS handshake over `tcp` as a client with `config`.
async fn tls_over(
    tcp: TcpStream,
    config: rustls::ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.map_err(|e| e.to_string())
}

/// The policy every test gateway starts with: principals under `spiffe://test.example/`
/// named `admin*` (and the conformance writers) may do everything; `reader` may read and
/// list `/shared`; everyone else nothing.
pub const TEST_POLICY: &str = "\
p, role:admin, /**, *, allow
p, spiffe://test.example/reader, /shared/**, read, allow
p, spiffe://test.example/reader, /shared/**, list, allow
g, spiffe://test.example/admin, role:admin
g, spiffe://test.example/writer, role:admin
";

/// A TLS channel to a gateway at `addr` that trusts `ca`, presenting `identity`.
pub async fn connect(
    ca: &Ca,
    addr: SocketAddr,
    identity: &Pem,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert_pem))
        .identity(Identity::from_pem(&identity.cert, &identity.key));
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Writes a policy directory with the standard model and `csv`.
pub fn write_policy(dir: &Path, csv: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.conf"), secretgate::authz::policy::MODEL).unwrap();
    // Write the CSV last, atomically, so a watching gateway never sees half of it.
    let tmp = dir.join("policy.csv.tmp");
    std::fs::write(&tmp, csv).unwrap();
    std::fs::rename(&tmp, dir.join("policy.csv")).unwrap();
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
