//! The audit log under stress, against real gateways writing real files: it fails closed on a
//! full disk and recovers by itself, a crash mid-load loses no record of an acknowledged write,
//! a removed file is noticed and the chain continues, and rotation keeps the chain.

use secretgate_testkit as support;

use std::{
    io::Write,
    time::{Duration, Instant},
};

use secretgate::{
    audit::{
        Kind, Phase, Record, VerifyingKey, record::line_hash, signing::pub_path,
        verify::verify_files,
    },
    proto::v1::{AuditStatusRequest, GetRequest},
};
use support::{
    TestGateway,
    audit::{
        Load, ServedGateway, Tmpfs, assert_acknowledged_writes_recorded, fill, get, log_files,
        ok_count, put, read_all, read_log, request_id, unavailable_count, verify_log,
    },
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const ADMIN: &str = "spiffe://test.example/admin";

// ---------------------------------------------------------------------------------------------
// Fail closed when the disk is full, and recover by itself.

#[tokio::test]
async fn fail_closed_when_the_disk_is_full_and_recovers_by_itself() {
    // A size-limited tmpfs makes the kernel itself answer ENOSPC, exactly as a full disk
    // does: no fault injected into the gateway, nothing the writer could tell from the real
    // thing. A directory made read-only with chmod would prove nothing here, because these
    // tests run as root and root writes through file permissions.
    let disk = Tmpfs::mount("2m");
    const TIMEOUT_MS: u64 = 1000;
    let log = disk.path().join("audit.log");
    let mut gw = TestGateway::start_with(|c| {
        c.audit.path = log.clone();
        c.audit.timeout_ms = secretgate::config::Ranged::of::<TIMEOUT_MS>();
    })
    .await;
    let mut health = HealthClient::new(gw.channel(&gw.ca.client(ADMIN)).await.unwrap());
    assert_eq!(health_of(&mut health).await, ServingStatus::Serving);
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(gw.client(ADMIN).await);
    }
    let load = Load::start(clients);
    load.wait_for("puts acknowledged before the disk fills", |a| ok_count(a) >= 30).await;

    let filler = fill(disk.path());
    wait_for_health(&mut health, ServingStatus::NotServing).await;
    // Not ready (send no traffic), but live (do not restart it).
    wait_for_service(&mut health, secretgate::READINESS, ServingStatus::NotServing).await;
    assert_eq!(service_status(&mut health, secretgate::LIVENESS).await, ServingStatus::Serving);
    load.wait_for("puts refused while the disk is full", |a| unavailable_count(a) >= 20).await;
    // Asked now, checked last, so that every other promise is checked whatever it says.
    let mut admin = gw.admin(ADMIN).await;
    let status_while_failing = admin.audit_status(AuditStatusRequest {}).await;

    std::fs::remove_file(&filler).unwrap();
    wait_for_health(&mut health, ServingStatus::Serving).await;
    wait_for_service(&mut health, secretgate::READINESS, ServingStatus::Serving).await;
    let before = ok_count(&load.answers());
    load.wait_for("puts acknowledged after the recovery", |a| ok_count(a) >= before + 20).await;
    let answers = load.stop().await;
    // A refused put may still have been applied (its intent was durable, its outcome was
    // not), but never without its intent record: find the ones that were.
    let mut c = gw.client(ADMIN).await;
    let mut applied = Vec::new();
    for a in &answers {
        if let Err((_, id)) = &a.result {
            if c.get(get(&a.path)).await.is_ok() {
                applied.push((a.path.as_str(), id.clone().expect("a request id on the error")));
            }
        }
    }
    drop((health, admin, c));
    gw.stop().await;

    let bound = Duration::from_millis(TIMEOUT_MS) + Duration::from_millis(1500);
    let slowest = answers.iter().map(|a| a.latency).max().unwrap();
    assert!(slowest <= bound, "no request hangs past the bound: slowest took {slowest:?}");
    for a in &answers {
        if let Err((code, _)) = &a.result {
            assert_eq!(*code, Code::Unavailable, "{} failed otherwise: {code:?}", a.path);
        }
    }
    let records = read_all(&log);
    assert_acknowledged_writes_recorded(&answers, &records);
    for (path, id) in applied {
        let intent = records
            .iter()
            .any(|r| r.request_id.as_deref() == Some(&id) && r.phase == Some(Phase::Intent));
        assert!(intent, "the refused put of {path} took effect without an intent record");
    }
    let outages: Vec<_> = records.iter().filter(|r| r.kind() == Kind::Outage).collect();
    assert!(!outages.is_empty(), "an outage record once the log is writable again");
    for o in outages {
        assert!(o.refused.is_some_and(|n| n > 0), "{o:?}");
        assert!(o.since.as_deref().is_some_and(|s| s.ends_with('Z')), "{o:?}");
        assert!(o.reason.as_deref().is_some_and(|r| r.contains("space")), "{o:?}");
    }
    verify_log(&log, &gw.config.audit.signing_key);
    let failure = status_while_failing.as_ref().map(|s| s.get_ref().failure.as_str());
    assert!(
        failure.is_ok_and(|f| !f.is_empty()),
        "Admin/AuditStatus reports the failure while the log is failing: {status_while_failing:?}"
    );
}

