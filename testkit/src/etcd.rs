//! A real etcd cluster for tests: three members (Debian's `etcd` 3.4) on free loopback ports,
//! TLS between clients and members and between peers (certificates made with rcgen), each
//! member in its own temporary data directory.
//!
//! [`EtcdCluster::start`] waits (with a deadline) until every member reports the same leader.
//! Single members can be killed (SIGKILL), paused (SIGSTOP), resumed (SIGCONT) and restarted
//! on their data directory. Dropping the cluster kills every member and removes the
//! directories, also when the test panics. A missing `etcd` binary fails the test with the
//! install command; it never skips.

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use rcgen::{ExtendedKeyUsagePurpose, SanType};
use secretgate::{
    Config,
    config::{EtcdConfig, StoreConfig},
};

use crate::{Ca, Pem, TestGateway, write};

/// Members in a test cluster.
pub const MEMBERS: usize = 3;
/// How long a cluster (or a restarted member) may take to become healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// What a test says when etcd is not installed.
pub const INSTALL_HINT: &str = "install etcd: apt-get install etcd-server etcd-client";

/// A running test cluster.
pub struct EtcdCluster {
    /// Signs the members' and the gateway's certificates.
    pub ca: Ca,
    /// The certificate the gateway (and test clients) present to etcd.
    pub client_cert: Pem,
    /// Holds the PKI files and one data directory per member.
    pub dir: tempfile::TempDir,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts a 3-member cluster and waits until it has a leader that every member agrees on.
    /// Free ports are found by binding and releasing them, so a test running in parallel can
    /// take one before its member binds it: a member that exits at start is a lost race, and
    /// the cluster is started again on new ports (three tries).
    pub async fn start() -> Self {
        require_etcd();
        for _ in 0..2 {
            let mut cluster = Self::launch();
            if cluster.started().await {
                return cluster;
            }
            eprintln!(
                "etcd test cluster: a member exited at start; again on new ports:\n{}",
                cluster.logs()
            );
        }
        let cluster = Self::launch();
        cluster.wait_healthy().await;
        cluster
    }

