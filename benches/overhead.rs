//! What the per-request limits (issue 16) and the metrics (issue 19) cost: Gets per second
//! through one real gateway (mTLS, authz, encryption, embedded store, audit log off) with the
//! feature on and with it switched off at run time, in the same process and the same run.
//! `cargo bench --bench overhead`.
//!
//! - **limits**: `secretgate::testing::bypass_request_limits` (only in the `testing` build)
//!   turns off everything the limits do per request: the rate limiter (with a principal
//!   limit and a shared role limit that apply to every request, set high enough never to
//!   refuse), the request memory budget and the open-stream accounting of the idle timeout.
//!   The per-connection limits (handshake budget, stream limit) cost nothing per request on
//!   these long-lived connections.
//! - **metrics**: `secretgate::metrics::set_recording` turns off every event metric a
//!   request records (request count and latency, the decision, store call latency); the
//!   endpoint is on and scraped once per slice, as Prometheus would.
//!
//! Slices alternate on/off; the cost is the median of the per-pair ratios. Goal for each:
//! under 3% of get throughput with the log off.
//!
//! Environment: `OVERHEAD_BENCH_PAIRS` (10), `OVERHEAD_BENCH_CLIENTS` (64),
//! `OVERHEAD_BENCH_CONNECTIONS` (4), `OVERHEAD_BENCH_ONLY` (`limits` or `metrics`).

use std::{net::SocketAddr, time::Duration};

use secretgate_testkit::{
    TestGateway,
    bench::{self, Caller, Op, Pids, env_usize, mean, median},
    http_get, write,
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

/// A feature switched at run time.
#[derive(Clone, Copy)]
enum Feature {
    Limits,
    Metrics,
}

impl Feature {
    fn name(self) -> &'static str {
        match self {
            Self::Limits => "limits",
            Self::Metrics => "metrics",
        }
    }

    fn set(self, on: bool) {
        match self {
            Self::Limits => secretgate::testing::bypass_request_limits(!on),
            Self::Metrics => secretgate::metrics::set_recording(on),
        }
    }
}

#[tokio::main]
async fn main() {
    let pairs = env_usize("OVERHEAD_BENCH_PAIRS", 10);
    let callers = env_usize("OVERHEAD_BENCH_CLIENTS", 64);
    let connections = env_usize("OVERHEAD_BENCH_CONNECTIONS", 4);
    let only = std::env::var("OVERHEAD_BENCH_ONLY").unwrap_or_default();
    let gw = TestGateway::start_with(|c| {
        c.audit.enabled = false;
        c.metrics.listen = "127.0.0.1:0".into();
        write(&c.authz.policies, "rate_limits.toml", LIMITS);
    })
    .await;
    let metrics = gw.metrics_addr().expect("metrics on");
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(gw.client(ADMIN).await);
    }
    let clients = Caller::gateways(&clients);
    bench::seed(&clients[0], KEYS).await;
    println!(
        "per-request cost of each feature: {callers} concurrent Gets on {connections} \
         connections, {pairs} pairs of {SLICE:?} slices alternating off/on, audit log off, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for feature in [Feature::Limits, Feature::Metrics] {
        if !only.is_empty() && only != feature.name() {
            continue;
        }
        measure(feature, &clients, callers, pairs, metrics).await;
    }
    if only.is_empty() || only == "metrics" {
        recording_alone();
    }
}

/// What a Get records, timed alone on every core at once (the families are shared, so this
/// includes their contention): a figure the noise of whole-request slices cannot hide.
fn recording_alone() {
    const CALLS: u32 = 1_000_000;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..CALLS {
                    let took = std::hint::black_box(Duration::from_micros(700));
                    secretgate::metrics::rpc("secretgate.v1.Secrets/Get", tonic::Code::Ok, took);
                    secretgate::metrics::decision("read", "allow");
                    secretgate::metrics::store_call("get", took, None);
                }
            });
        }
    });
    let per = started.elapsed().as_secs_f64() * 1e9 / f64::from(CALLS);
    println!(
        "metrics  what one Get records (request count and latency, decision, store latency), \
         alone on {threads} threads at once: {per:.0} ns of wall time per Get per thread"
    );
}

async fn measure(
    feature: Feature,
    clients: &[Caller],
    callers: usize,
    pairs: usize,
    metrics: SocketAddr,
) {
    let run = |on: bool, length| async move {
        feature.set(on);
        let slice = bench::slice(clients, callers, Op::Get, KEYS, length, &Pids::default()).await;
        // A scrape per slice, as a Prometheus server would do every few seconds.
        assert!(http_get(metrics, "/metrics", None).await.starts_with("HTTP/1.1 200"));
        slice
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
    feature.set(true);
    let ratio = median(ratios);
    let rates = |v: &[bench::Slice]| v.iter().map(|s| s.rate).collect::<Vec<_>>();
    let cpu = |v: &[bench::Slice]| mean(&v.iter().map(|s| s.cpu_us).collect::<Vec<_>>());
    println!(
        "{:<8} get: off {:>8.0} req/s  on {:>8.0} req/s  median on/off = {ratio:.3} \
         (cost {:+.1}%; goal under 3%)",
        feature.name(),
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
