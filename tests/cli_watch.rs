//! `secretgate watch` as a user runs it: a child process printing JSON lines, following a
//! gateway through a restart and resuming where it left off, exactly once per change.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use secretgate::proto::v1::PutRequest;
use secretgate_testkit::TestGateway;

const BIN: &str = env!("CARGO_BIN_EXE_secretgate");
const ADMIN: &str = "spiffe://test.example/admin";
const READER: &str = "spiffe://test.example/reader";

fn put(path: &str) -> PutRequest {
    PutRequest { path: path.into(), value: b"s3cret-value".to_vec(), expected_version: None }
}

/// The next `n` lines the child prints, within `within`.
fn lines(rx: &mpsc::Receiver<String>, n: usize, within: Duration) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + within;
    (0..n)
        .map(|i| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("line {i} of {n} missing"));
            serde_json::from_str(&line).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_each_change_once_and_resumes_after_a_gateway_restart() {
    let mut gw = TestGateway::start().await;
    let mut child = Command::new(BIN)
        .arg("watch")
        .arg("/shared")
        .args(gw.cli_args(READER))
        .args(["--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The watch is open once a write shows up (the first may come before it opened).
    let mut admin = gw.client(ADMIN).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        admin.put(put("/shared/probe")).await.unwrap();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break serde_json::from_str::<serde_json::Value>(&line).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "secretgate watch printed nothing");
    };
    assert_eq!(first["path"], "/shared/probe");
    assert_eq!(first["kind"], "written");
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}

    admin.put(put("/shared/a")).await.unwrap();
    admin.put(put("/secret/hidden")).await.unwrap();
    let before = lines(&rx, 1, Duration::from_secs(5));
    assert_eq!(before[0]["path"], "/shared/a");
    assert!(!before[0].to_string().contains("s3cret"), "never a value");

    gw.restart().await;
    let mut admin = gw.client(ADMIN).await;
    for p in ["/shared/b", "/shared/c"] {
        admin.put(put(p)).await.unwrap();
    }
    let after = lines(&rx, 2, Duration::from_secs(20));
    let paths: Vec<_> = after.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/shared/b", "/shared/c"]);
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "nothing twice");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("resuming from revision"), "{stderr}");
}