async fn health_of(h: &mut HealthClient<Channel>) -> ServingStatus {
    service_status(h, "").await
}

async fn service_status(h: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let r = h.check(HealthCheckRequest { service: service.into() }).await.unwrap();
    r.into_inner().status()
}

async fn wait_for_health(h: &mut HealthClient<Channel>, want: ServingStatus) {
    wait_for_service(h, "", want).await;
}

async fn wait_for_service(h: &mut HealthClient<Channel>, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = service_status(h, service).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "health of {service:?} is {now:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A crash mid-load loses no acknowledged record.

#[tokio::test]
async fn a_crash_mid_load_loses_no_acknowledged_record() {
    let mut gw = ServedGateway::prepare("checkpoint_every = 50\n");
    gw.serve("info").await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(gw.client(ADMIN).await);
    }
    let load = Load::start(clients);
    load.wait_for("puts acknowledged before the crash", |a| ok_count(a) >= 150).await;
    gw.kill();
    let answers = load.stop().await;
    let log = gw.dir.path().join("audit/audit.log");
    let at_crash = std::fs::read(&log).unwrap();
    // A killed process cannot tear a write() to a regular file: each batch is one write.
    // A power cut can, so leave what it would: the start of a record without its newline.
    let next_seq = read_log(&log).last().unwrap().1.seq + 1;
    let torn = format!("{{\"seq\":{next_seq},\"ts\":\"2026-");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(torn.as_bytes())
        .unwrap();

    gw.serve("info").await;
    let mut c = gw.client(ADMIN).await;
    let acked: Vec<_> = answers.iter().filter(|a| a.result.is_ok()).collect();
    for a in &acked {
        let version = a.result.as_ref().unwrap().0;
        let got = c.get(GetRequest { path: a.path.clone(), version: Some(version) }).await;
        assert_eq!(got.unwrap().into_inner().value, a.path.as_bytes(), "{} reads back", a.path);
    }
    drop(c);
    gw.terminate().await;

    // What was on disk at the crash is where the chain goes on; the torn line is gone.
    let after = std::fs::read(&log).unwrap();
    assert!(at_crash.ends_with(b"\n"), "the kill left whole lines");
    assert!(after.starts_with(&at_crash), "the restarted gateway kept the log");
    let next = Record::parse(after[at_crash.len()..].split(|b| *b == b'\n').next().unwrap());
    assert_eq!(next.map(|r| r.seq), Ok(next_seq), "the torn line was cut and its seq reused");
    let v = verify_log(&log, &gw.dir.path().join("audit.key"));
    assert_eq!(v.first_seq, 0);
    assert_acknowledged_writes_recorded(&answers, &read_all(&log));
}

// ---------------------------------------------------------------------------------------------
// A removed log file is noticed and the chain continues in a new one.

