//! What the audit log costs: requests per second through a real gateway (mTLS, authz,
//! encryption, embedded store) with the audit log on (fsync, group commit) and off, in the
//! same run. `cargo bench --bench audit`.
//!
//! Two gateways run side by side for each operation, each `secretgate serve` in its own
//! process (the release binary, its default runtime), one with the audit log off and one with
//! it on, each with its own store and log on the same disk (under the temp dir, not a tmpfs).
//! The load comes from this process: `AUDIT_BENCH_CLIENTS` (64) concurrent callers on
//! `AUDIT_BENCH_CONNECTIONS` (4) TLS connections, sent to one gateway at a time in short
//! alternating slices, so drift of the shared machine hits both sides alike; the cost is the
//! median of the per-pair ratios. Gets read existing secrets; Puts write them (a write
//! records an intent and an outcome, each durable before the next step). Goal (issue 5): the
//! audit log costs under 10% of throughput.
//!
//! Environment: `AUDIT_BENCH_OPS=get,put` and `AUDIT_BENCH_PAIRS=8` choose what runs;
//! `AUDIT_BENCH_GROUP_US` sets `audit.group_commit_us`; `AUDIT_BENCH_PROFILE=on|off` runs
//! one side alone (for a profiler).
//!
//! Besides requests per second, each line prints the CPU time of the whole machine (gateway
//! and load generator) per request and how busy the machine was, so a cost can be told apart
//! from a wait, and how many records one fsync covered.

use secretgate_testkit as support;

use std::time::Duration;

use secretgate::proto::v1::{
    AuditStatusRequest, admin_client::AdminClient, secrets_client::SecretsClient,
};
use support::{
    audit::ServedGateway,
    bench::{self, Caller, Op, Pids, Slice, env_usize, mean, median},
};
use tonic::transport::Channel;

const SLICE: Duration = Duration::from_millis(1500);
const WARM_UP: Duration = Duration::from_millis(500);
const KEYS: usize = 256;
const ADMIN: &str = "spiffe://test.example/admin";

/// One gateway under test (its own process), with clients connected to it.
struct Side {
    gw: ServedGateway,
    clients: Vec<SecretsClient<Channel>>,
    admin: AdminClient<Channel>,
}

impl Side {
    async fn start(audit: bool) -> Self {
        let mut extra = format!("enabled = {audit}\n");
        if let Ok(us) = std::env::var("AUDIT_BENCH_GROUP_US") {
            extra.push_str(&format!("group_commit_us = {us}\n"));
        }
        let mut gw = ServedGateway::prepare(&extra);
        gw.serve("warn").await;
        let mut clients = Vec::new();
        for _ in 0..env_usize("AUDIT_BENCH_CONNECTIONS", 4) {
            clients.push(gw.client(ADMIN).await);
        }
        bench::seed(&Caller::Gateway(clients[0].clone()), KEYS).await;
        let admin = gw.admin(ADMIN).await;
        Self { gw, clients, admin }
    }

    /// Records written and syncs so far.
    async fn stats(&mut self) -> (u64, u64) {
        let s = self.admin.audit_status(AuditStatusRequest {}).await.unwrap().into_inner();
        (s.records_written, s.syncs)
    }

    /// Runs the load for `length`.
    async fn slice(&self, op: Op, length: Duration) -> Slice {
        let callers = env_usize("AUDIT_BENCH_CLIENTS", 64);
        let clients = Caller::gateways(&self.clients);
        bench::slice(&clients, callers, op, KEYS, length, &Pids::gateway(self.gw.pid())).await
    }
}

#[tokio::main]
async fn main() {
    let ops = std::env::var("AUDIT_BENCH_OPS").unwrap_or_else(|_| "get,put".into());
    let pairs = env_usize("AUDIT_BENCH_PAIRS", 8);
    let clients = env_usize("AUDIT_BENCH_CLIENTS", 64);
    let connections = env_usize("AUDIT_BENCH_CONNECTIONS", 4);
    println!(
        "audit log cost: {clients} concurrent clients on {connections} connections, \
         {pairs} pairs of {SLICE:?} slices alternating off/on, 100-byte values"
    );
    for name in ops.split(',') {
        let op = match name {
            "get" => Op::Get,
            "put" => Op::Put,
            other => panic!("AUDIT_BENCH_OPS: unknown op {other:?} (get, put)"),
        };
        if let Ok(side) = std::env::var("AUDIT_BENCH_PROFILE") {
            // One side only, for a profiler: AUDIT_BENCH_PROFILE=on or off.
            let s = Side::start(side == "on").await;
            let r = s.slice(op, SLICE * pairs as u32).await;
            println!(
                "{name} audit {side}: {:.0} req/s, CPU per request {:.0} µs (gateway {:.0} µs), \
                 machine busy {:.0}%",
                r.rate,
                r.cpu_us,
                r.gateway_us,
                r.busy * 100.0
            );
            continue;
        }
        let off = Side::start(false).await;
        let mut on = Side::start(true).await;
        off.slice(op, WARM_UP).await;
        on.slice(op, WARM_UP).await;
        let before = on.stats().await;
        let (mut off_s, mut on_s, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for pair in 0..pairs {
            // Alternate which side goes first, so neither always follows the other.
            let (a, b) = if pair % 2 == 0 {
                (off.slice(op, SLICE).await, on.slice(op, SLICE).await)
            } else {
                let b = on.slice(op, SLICE).await;
                (off.slice(op, SLICE).await, b)
            };
            ratios.push(b.rate / a.rate);
            off_s.push(a);
            on_s.push(b);
        }
        let after = on.stats().await;
        let per_sync = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
        let ratio = median(ratios);
        let avg = |v: &[Slice], f: fn(&Slice) -> f64| mean(&v.iter().map(f).collect::<Vec<_>>());
        println!(
            "{name}: audit off {:>8.0} req/s  audit on {:>8.0} req/s  median on/off = {ratio:.3} \
             (cost {:+.1}%)  {per_sync:.1} records per fsync",
            avg(&off_s, |s| s.rate),
            avg(&on_s, |s| s.rate),
            (1.0 - ratio) * 100.0,
        );
        println!(
            "      CPU per request off {:.1} µs (gateway {:.1})  on {:.1} µs (gateway {:.1})  \
             machine busy off {:.0}% on {:.0}%",
            avg(&off_s, |s| s.cpu_us),
            avg(&off_s, |s| s.gateway_us),
            avg(&on_s, |s| s.cpu_us),
            avg(&on_s, |s| s.gateway_us),
            avg(&off_s, |s| s.busy * 100.0),
            avg(&on_s, |s| s.busy * 100.0),
        );
        println!(
            "      slices off {:?}\n      slices on  {:?}",
            off_s.iter().map(|s| s.rate as u64).collect::<Vec<_>>(),
            on_s.iter().map(|s| s.rate as u64).collect::<Vec<_>>(),
        );
    }
}
