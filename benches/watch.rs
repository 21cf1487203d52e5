//! Watch at scale (issue 18): 1,000 concurrent watchers (100 per connection, within the
//! per-connection stream limit) on one release gateway (`secretgate serve`, embedded store,
//! audit log on with fsync) while 100 writes a second land. Prints the delivery latency from
//! each acknowledged write to its event received by each watcher (p50, p99, max; an event
//! may arrive before its writer hears the acknowledgement, which counts as 0), and the
//! gateway's resident memory per idle watcher beyond its connection. Also from each write
//! sent, which includes the write itself (its store commit and audit fsync). Goals: p99 under 50 ms,
//! under 16 KiB per watcher. `cargo bench --bench watch`.
//!
//! Environment: `WATCH_BENCH_WATCHERS` (1000), `WATCH_BENCH_PER_CONNECTION` (100),
//! `WATCH_BENCH_RATE` (writes a second, 100), `WATCH_BENCH_SECS` (10).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use secretgate::proto::v1::{PutRequest, WatchRequest, WhoAmIRequest};
use secretgate_testkit::{
    audit::ServedGateway,
    bench::{env_usize, process_ticks, quantile_ms},
};

const ADMIN: &str = "spiffe://test.example/admin";

/// The gateway process's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let watchers = env_usize("WATCH_BENCH_WATCHERS", 1000);
    let per_connection = env_usize("WATCH_BENCH_PER_CONNECTION", 100).min(100);
    let rate = env_usize("WATCH_BENCH_RATE", 100);
    let secs = env_usize("WATCH_BENCH_SECS", 10);
    let mut gw = ServedGateway::prepare("").with_config(&format!(
        "[watch]\nmax_per_principal = {}\nheartbeat_secs = 3600\n",
        watchers.max(1)
    ));
    gw.serve("warn").await;
    let pid = gw.pid().expect("serving");

    // The connections first, each used once, so the memory step below is the watchers'.
    let connections = watchers.div_ceil(per_connection);
    let mut clients = Vec::new();
    for _ in 0..connections {
        let mut c = gw.client(ADMIN).await;
        c.who_am_i(WhoAmIRequest {}).await.unwrap();
        clients.push(c);
    }
    let before = rss_kib(pid);
    let mut streams = Vec::new();
    for i in 0..watchers {
        let mut client = clients[i / per_connection].clone();
        let req = WatchRequest { prefix: "/bench".into(), from_revision: 0 };
        streams.push(client.watch(req).await.unwrap().into_inner());
    }
    let after = rss_kib(pid);
    let per_watcher = (after.saturating_sub(before) as f64) / watchers as f64;

    // Each watcher notes when it received each event (by the written path's sequence).
    let writes = rate * secs;
    let received: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let mut readers = Vec::new();
    for mut stream in streams {
        let received = Arc::clone(&received);
        readers.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(writes);
            while mine.len() < writes {
                let Some(message) = stream.message().await.unwrap() else { break };
                let now = Instant::now();
                for e in message.events {
                    let seq = e.path.rsplit_once("/e").and_then(|(_, n)| n.parse().ok());
                    mine.push((seq.expect("a bench path"), now));
                }
            }
            received.lock().unwrap().extend(mine);
        }));
    }

    let ticks = process_ticks(Some(pid));
    let started = Instant::now();
    let mut acked = HashMap::with_capacity(writes);
    let mut sent = HashMap::with_capacity(writes);
    let mut writer = gw.client(ADMIN).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
    for seq in 0..writes {
        tick.tick().await;
        let put = PutRequest {
            path: format!("/bench/e{seq}"),
            value: vec![7; 100],
            expected_version: None,
        };
        sent.insert(seq, Instant::now());
        writer.put(put).await.unwrap();
        acked.insert(seq, Instant::now());
    }
    let wrote_for = started.elapsed();
    for r in readers {
        tokio::time::timeout(Duration::from_secs(60), r).await.expect("every event").unwrap();
    }
    let cpu_s = (process_ticks(Some(pid)) - ticks) as f64 / 100.0;

    let received = received.lock().unwrap();
    let mut early = 0usize;
    let mut latencies: Vec<u32> = received
        .iter()
        .map(|(seq, at)| match at.checked_duration_since(acked[seq]) {
            Some(d) => d.as_micros().min(u128::from(u32::MAX)) as u32,
            None => {
                early += 1;
                0
            }
        })
        .collect();
    latencies.sort_unstable();
    let mut from_sent: Vec<u32> = received
        .iter()
        .map(|(seq, at)| at.duration_since(sent[seq]).as_micros().min(u128::from(u32::MAX)) as u32)
        .collect();
    from_sent.sort_unstable();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "secretgate watch: {watchers} watchers on {connections} connections, {writes} writes at \
         {rate}/s ({:.1} s), release gateway, embedded store, audit log on; {cores} cores",
        wrote_for.as_secs_f64()
    );
    println!(
        "delivery, acknowledged write -> event received ({} events): p50 {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms ({early} before the acknowledgement reached the writer, counted as 0)",
        latencies.len(),
        quantile_ms(&latencies, 0.5),
        quantile_ms(&latencies, 0.99),
        quantile_ms(&latencies, 1.0),
    );
    println!(
        "delivery, write sent -> event received (the write's own time included): p50 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms",
        quantile_ms(&from_sent, 0.5),
        quantile_ms(&from_sent, 0.99),
        quantile_ms(&from_sent, 1.0),
    );
    println!(
        "gateway memory: {before} KiB with {connections} connections, {after} KiB with the \
         watchers open: {per_watcher:.1} KiB per idle watcher"
    );
    println!(
        "gateway CPU while writing and delivering: {cpu_s:.2} s ({:.0} µs per delivered event)",
        cpu_s * 1e6 / latencies.len().max(1) as f64
    );
}
