//! Application-layer encryption end to end: what the store holds, tampering, rotation.

use secretgate_testkit as support;

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use secretgate::{
    SecretPath,
    audit::{Phase, Record},
    proto::v1::{
        GetRequest, KeyStatusRequest, KeyStatusResponse, PutRequest, RewrapRequest,
        admin_client::AdminClient, secrets_client::SecretsClient,
    },
    testing::{EmbeddedStore, Keyring, Store},
};
use support::TestGateway;
use tokio::sync::Mutex;
use tonic::{Code, transport::Channel};

const ADMIN: &str = "spiffe://test.example/admin";
const BIN: &str = env!("CARGO_BIN_EXE_secretgate");

fn put(path: &str, value: &[u8]) -> PutRequest {
    PutRequest { path: path.into(), value: value.to_vec(), expected_version: None }
}

async fn get(
    c: &mut SecretsClient<Channel>,
    path: &str,
    version: Option<u64>,
) -> Result<Vec<u8>, tonic::Status> {
    c.get(GetRequest { path: path.into(), version }).await.map(|r| r.into_inner().value)
}

async fn status(a: &mut AdminClient<Channel>) -> KeyStatusResponse {
    a.key_status(KeyStatusRequest {}).await.unwrap().into_inner()
}

fn records(s: &KeyStatusResponse, id: &str) -> u64 {
    s.keys.iter().find(|k| k.id == id).map_or(0, |k| k.records)
}