#[tokio::test]
async fn removed_log_file_is_noticed_and_the_chain_continues() {
    let mut gw = TestGateway::start_with(|c| {
        c.audit.checkpoint_interval_secs = secretgate::config::Ranged::of::<3600>()
    })
    .await;
    let log = gw.config.audit.path.clone();
    let mut c = gw.client(ADMIN).await;
    for i in 0..5 {
        c.put(put(&format!("/removed/k{i}"), b"v")).await.unwrap();
    }
    // No request is in flight and no checkpoint is due: the file is quiet while it goes.
    let before = std::fs::read(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(request_id(c.put(put(&format!("/removed/n{i}"), b"v")).await.unwrap().metadata()));
    }

    let lines = read_log(&log);
    let (_, first) = &lines[0];
    let last_before = before.strip_suffix(b"\n").unwrap().rsplit(|b| *b == b'\n').next().unwrap();
    let last_seq = Record::parse(last_before).unwrap().seq;
    assert_eq!(first.kind(), Kind::Continue, "{first:?}");
    assert!(first.reason.as_deref().is_some_and(|r| r.contains("removed")), "{first:?}");
    assert_eq!((first.seq, first.prev.as_str()), (last_seq + 1, line_hash(last_before).as_str()));
    for id in &ids {
        let outcome = lines
            .iter()
            .any(|(_, r)| r.request_id.as_deref() == Some(id) && r.phase == Some(Phase::Outcome));
        assert!(outcome, "the outcome of {id} is in the new file");
    }

    drop(c);
    gw.stop().await;
    let saved = gw.dir.path().join("saved-before-removal.log");
    std::fs::write(&saved, &before).unwrap();
    let key = VerifyingKey::load(&pub_path(&gw.config.audit.signing_key)).unwrap();
    let v = verify_files(&[log.clone(), saved], Some(&key), None)
        .unwrap_or_else(|e| panic!("the saved and the new file are one chain: {e}"));
    assert_eq!((v.first_seq, v.records), (0, v.last_seq + 1));
}

// ---------------------------------------------------------------------------------------------
// Rotation continues the chain across files.

#[tokio::test]
async fn rotation_continues_the_chain_across_files() {
    const MAX: u64 = 65536;
    let mut gw = TestGateway::start_with(|c| {
        c.audit.max_file_bytes = secretgate::config::Ranged::of::<MAX>()
    })
    .await;
    let log = gw.config.audit.path.clone();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(gw.client(ADMIN).await);
    }
    let load = Load::start(clients);
    let deadline = Instant::now() + Duration::from_secs(60);
    while log_files(&log).len() < 3 {
        assert!(Instant::now() < deadline, "the log did not rotate twice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.stop().await;
    gw.stop().await;

    let files = log_files(&log);
    let (rotated, active) = files.split_at(files.len() - 1);
    assert_eq!(active, std::slice::from_ref(&log));
    for (i, file) in rotated.iter().enumerate() {
        let name = file.file_name().unwrap().to_str().unwrap();
        let suffix = name.strip_prefix("audit.log.").unwrap();
        assert!(suffix.len() == 20 && suffix.bytes().all(|b| b.is_ascii_digit()), "{name}");
        let lines = read_log(file);
        let (first, last) = (&lines[0].1, &lines[lines.len() - 1].1);
        assert_eq!(first.seq, suffix.parse::<u64>().unwrap(), "{name} is named by its first seq");
        let want = if i == 0 { Kind::Genesis } else { Kind::Continue };
        assert_eq!(first.kind(), want, "{name}");
        assert_eq!(last.kind(), Kind::Checkpoint, "{name} ends with a checkpoint");
        assert!(std::fs::metadata(file).unwrap().len() >= MAX, "{name} rotated early");
    }
    for file in rotated.iter().skip(1).chain(active) {
        let first = &read_log(file)[0].1;
        assert_eq!(first.reason.as_deref(), Some("rotation"), "{}", file.display());
    }
    let v = verify_log(&log, &gw.config.audit.signing_key);
    let total: usize = files.iter().map(|f| read_log(f).len()).sum();
    assert_eq!((v.first_seq, v.records), (0, total as u64));
    assert_eq!(v.last_signed_seq, Some(v.last_seq), "the final checkpoint signs everything");
}
