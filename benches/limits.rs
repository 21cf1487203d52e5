//! What the per-request limits cost (issue 16): Gets per second through one real gateway
//! (mTLS, authz, encryption, embedded store, audit log off) with the limits enforced and
//! with them switched off at run time, in the same process and the same run.
//! `cargo bench --bench limits`.
//!
//! The switch (`secretgate::testing::bypass_request_limits`, only in the `testing` build)
//! turns off everything the new limits do per request: the rate limiter (with a principal
//! limit and a shared role limit that apply to every request, set high enough never to
//! refuse), the request memory budget and the open-stream accounting of the idle timeout.
//! The per-connection limits (handshake budget, stream limit) cost nothing per request on
//! these long-lived connections. Slices alternate on/off; the cost is the median of the
//! per-pair ratios. Goal: under 3% of get throughput with the log off.
//!
//! Environment: `LIMITS_BENCH_PAIRS` (10), `LIMITS_BENCH_CLIENTS` (64),
//! `LIMITS_BENCH_CONNECTIONS` (4).

use std::time::Duration;

use secretgate_testkit::{
    TestGateway,
    bench::{self, Caller, Op, env_usize, mean, median},
    write,
};

const SLICE: Duration = Duration::from_millis(1500);
const KEYS: usize = 256;
const ADMIN: &str = "spiffe://test.example/admin";

/// Limits that apply to the benchmark's caller (its own and its role's) but never refuse.
const LIMITS: &str = r#"
[principal."spiffe://test.example/admin"]
read = { per_second = 1000000, burst = 1000000 }

[role."role:admin"]
read = { per_second = 1000000, burst = 1000000 }
"#;

#[tokio::main]
async fn main() {
    let pairs = env_usize("LIMITS_BENCH_PAIRS", 10);
    let callers = env_usize("LIMITS_BENCH_CLIENTS", 64);
    let connections = env_usize("LIMITS_BENCH_CONNECTIONS", 4);
    let gw = TestGateway::start_with(|c| {
        c.audit.enabled = false;
        write(&c.authz.policies, "rate_limits.toml", LIMITS);
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(gw.client(ADMIN).await);
    }
    let clients = Caller::gateways(&clients);
    bench::seed(&clients[0], KEYS).await;
    println!(
        "per-request limits cost: {callers} concurrent Gets on {connections} connections, \
         {pairs} pairs of {SLICE:?} slices alternating off/on, audit log off, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let run = |on: bool, length| {
        secretgate::testing::bypass_request_limits(!on);
        bench::slice(&clients, callers, Op::Get, KEYS, length, None)
    };
    run(true, Duration::from_millis(500)).await;
    run(false, Duration::from_millis(500)).await;
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..pairs {
        // Alternate which side goes first, so neither always follows the other.
        let (a, b) = if pair % 2 == 0 {
            let a = run(false, SLICE).await;
            (a, run(true, SLICE).await)
        } else {
            let b = run(true, SLICE).await;
            (run(false, SLICE).await, b)
        };
        ratios.push(b.rate / a.rate);
        off.push(a);
        on.push(b);
    }
    secretgate::testing::bypass_request_limits(false);
    let ratio = median(ratios);
    let rates = |v: &[bench::Slice]| v.iter().map(|s| s.rate).collect::<Vec<_>>();
    let cpu = |v: &[bench::Slice]| mean(&v.iter().map(|s| s.cpu_us).collect::<Vec<_>>());
    println!(
        "get: limits off {:>8.0} req/s  limits on {:>8.0} req/s  median on/off = {ratio:.3} \
         (cost {:+.1}%; goal under 3%)",
        mean(&rates(&off)),
        mean(&rates(&on)),
        (1.0 - ratio) * 100.0,
    );
    println!(
        "      CPU per request (whole machine) off {:.1} µs  on {:.1} µs",
        cpu(&off),
        cpu(&on)
    );
    println!(
        "      slices off {:?}\n      slices on  {:?}",
        rates(&off).iter().map(|r| *r as u64).collect::<Vec<_>>(),
        rates(&on).iter().map(|r| *r as u64).collect::<Vec<_>>(),
    );
}