/// Waits until the gateway runs the keyring version now in the file.
async fn wait_for_reload(a: &mut AdminClient<Channel>, keyring: &std::path::Path) {
    let want = Keyring::load(keyring).unwrap().version().to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(a).await.keyring_version != want {
        assert!(Instant::now() < deadline, "gateway did not reload the keyring");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_store_file_never_holds_a_plaintext_value() {
    let mut gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    let markers: Vec<String> =
        (0..20).map(|i| format!("PLAINTEXT-MARKER-{i:03}-hunter2")).collect();
    for (i, m) in markers.iter().enumerate() {
        c.put(put(&format!("/app/secret{i}"), m.as_bytes())).await.unwrap();
        c.put(put(&format!("/app/secret{i}"), m.as_bytes())).await.unwrap();
    }
    let big = "BIGMARKER-".repeat(6000);
    c.put(put("/app/big", big.as_bytes())).await.unwrap();
    drop(c);
    gw.stop().await;
    let raw = std::fs::read(gw.store_path()).unwrap();
    for m in markers.iter().map(String::as_str).chain(["hunter2", "BIGMARKER"]) {
        assert!(
            !raw.windows(m.len()).any(|w| w == m.as_bytes()),
            "plaintext {m} found in the store file"
        );
    }
    // Paths are not secret and are stored in the clear: the scan above is not vacuous.
    assert!(raw.windows(12).any(|w| w == b"/app/secret1"));
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_path_or_version_is_data_loss() {
    let mut gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    c.put(put("/a", b"SECRET-A1")).await.unwrap();
    c.put(put("/a", b"SECRET-A2")).await.unwrap();
    c.put(put("/b", b"SECRET-B1")).await.unwrap();
    drop(c);
    gw.stop().await;
    {
        let store = EmbeddedStore::open(gw.store_path(), 10).unwrap();
        let p = |s: &str| SecretPath::parse(s).unwrap();
        let a1 = store.get(&p("/a"), Some(1)).await.unwrap().value;
        let a2 = store.get(&p("/a"), Some(2)).await.unwrap().value;
        let b1 = store.get(&p("/b"), Some(1)).await.unwrap().value;
        assert!(store.replace(&p("/b"), 1, &b1, &a1).await.unwrap(), "copy /a v1 over /b v1");
        assert!(store.replace(&p("/a"), 2, &a2, &a1).await.unwrap(), "roll /a v2 back to v1");
    }
    gw.start_again().await;
    let mut c = gw.client(ADMIN).await;
    for path in ["/b", "/a"] {
        let s = get(&mut c, path, None).await.unwrap_err();
        assert_eq!(s.code(), Code::DataLoss, "{path}: {s:?}");
        assert!(s.message().contains("cannot be decrypted"), "{}", s.message());
        let keyring = Keyring::load(&gw.config.crypto.keyring).unwrap();
        assert!(!s.message().contains(keyring.primary().id.as_str()), "no key ids to clients");
        assert!(!s.message().contains("SECRET-"), "never the wrong secret");
    }
    assert_eq!(get(&mut c, "/a", Some(1)).await.unwrap(), b"SECRET-A1", "the original still opens");
}

#[tokio::test]
async fn a_broken_keyring_file_is_refused_and_the_last_good_one_stays() {
    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    let mut a = gw.admin(ADMIN).await;
    c.put(put("/k", b"v")).await.unwrap();
    let before = status(&mut a).await.keyring_version;
    let keyring = &gw.config.crypto.keyring;
    let good = std::fs::read(keyring).unwrap();
    std::fs::write(keyring, "[[keys]]\nid = \"x\"\nstate = \"active\"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let refused = loop {
        let s = status(&mut a).await;
        if !s.reload_error.is_empty() {
            break s;
        }
        assert!(Instant::now() < deadline, "the broken keyring was never looked at");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.keyring_version, before, "the last good keyring stays in force");
    assert!(refused.reload_error.contains("keyring"), "{}", refused.reload_error);
    assert_eq!(get(&mut c, "/k", None).await.unwrap(), b"v");
    c.put(put("/k", b"v2")).await.unwrap();
    std::fs::write(keyring, &good).unwrap();
    let mut ring = Keyring::load(keyring).unwrap();
    ring.add().unwrap();
    ring.save(keyring).unwrap();
    wait_for_reload(&mut a, keyring).await;
    let s = status(&mut a).await;
    assert_ne!(s.keyring_version, before);
    assert!(s.reload_error.is_empty(), "a good reload clears the error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_online_rewrap_under_concurrent_writes() {
    const N: usize = 150;
    let gw = TestGateway::start().await;
    let keyring = gw.config.crypto.keyring.clone();
    let mut c = gw.client(ADMIN).await;
    let mut a = gw.admin(ADMIN).await;
    let key_a = Keyring::load(&keyring).unwrap().primary().id.to_string();
    let latest: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
    for i in 0..N {
        let (path, value) = (format!("/rot/s{i:03}"), format!("a-{i}").into_bytes());
        c.put(put(&path, &value)).await.unwrap();
        latest.lock().await.insert(path, value);
    }
    assert_eq!(records(&status(&mut a).await, &key_a), N as u64);

    // Add and promote key B, as the runbook says, and wait for the gateway to load it.
    let mut ring = Keyring::load(&keyring).unwrap();
    let key_b = ring.add().unwrap().to_string();
    ring.save(&keyring).unwrap();
    wait_for_reload(&mut a, &keyring).await;
    let mut ring = Keyring::load(&keyring).unwrap();
    ring.promote(&key_b).unwrap();
    ring.save(&keyring).unwrap();
    wait_for_reload(&mut a, &keyring).await;

    // Retiring A is refused while records use it.
    let cli = gw.cli_args(ADMIN);
    let retire = |id: &str| {
        Command::new(BIN)
            .args(["keys", "retire", id, "--keyring"])
            .arg(&keyring)
            .args(&cli)
            .output()
            .unwrap()
    };
    let refused = retire(&key_a);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("still sealed under it") && err.contains("rewrap"), "{err}");

    // A writer keeps writing while rewrap runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, latest) = (Arc::clone(&stop), Arc::clone(&latest));
        let mut w = gw.client("spiffe://test.example/writer").await;
        tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                for i in (0..N).step_by(7) {
                    let (path, value) =
                        (format!("/rot/s{i:03}"), format!("b-{round}-{i}").into_bytes());
                    w.put(put(&path, &value)).await.unwrap();
                    latest.lock().await.insert(path, value);
                }
                round += 1;
            }
            round
        })
    };
    let mut stream = a.rewrap(RewrapRequest {}).await.unwrap().into_inner();
    let mut last = None;
    while let Some(p) = stream.message().await.unwrap() {
        last = Some(p);
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    let last = last.expect("at least the final progress message");
    assert!(last.done, "{last:?}");
    assert_eq!(last.failed, 0);
    assert!(last.rewrapped > 0);
    assert!(rounds > 0, "the writer ran during the rewrap");

    // Every secret reads back its latest acknowledged value, and all records are under B.
    for (path, value) in latest.lock().await.iter() {
        assert_eq!(&get(&mut c, path, None).await.unwrap(), value, "{path}");
    }
    let s = status(&mut a).await;
    assert_eq!(records(&s, &key_a), 0, "{s:?}");
    assert_eq!(records(&s, &key_b), s.total_records);

    let ok = retire(&key_a);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    wait_for_reload(&mut a, &keyring).await;
    assert!(Keyring::load(&keyring).unwrap().opener(&key_a).is_none());
    for (path, value) in latest.lock().await.iter().take(10) {
        assert_eq!(&get(&mut c, path, None).await.unwrap(), value, "{path}");
    }
    // Older versions were rewrapped too: they still open without key A.
    assert_eq!(get(&mut c, "/rot/s000", Some(1)).await.unwrap(), b"a-0");
}

