//! What the audit log costs: requests per second through a real gateway (mTLS, authz,
//! encryption, embedded store) with the audit log on (fsync, group commit) and off, in the
//! same run. `cargo bench --bench audit`.
//!
//! Each round runs the same load against a fresh gateway: `CLIENTS` concurrent callers on
//! `CONNECTIONS` TLS connections for `SECONDS` seconds, first Gets of existing secrets, then
//! Puts (a write records an intent and an outcome, each durable before the next step). Rounds
//! alternate off/on three times, so drift of the shared machine hits both sides. The audit log is
//! on the same disk as the store (under `target/`, not a tmpfs). Goal (issue 5): the audit
//! log costs under 10% of throughput. `AUDIT_BENCH_LOG_DIR=/dev/shm` puts the log on a tmpfs
//! (fsync is free there), to separate the cost of fsync from the rest.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use secretgate::proto::v1::{GetRequest, PutRequest};
use support::TestGateway;

const CLIENTS: usize = 64;
const CONNECTIONS: usize = 4;
const SECONDS: u64 = 4;
const KEYS: usize = 256;
const ADMIN: &str = "spiffe://test.example/admin";

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Get,
    Put,
}

async fn round(audit: bool, op: Op) -> f64 {
    let base = std::env::current_dir().unwrap().join("target/bench-audit");
    std::fs::create_dir_all(&base).unwrap();
    let disk = tempfile::tempdir_in(&base).unwrap();
    // AUDIT_BENCH_LOG_DIR: put the log elsewhere (e.g. /dev/shm, to see what fsync costs).
    let audit_path = match std::env::var_os("AUDIT_BENCH_LOG_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap().keep().join("audit.log"),
        None => disk.path().join("audit/audit.log"),
    };
    let store_path = disk.path().join("store.redb");
    let gw = TestGateway::start_with(|c| {
        c.audit.enabled = audit;
        c.audit.path = audit_path;
        c.store.path = store_path;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(gw.client(ADMIN).await);
    }
    for k in 0..KEYS {
        let req = PutRequest {
            path: format!("/bench/k{k}"),
            value: vec![b'v'; 100],
            expected_version: None,
        };
        clients[0].put(req).await.unwrap();
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let mut c = clients[i % CONNECTIONS].clone();
        let (done, stop, counting) = (done.clone(), stop.clone(), counting.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(31).wrapping_add(7);
                let path = format!("/bench/k{}", n % KEYS);
                let ok = match op {
                    Op::Get => c.get(GetRequest { path, version: None }).await.is_ok(),
                    Op::Put => {
                        let value = vec![b'w'; 100];
                        c.put(PutRequest { path, value, expected_version: None }).await.is_ok()
                    }
                };
                assert!(ok, "request failed during the benchmark");
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // warm-up
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(SECONDS)).await;
    let n = done.load(Ordering::Relaxed);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rate
}

#[tokio::main]
async fn main() {
    println!(
        "audit log cost: {CLIENTS} concurrent clients on {CONNECTIONS} connections, \
         {SECONDS} s per round, 100-byte values"
    );
    for (name, op) in [("get", Op::Get), ("put", Op::Put)] {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            off.push(round(false, op).await);
            on.push(round(true, op).await);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (off_m, on_m) = (mean(&off), mean(&on));
        println!(
            "{name}: audit off {off_m:>8.0} req/s  audit on {on_m:>8.0} req/s  \
             on/off = {:.3} (cost {:+.1}%)   rounds off {:?} on {:?}",
            on_m / off_m,
            (1.0 - on_m / off_m) * 100.0,
            off.iter().map(|r| *r as u64).collect::<Vec<_>>(),
            on.iter().map(|r| *r as u64).collect::<Vec<_>>(),
        );
    }
}
