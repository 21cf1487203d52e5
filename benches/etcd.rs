//! The gateway against etcd itself, in one run (issue 17): `make bench`, or
//! `cargo bench --bench etcd [-- --json]`.
//!
//! Starts a real 3-member etcd 3.4 with TLS on loopback (testkit), etcd's own
//! `etcd grpc-proxy start` in front of it (TLS both sides), and two release gateways on it
//! with the production settings (etcd backend; one with the audit log on, fsync and group
//! commit as configured by default, one with it off, for the difference it makes to gets).
//! Then each workload three ways in alternating slices, the order rotated every round:
//! direct etcd (etcd-client over the three members, linearizable get, put), the
//! grpc-proxy, and the gateway (mTLS, authorization, encryption, audit, etcd). For puts a
//! fourth side puts straight into etcd inside a compare-and-set transaction: the cheapest
//! versioned write etcd offers, which every gateway put is. 100-byte values over 1,000 keys;
//! gateway callers share `BENCH_CONNECTIONS` (4) TLS connections, etcd callers one
//! etcd-client channel (a connection per member).
//!
//! Prints one row per workload, concurrency and side: ops/s (mean over rounds), latency
//! p50/p99/p999 over every request of the rounds, the ratio to direct etcd (median of the
//! per-round ratios) and the CPU time per request of the whole machine, of the etcd members
//! and, for the gateways, of the gateway. `--json` prints one JSON object instead: the core
//! count, the probe's fsync time, the rows, and the audit-on gateway's own log figures per
//! workload.
//!
//! Environment: `BENCH_OPS` (`get,put,mix`), `BENCH_CONCURRENCY` (`1,64,256`),
//! `BENCH_ROUNDS` (3), `BENCH_SLICE_MS` (1000), `BENCH_CONNECTIONS` (4), `BENCH_GROUP_US`
//! (the audit-on gateway's `audit.group_commit_us`; default: the gateway's default).

use std::time::Duration;

use secretgate::proto::v1::{AuditStatusRequest, admin_client::AdminClient};
use tonic::transport::Channel;

use secretgate_testkit::{
    audit::ServedGateway,
    bench::{self, Caller, Op, Pids, Slice, env_usize, mean, median, quantile_ms},
    etcd::EtcdCluster,
};

const KEYS: usize = 1000;
const ADMIN: &str = "spiffe://test.example/admin";
const DIRECT_PREFIX: &str = "/bench-direct/";

/// One way to reach the data.
struct Side {
    name: &'static str,
    callers: Vec<Caller>,
    /// The gateway's and etcd's processes, for their CPU per request.
    pids: Pids,
    /// Only for this workload (the audit-off gateway: gets; etcd's transactions: puts).
    only: Option<Op>,
}

/// What `--json` prints.
#[derive(serde::Serialize)]
struct Report {
    cores: usize,
    keys: usize,
    rounds: usize,
    slice_ms: u128,
    /// A back-to-back append + fsync where the audit logs are, before the load.
    fsync_probe_p50_ms: f64,
    fsync_probe_p99_ms: f64,
    rows: Vec<Row>,
    audit_log: Vec<AuditRow>,
}

/// The audit-on gateway's own log over one workload's rounds.
#[derive(serde::Serialize)]
struct AuditRow {
    workload: &'static str,
    concurrency: usize,
    records_per_fsync: f64,
    write_and_fsync_ms_per_batch: f64,
}

/// One row of the table.
#[derive(serde::Serialize)]
struct Row {
    workload: &'static str,
    concurrency: usize,
    side: &'static str,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    ratio_to_direct: f64,
    cpu_us_per_request: Option<f64>,
    etcd_cpu_us_per_request: f64,
    machine_cpu_us_per_request: f64,
}