    /// Spawns a new cluster on fresh ports and files.
    fn launch() -> Self {
        let ca = Ca::new("etcd test CA");
        let dir = tempfile::tempdir().unwrap();
        let member_cert = ca.issue(|p| {
            p.distinguished_name.push(rcgen::DnType::CommonName, "etcd member");
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ];
            // Peers use the same certificate as client and as server.
            p.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        });
        let client_cert = ca.issue(|p| {
            p.distinguished_name.push(rcgen::DnType::CommonName, "secretgate");
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        let pki = dir.path();
        write(pki, "ca.pem", &ca.cert_pem);
        write(pki, "member.pem", &member_cert.cert);
        write(pki, "member-key.pem", &member_cert.key);
        write(pki, "client.pem", &client_cert.cert);
        write(pki, "client-key.pem", &client_cert.key);

        let ports = free_ports(2 * MEMBERS);
        let names: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
        let initial_cluster = (0..MEMBERS)
            .map(|i| format!("{}=https://127.0.0.1:{}", names[i], ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let members = (0..MEMBERS)
            .map(|i| {
                let (client_port, peer_port) = (ports[2 * i], ports[2 * i + 1]);
                let args = member_args(pki, &names[i], client_port, peer_port, &initial_cluster);
                Member { name: names[i].clone(), client_port, peer_port, args, child: None }
            })
            .collect();
        let mut cluster = Self { ca, client_cert, dir, members };
        for i in 0..MEMBERS {
            cluster.spawn(i);
        }
        cluster
    }

    /// Waits until the new cluster is healthy (true), or a member has exited (false).
    /// Panics with the members' logs after [`HEALTHY_WITHIN`].
    async fn started(&mut self) -> bool {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let exited = self
                .members
                .iter_mut()
                .any(|m| m.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))));
            if exited {
                return false;
            }
            if self.healthy().await {
                return true;
            }
            if Instant::now() > deadline {
                panic!("etcd cluster not healthy within {HEALTHY_WITHIN:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("https://127.0.0.1:{}", m.client_port)).collect()
    }

    /// Points `config`'s store at this cluster under `prefix`, with a `timeout_ms` store timeout.
    pub fn configure(&self, config: &mut Config, prefix: &str, timeout_ms: u64) {
        config.store = StoreConfig::Etcd(EtcdConfig {
            endpoints: self.endpoints(),
            ca: self.dir.path().join("ca.pem"),
            cert: self.dir.path().join("client.pem"),
            key: self.dir.path().join("client-key.pem"),
            prefix: prefix.into(),
            timeout_ms: timeout_ms.try_into().expect("a store timeout of 100 to 60000 ms"),
            ..EtcdConfig::default()
        });
    }

    /// The `[store]` section of a config file that points at this cluster under `prefix`.
    pub fn store_toml(&self, prefix: &str) -> String {
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let file = |name: &str| format!("{:?}", self.dir.path().join(name).display().to_string());
        format!(
            "backend = \"etcd\"\nendpoints = [{}]\nca = {}\ncert = {}\nkey = {}\nprefix = {prefix:?}\n",
            endpoints.join(", "),
            file("ca.pem"),
            file("client.pem"),
            file("client-key.pem"),
        )
    }

    /// etcd's own `etcd grpc-proxy start` in front of this cluster, with TLS on both sides
    /// (the members' CA and certificates), once it answers.
    pub async fn grpc_proxy(&self) -> GrpcProxy {
        let port = free_ports(1)[0];
        // The proxy refuses a client certificate with a Common Name (etcd would take it as
        // a user name): it gets one without.
        let proxy_cert = self.ca.issue(|p| {
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        write(self.dir.path(), "proxy-client.pem", &proxy_cert.cert);
        write(self.dir.path(), "proxy-client-key.pem", &proxy_cert.key);
        let f = |n: &str| self.dir.path().join(n).display().to_string();
        let log = File::create(self.dir.path().join("grpc-proxy.log")).unwrap();
        let child = Command::new("etcd")
            .args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg(format!("--listen-addr=127.0.0.1:{port}"))
            .args([
                "--cacert",
                &f("ca.pem"),
                "--cert",
                &f("proxy-client.pem"),
                "--key",
                &f("proxy-client-key.pem"),
            ])
            .args(["--cert-file", &f("member.pem"), "--key-file", &f("member-key.pem")])
            .args(["--trusted-ca-file", &f("ca.pem")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd grpc-proxy: {e}; {INSTALL_HINT}"));
        let proxy = GrpcProxy { endpoint: format!("https://127.0.0.1:{port}"), child };
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let mut client = self.client_to(vec![proxy.endpoint.clone()]).await;
            let answer = client.get("health-probe", None).await;
            if answer.is_ok() {
                return proxy;
            }
            let log = std::fs::read_to_string(self.dir.path().join("grpc-proxy.log"));
            assert!(
                Instant::now() < deadline,
                "the grpc-proxy did not answer within 30 s: {answer:?}\n{}",
                log.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A gateway in this process using this cluster as its store, under `prefix`.
    pub async fn gateway(&self, prefix: &str, timeout_ms: u64) -> TestGateway {
        TestGateway::start_with(|c| {
            self.configure(c, prefix, timeout_ms);
            // Keep every version, so a test can read back each write it saw acknowledged.
            c.limits.max_versions = secretgate::config::Ranged::of::<1000>();
        })
        .await
    }

    /// A direct etcd client (for tests that inspect raw keys), to every member or to one.
    pub async fn client(&self, member: Option<usize>) -> Client {
        let endpoints = match member {
            Some(i) => vec![self.endpoints()[i].clone()],
            None => self.endpoints(),
        };
        self.client_to(endpoints).await
    }

    /// An etcd client to `endpoints` (members, or a proxy), with this cluster's client
    /// certificate.
    pub async fn client_to(&self, endpoints: Vec<String>) -> Client {
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(&self.ca.cert_pem))
            .identity(Identity::from_pem(&self.client_cert.cert, &self.client_cert.key));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_timeout(Duration::from_secs(2))
            .with_connect_timeout(Duration::from_secs(2))
            .with_require_leader(true);
        Client::connect(endpoints, Some(options)).await.unwrap()
    }

    /// The member that every running member reports as leader, if they agree.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        for i in self.running() {
            let mut c = self.client(Some(i)).await;
            let status = c.status().await.ok()?;
            let id = status.leader();
            if id == 0 || leader.is_some_and(|l| l != id) {
                return None;
            }
            leader = Some(id);
        }
        let leader = leader?;
        for i in self.running() {
            let mut c = self.client(Some(i)).await;
            if c.status().await.ok()?.header()?.member_id() == leader {
                return Some(i);
            }
        }
        None
    }

    /// Kills member `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The running members' process ids (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().filter_map(|m| m.child.as_ref().map(Child::id)).collect()
    }

    /// Pauses member `i` (SIGSTOP): its sockets stay open but it answers nothing.
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Bytes sent to member `i`'s client port that it has not read yet (the receive queues
    /// of its established connections, from /proc/net/tcp): what a paused member was sent.
    pub fn unread_bytes(&self, i: usize) -> u64 {
        let port = format!("{:04X}", self.members[i].client_port);
        let mut unread = 0;
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(state), Some(queues)) = (f.get(1), f.get(3), f.get(4))
                else {
                    continue;
                };
                let established = *state == "01";
                if established && local.rsplit(':').next() == Some(port.as_str()) {
                    let rx = queues.split(':').nth(1).unwrap_or("0");
                    unread += u64::from_str_radix(rx, 16).unwrap_or(0);
                }
            }
        }
        unread
    }

    /// Resumes a paused member (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    /// Starts a killed member again on its data directory and waits until the cluster is
    /// healthy with it.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is still running");
        self.spawn(i);
        self.wait_healthy().await;
    }

