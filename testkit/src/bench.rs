//! Load for the benchmarks: concurrent Get or Put callers on a few connections for one
//! slice of time, with the CPU the machine (and the gateway's process) used meanwhile.
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
}

/// What one slice measured.
#[derive(Clone, Copy, Debug)]
pub struct Slice {
    /// Requests per second.
    pub rate: f64,
    /// CPU µs per request, whole machine.
    pub cpu_us: f64,
    /// CPU µs per request in the gateway's process alone (0 without a pid).
    pub gateway_us: f64,
    /// How busy the machine was (0..1).
    pub busy: f64,
}

/// Writes the `keys` secrets the callers read, 100 bytes each.
pub async fn seed(client: &mut SecretsClient<Channel>, keys: usize) {
    for k in 0..keys {
        let req = PutRequest {
            path: format!("/bench/k{k}"),
            value: vec![b'v'; 100],
            expected_version: None,
        };
        client.put(req).await.unwrap();
    }
}

/// Runs `callers` concurrent callers (spread over `clients`, one per connection) for
/// `length`, each doing `op` on `keys` secrets; `pid` is the gateway's process, if it has
/// its own. Every request must succeed.
pub async fn slice(
    clients: &[SecretsClient<Channel>],
    callers: usize,
    op: Op,
    keys: usize,
    length: Duration,
    pid: Option<u32>,
) -> Slice {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..callers {
        let mut c = clients[i % clients.len()].clone();
        let (done, stop, counting) = (done.clone(), stop.clone(), counting.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(31).wrapping_add(7);
                let path = format!("/bench/k{}", n % keys);
                let result = match op {
                    Op::Get => c.get(GetRequest { path, version: None }).await.map(drop),
                    Op::Put => {
                        let value = vec![b'w'; 100];
                        let req = PutRequest { path, value, expected_version: None };
                        c.put(req).await.map(drop)
                    }
                };
                if let Err(status) = result {
                    panic!("request failed during the benchmark: {status}");
                }
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // every caller under way
    counting.store(true, Ordering::Relaxed);
    let (started, machine, gateway) = (Instant::now(), machine_ticks(), process_ticks(pid));
    tokio::time::sleep(length).await;
    let (machine_after, gateway_after) = (machine_ticks(), process_ticks(pid));
    let busy = (machine_after.0 - machine.0) as f64 / (machine_after.1 - machine.1).max(1) as f64;
    let n = done.load(Ordering::Relaxed);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // Clock ticks are 10 ms of one CPU.
    let cpu_us = (machine_after.0 - machine.0) as f64 * 10_000.0 / n.max(1) as f64;
    let gateway_us = gateway_after.saturating_sub(gateway) as f64 * 10_000.0 / n.max(1) as f64;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    Slice { rate, cpu_us, gateway_us, busy }
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
fn process_ticks(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
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