fn list(var: &str, default: &str) -> Vec<String> {
    let raw = std::env::var(var).unwrap_or_else(|_| default.into());
    raw.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

async fn gateway(cluster: &EtcdCluster, audit: &str, prefix: &str) -> (ServedGateway, Vec<Caller>) {
    let mut gw = ServedGateway::prepare(audit).with_store(&cluster.store_toml(prefix));
    gw.serve("warn").await;
    let mut clients = Vec::new();
    for _ in 0..env_usize("BENCH_CONNECTIONS", 4) {
        clients.push(gw.client(ADMIN).await);
    }
    (gw, Caller::gateways(&clients))
}

#[tokio::main]
async fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let ops: Vec<Op> = list("BENCH_OPS", "get,put,mix")
        .iter()
        .map(|o| match o.as_str() {
            "get" => Op::Get,
            "put" => Op::Put,
            "mix" => Op::Mix,
            other => panic!("BENCH_OPS: unknown workload {other:?} (get, put, mix)"),
        })
        .collect();
    let concurrency: Vec<usize> = list("BENCH_CONCURRENCY", "1,64,256")
        .iter()
        .map(|c| c.parse().expect("BENCH_CONCURRENCY: numbers"))
        .collect();
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let slice_len = Duration::from_millis(env_usize("BENCH_SLICE_MS", 1000) as u64);

    let cluster = EtcdCluster::start().await;
    let proxy = cluster.grpc_proxy().await;
    let direct =
        Caller::Etcd(Box::new(cluster.client(None).await.kv_client()), DIRECT_PREFIX.into());
    let direct_txn =
        Caller::EtcdTxn(Box::new(cluster.client(None).await.kv_client()), DIRECT_PREFIX.into());
    let via_proxy = Caller::Etcd(
        Box::new(cluster.client_to(vec![proxy.endpoint.clone()]).await.kv_client()),
        DIRECT_PREFIX.into(),
    );
    let group = std::env::var("BENCH_GROUP_US").map(|us| format!("group_commit_us = {us}\n"));
    let (gw_on, on_callers) = gateway(&cluster, &group.unwrap_or_default(), "/sg-audit-on/").await;
    let (gw_off, off_callers) = gateway(&cluster, "enabled = false\n", "/sg-audit-off/").await;
    for caller in [&direct, &on_callers[0], &off_callers[0]] {
        bench::seed(caller, KEYS).await;
    }
    let pids = |gateway| Pids { gateway, etcd: cluster.pids() };
    let mut sides = vec![
        Side { name: "etcd direct", callers: vec![direct], pids: pids(None), only: None },
        Side {
            name: "etcd direct, CAS txn",
            callers: vec![direct_txn],
            pids: pids(None),
            only: Some(Op::Put),
        },
        Side { name: "etcd grpc-proxy", callers: vec![via_proxy], pids: pids(None), only: None },
        Side { name: "gateway", callers: on_callers, pids: pids(gw_on.pid()), only: None },
        Side {
            name: "gateway, audit off",
            callers: off_callers,
            pids: pids(gw_off.pid()),
            only: Some(Op::Get),
        },
    ];
    let mut on_admin = gw_on.admin(ADMIN).await;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let fsync = fsync_ms();
    if !json {
        println!(
            "secretgate vs etcd: 3-member etcd 3.4 (TLS, loopback), {cores} cores, {KEYS} keys of \
             100 bytes, {rounds} rounds of {slice_len:?} slices per side, order rotated each round"
        );
        println!(
            "fsync of a small append where the audit logs are: median {:.2} ms, p99 {:.2} ms",
            fsync.0, fsync.1
        );
    }

    let mut rows = Vec::new();
    let mut audit_log = Vec::new();
    for op in &ops {
        for &n in &concurrency {
            let active: Vec<usize> =
                (0..sides.len()).filter(|&i| sides[i].only.is_none_or(|o| o == *op)).collect();
            // Warm up every side for this workload.
            for &i in &active {
                let s = &sides[i];
                bench::slice(&s.callers, n, *op, KEYS, Duration::from_millis(300), &s.pids).await;
            }
            let before = audit_stats(&mut on_admin).await;
            let mut slices: Vec<Vec<Slice>> = vec![Vec::new(); sides.len()];
            for round in 0..rounds {
                for k in 0..active.len() {
                    let i = active[(k + round) % active.len()];
                    let s = &sides[i];
                    slices[i]
                        .push(bench::slice(&s.callers, n, *op, KEYS, slice_len, &s.pids).await);
                }
            }
            let after = audit_stats(&mut on_admin).await;
            for &i in &active {
                let row = row(op.name(), n, &sides[i], &slices[i], &slices[0]);
                if !json {
                    print_row(&row);
                }
                rows.push(row);
            }
            // The gateway's own audit log over these rounds: what a write + fsync cost it.
            let syncs = (after.1 - before.1).max(1) as f64;
            let audit = AuditRow {
                workload: op.name(),
                concurrency: n,
                records_per_fsync: (after.0 - before.0) as f64 / syncs,
                write_and_fsync_ms_per_batch: (after.2 - before.2) as f64 / syncs / 1000.0,
            };
            if !json {
                println!(
                    "{:>16}gateway's audit log: {:.1} records per fsync, write + fsync {:.2} ms \
                     mean per batch",
                    "", audit.records_per_fsync, audit.write_and_fsync_ms_per_batch,
                );
            }
            audit_log.push(audit);
        }
    }
    if json {
        let report = Report {
            cores,
            keys: KEYS,
            rounds,
            slice_ms: slice_len.as_millis(),
            fsync_probe_p50_ms: fsync.0,
            fsync_probe_p99_ms: fsync.1,
            rows,
            audit_log,
        };
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    }
    sides.clear();
    drop((gw_on, gw_off, proxy, cluster));
}