    /// Waits until every running member answers a linearizable read and all agree on a
    /// leader. Panics with the members' logs after [`HEALTHY_WITHIN`].
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            if self.healthy().await {
                return;
            }
            if Instant::now() > deadline {
                panic!("etcd cluster not healthy within {HEALTHY_WITHIN:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn healthy(&self) -> bool {
        for i in self.running() {
            let mut c = self.client(Some(i)).await;
            if c.get("health", Some(GetOptions::new().with_count_only())).await.is_err() {
                return false;
            }
        }
        self.leader().await.is_some()
    }

    fn running(&self) -> Vec<usize> {
        (0..MEMBERS).filter(|&i| self.members[i].child.is_some()).collect()
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let child = Command::new("etcd")
            .args(&m.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd: {e}; {INSTALL_HINT}"));
        m.child = Some(child);
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.members[i].child.as_ref().expect("member is running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// The tail of every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out += &format!("--- {} (peer port {}) ---\n", m.name, m.peer_port);
            for line in tail.into_iter().rev() {
                out += line;
                out.push('\n');
            }
        }
        out
    }
}

/// A running `etcd grpc-proxy`; killed when dropped.
pub struct GrpcProxy {
    /// Its client URL.
    pub endpoint: String,
    child: Child,
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..MEMBERS {
            // A paused member must be resumed to die promptly; SIGKILL works on stopped
            // processes, but resuming first keeps the reaping simple.
            if let Some(child) = &self.members[i].child {
                let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            }
            self.kill(i);
        }
    }
}

/// Panics with the install command if `etcd` cannot be run.
pub fn require_etcd() {
    require_binary("etcd");
}

/// Panics with the etcd install command if `binary` cannot be run.
pub fn require_binary(binary: &str) {
    match Command::new(binary).arg("--version").stdout(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{binary} --version` failed ({s}); {INSTALL_HINT}"),
        Err(e) => panic!("cannot run {binary} ({e}); {INSTALL_HINT}"),
    }
}

fn member_args(
    pki: &Path,
    name: &str,
    client_port: u16,
    peer_port: u16,
    initial_cluster: &str,
) -> Vec<String> {
    let f = |n: &str| -> String { pki.join(n).display().to_string() };
    let data: PathBuf = pki.join(format!("{name}.data"));
    let client = format!("https://127.0.0.1:{client_port}");
    let peer = format!("https://127.0.0.1:{peer_port}");
    [
        ("--name", name.to_owned()),
        ("--data-dir", data.display().to_string()),
        ("--listen-client-urls", client.clone()),
        ("--advertise-client-urls", client),
        ("--listen-peer-urls", peer.clone()),
        ("--initial-advertise-peer-urls", peer),
        ("--initial-cluster", initial_cluster.to_owned()),
        ("--initial-cluster-state", "new".into()),
        ("--initial-cluster-token", "secretgate-test".into()),
        ("--cert-file", f("member.pem")),
        ("--key-file", f("member-key.pem")),
        ("--trusted-ca-file", f("ca.pem")),
        ("--client-cert-auth", "true".into()),
        ("--peer-cert-file", f("member.pem")),
        ("--peer-key-file", f("member-key.pem")),
        ("--peer-trusted-ca-file", f("ca.pem")),
        ("--peer-client-cert-auth", "true".into()),
        // Short timeouts so failover tests run in seconds, not tens of seconds.
        ("--heartbeat-interval", "50".into()),
        ("--election-timeout", "500".into()),
        ("--logger", "zap".into()),
        ("--log-level", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect()
}

/// `n` distinct free loopback ports (held open together so they differ, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}
