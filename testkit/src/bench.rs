//! Load for the benchmarks: concurrent Get or Put callers on a few connections (to a gateway,
//! or straight to etcd) for one slice of time, with each request's latency and the CPU the
//! machine (and the gateway's process) used meanwhile.
//! Benchmarks alternate short slices between the sides they compare, so drift of the
//! shared machine hits both alike, and report the median of the per-pair ratios.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use secretgate::proto::v1::{GetRequest, PutRequest, secrets_client::SecretsClient};
use tonic::transport::Channel;

/// What the callers do.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Op {
    /// Get one of `keys` existing secrets `/bench/k<N>`.
    Get,
    /// Put one of them (100 bytes).
    Put,
    /// Nine Gets, then a Put.
    Mix,
}

impl Op {
    /// The workload's name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Put => "put",
            Self::Mix => "90/10",
        }
    }
}

/// One connection the callers share: to a gateway, or to etcd (keys `<prefix>k<N>`,
/// linearizable gets).
#[derive(Clone)]
pub enum Caller {
    /// A gateway's `Secrets` service.
    Gateway(SecretsClient<Channel>),
    /// An etcd KV client (to the members, or to a grpc-proxy) and the key prefix.
    Etcd(Box<etcd_client::KvClient>, Arc<str>),
    /// The same, but each put inside a compare-and-set transaction (a compare that holds,
    /// then the put): the cheapest versioned write etcd offers, what the gateway's puts are.
    EtcdTxn(Box<etcd_client::KvClient>, Arc<str>),
}

impl Caller {
    /// Gateway callers, one per connection.
    pub fn gateways(clients: &[SecretsClient<Channel>]) -> Vec<Self> {
        clients.iter().cloned().map(Self::Gateway).collect()
    }

    /// One request: a Get, or a Put of 100 bytes, of key `key`.
    async fn call(&mut self, put: bool, key: usize) -> Result<(), String> {
        let value = || vec![b'w'; 100];
        let txn = matches!(self, Self::EtcdTxn(..));
        match self {
            Self::Gateway(c) => {
                let path = format!("/bench/k{key}");
                let result = if put {
                    let req = PutRequest { path, value: value(), expected_version: None };
                    c.put(req).await.map(drop)
                } else {
                    c.get(GetRequest { path, version: None }).await.map(drop)
                };
                result.map_err(|s| s.to_string())
            }
            Self::Etcd(kv, prefix) | Self::EtcdTxn(kv, prefix) => {
                let key = format!("{prefix}k{key}");
                let result = match (put, txn) {
                    (false, _) => kv.get(key, None).await.map(drop),
                    (true, false) => kv.put(key, value(), None).await.map(drop),
                    (true, true) => {
                        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                        let holds = Compare::mod_revision(key.as_str(), CompareOp::Less, i64::MAX);
                        let txn =
                            Txn::new().when([holds]).and_then([TxnOp::put(key, value(), None)]);
                        kv.txn(txn).await.map(drop)
                    }
                };
                result.map_err(|e| e.to_string())
            }
        }
    }
}

/// What one slice measured.
#[derive(Clone, Debug)]
pub struct Slice {
    /// Requests per second.
    pub rate: f64,
    /// CPU µs per request, whole machine.
    pub cpu_us: f64,
    /// CPU µs per request in the gateway's process alone (0 without a pid).
    pub gateway_us: f64,
    /// CPU µs per request in the etcd members' processes together (0 without their pids).
    pub etcd_us: f64,
    /// How busy the machine was (0..1).
    pub busy: f64,
    /// Every counted request's latency in µs, sorted.
    pub latencies_us: Vec<u32>,
}

/// Writes the `keys` secrets (or etcd keys) the callers read, 100 bytes each.
pub async fn seed(caller: &Caller, keys: usize) {
    let mut caller = caller.clone();
    for k in 0..keys {
        caller.call(true, k).await.unwrap();
    }
}

/// Runs `callers` concurrent callers (spread over `clients`, one per connection) for
/// `length`, each doing `op` on `keys` secrets; `pids` are the processes whose CPU is
/// counted apart. Every request must succeed.
pub async fn slice(
    clients: &[Caller],
    callers: usize,
    op: Op,
    keys: usize,
    length: Duration,
    pids: &Pids,
) -> Slice {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..callers {
        let mut c = clients[i % clients.len()].clone();
        let (done, stop, counting) = (done.clone(), stop.clone(), counting.clone());
        tasks.push(tokio::spawn(async move {
            let (mut n, mut calls) = (i, 0u64);
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(31).wrapping_add(7);
                calls += 1;
                let put = match op {
                    Op::Get => false,
                    Op::Put => true,
                    Op::Mix => calls % 10 == 0,
                };
                let started = Instant::now();
                if let Err(e) = c.call(put, n % keys).await {
                    panic!("request failed during the benchmark: {e}");
                }
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                    latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // every caller under way
    counting.store(true, Ordering::Relaxed);
    let ticks = || (machine_ticks(), process_ticks(pids.gateway), pids.etcd_ticks());
    let (started, (machine, gateway, etcd)) = (Instant::now(), ticks());
    tokio::time::sleep(length).await;
    let (machine_after, gateway_after, etcd_after) = ticks();
    let busy = (machine_after.0 - machine.0) as f64 / (machine_after.1 - machine.1).max(1) as f64;
    let n = done.load(Ordering::Relaxed);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // Clock ticks are 10 ms of one CPU.
    let cpu_us = (machine_after.0 - machine.0) as f64 * 10_000.0 / n.max(1) as f64;
    let per_request = |ticks: u64| ticks as f64 * 10_000.0 / n.max(1) as f64;
    let gateway_us = per_request(gateway_after.saturating_sub(gateway));
    let etcd_us = per_request(etcd_after.saturating_sub(etcd));
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap());
    }
    latencies_us.sort_unstable();
    Slice { rate, cpu_us, gateway_us, etcd_us, busy, latencies_us }
}

/// The processes whose CPU a slice counts apart from the machine's.
#[derive(Clone, Debug, Default)]
pub struct Pids {
    /// The gateway's, when it has its own process.
    pub gateway: Option<u32>,
    /// The etcd members'.
    pub etcd: Vec<u32>,
}

impl Pids {
    /// Only the gateway's.
    pub fn gateway(pid: Option<u32>) -> Self {
        Self { gateway: pid, etcd: Vec::new() }
    }

    fn etcd_ticks(&self) -> u64 {
        self.etcd.iter().map(|&p| process_ticks(Some(p))).sum()
    }
}

/// Busy and total clock ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = cpu.iter().sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU clock ticks (user + system) used so far by process `pid`, from `/proc/<pid>/stat`.
pub fn process_ticks(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// The `p` quantile (0..1) of sorted latencies, in ms.
pub fn quantile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

/// The value of the environment variable `name` as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().map_or(default, |v| v.parse().expect(name))
}

/// The mean of `v` (0 for none).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