/// Records written, syncs and microseconds spent writing and syncing by a gateway's log.
async fn audit_stats(admin: &mut AdminClient<Channel>) -> (u64, u64, u64) {
    let s = admin.audit_status(AuditStatusRequest {}).await.unwrap().into_inner();
    (s.records_written, s.syncs, s.sync_micros)
}

/// Median and p99 of 200 appends of one audit-sized line, each made durable with fsync, in
/// the temporary directory (where the benchmark's gateways keep their audit logs).
fn fsync_ms() -> (f64, f64) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::create(dir.path().join("fsync-probe")).unwrap();
    let mut us: Vec<u32> = (0..200)
        .map(|_| {
            let started = std::time::Instant::now();
            file.write_all(&[b'x'; 300]).unwrap();
            file.sync_data().unwrap();
            started.elapsed().as_micros() as u32
        })
        .collect();
    us.sort_unstable();
    (quantile_ms(&us, 0.5), quantile_ms(&us, 0.99))
}

fn row(workload: &'static str, n: usize, side: &Side, own: &[Slice], direct: &[Slice]) -> Row {
    let mut latencies: Vec<u32> = own.iter().flat_map(|s| s.latencies_us.iter().copied()).collect();
    latencies.sort_unstable();
    let ratios: Vec<f64> = own.iter().zip(direct).map(|(o, d)| o.rate / d.rate).collect();
    let per_slice = |f: fn(&Slice) -> f64| mean(&own.iter().map(f).collect::<Vec<_>>());
    Row {
        workload,
        concurrency: n,
        side: side.name,
        ops_per_sec: per_slice(|s| s.rate),
        p50_ms: quantile_ms(&latencies, 0.5),
        p99_ms: quantile_ms(&latencies, 0.99),
        p999_ms: quantile_ms(&latencies, 0.999),
        ratio_to_direct: median(ratios),
        cpu_us_per_request: side.pids.gateway.map(|_| per_slice(|s| s.gateway_us)),
        etcd_cpu_us_per_request: per_slice(|s| s.etcd_us),
        machine_cpu_us_per_request: per_slice(|s| s.cpu_us),
    }
}

fn print_row(r: &Row) {
    let gateway = r.cpu_us_per_request.map_or_else(String::new, |c| format!(" gateway {c:.0}"));
    let cpu = format!(
        "  CPU µs/req: machine {:.0} etcd {:.0}{gateway}",
        r.machine_cpu_us_per_request, r.etcd_cpu_us_per_request
    );
    println!(
        "{:<6} {:>4}  {:<20} {:>8.0} ops/s  p50 {:>6.2}  p99 {:>6.2}  p999 {:>6.2} ms  {:>5.2}× direct{cpu}",
        r.workload,
        r.concurrency,
        r.side,
        r.ops_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.ratio_to_direct
    );
}