#[tokio::test]
async fn rewrap_is_resumable_and_idempotent() {
    let gw = TestGateway::start().await;
    let keyring = gw.config.crypto.keyring.clone();
    let mut c = gw.client(ADMIN).await;
    let mut a = gw.admin(ADMIN).await;
    for i in 0..300 {
        c.put(put(&format!("/r/s{i:03}"), b"v")).await.unwrap();
    }
    let mut ring = Keyring::load(&keyring).unwrap();
    let b = ring.add().unwrap();
    ring.promote(b.as_str()).unwrap();
    ring.save(&keyring).unwrap();
    wait_for_reload(&mut a, &keyring).await;
    // Interrupt a run by dropping the stream after the first progress message.
    let mut stream = a.rewrap(RewrapRequest {}).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    drop(stream);
    assert!(!first.done);
    // The next run finishes the job; a third finds nothing to do.
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        match a.rewrap(RewrapRequest {}).await {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut last = None;
                while let Some(p) = s.message().await.unwrap() {
                    last = Some(p);
                }
                break last.unwrap();
            }
            // The interrupted run may still be winding down.
            Err(st) if st.code() == Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(st) => panic!("{st:?}"),
        }
    };
    assert!(second.done && second.failed == 0, "{second:?}");
    assert_eq!(second.rewrapped + second.current, 300);
    // Each run's outcome is recorded when it ends, with what it did: the interrupted run's
    // as CANCELLED, the finished run's (durable before its last message) as OK.
    let outcomes: Vec<Record> = support::audit::read_log(&gw.config.audit.path)
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.method.as_deref() == Some("secretgate.v1.Admin/Rewrap"))
        .filter(|r| {
            r.phase == Some(Phase::Outcome) && r.status.as_deref() != Some("FAILED_PRECONDITION")
        })
        .collect();
    let [cancelled, finished] = outcomes.as_slice() else { panic!("{outcomes:#?}") };
    assert_eq!(cancelled.status.as_deref(), Some("CANCELLED"), "{cancelled:?}");
    let reason = cancelled.reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("rewrap cancelled by the caller: scanned "), "{reason}");
    assert_eq!(finished.status.as_deref(), Some("OK"), "{finished:?}");
    assert_eq!(finished.key_id.as_deref(), Some(b.as_str()));
    let want = format!(
        "rewrap finished: scanned 300, rewrapped {}, already under the primary key {}, \
         changed meanwhile and skipped 0, failed to open 0",
        second.rewrapped, second.current
    );
    assert_eq!(finished.reason.as_deref(), Some(want.as_str()));
    let mut s = a.rewrap(RewrapRequest {}).await.unwrap().into_inner();
    let mut third = None;
    while let Some(p) = s.message().await.unwrap() {
        third = Some(p);
    }
    let third = third.unwrap();
    assert_eq!((third.rewrapped, third.current, third.to_rewrap), (0, 300, 0));
}
