//! What a gateway accepts of the audit log it finds at start: a log cut short, a deleted log
//! (until a new log is asked for) and a foreign signing key are refused; replicas sharing an
//! etcd store each keep their own log.

use secretgate_testkit as support;

use secretgate::{
    audit::{
        Kind, SigningKey,
        record::{GENESIS_PREV, line_hash},
        signing::pub_path,
        writer::FINAL_CHECKPOINT,
    },
    testing::{EmbeddedStore, Store},
};
use support::{
    TestGateway,
    audit::{delete_log, files_under, put, read_log, refused_at_start, verify_log},
    etcd::EtcdCluster,
};

const ADMIN: &str = "spiffe://test.example/admin";

// ---------------------------------------------------------------------------------------------
// A log cut short is refused at start.

#[tokio::test]
async fn a_log_cut_short_is_refused_at_start() {
    let mut gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    for i in 0..5 {
        c.put(put(&format!("/cut/k{i}"), b"v")).await.unwrap();
    }
    drop(c);
    // An untouched log starts again: the refusal below is about the cut, nothing else.
    gw.restart().await;
    gw.stop().await;

    let log = gw.config.audit.path.clone();
    let lines = read_log(&log);
    let (_, final_checkpoint) = lines.last().unwrap();
    assert_eq!(final_checkpoint.kind(), Kind::Checkpoint);
    let kept = &lines[..lines.len() - 3];
    let text: String = kept.iter().map(|(l, _)| format!("{l}\n")).collect();
    std::fs::write(&log, text).unwrap();

    let err = refused_at_start(&gw.config, "a gateway started on a log cut short").await;
    let last_kept = kept.last().unwrap().1.seq;
    assert!(err.contains("cut short"), "{err}");
    assert!(err.contains(&format!("ends at seq {last_kept} ")), "{err}");
    assert!(err.contains(&format!("checkpoint at seq {}", final_checkpoint.seq)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// A deleted log, or a foreign signing key, is refused at start.

#[tokio::test]
async fn a_deleted_log_is_refused_at_start_until_a_new_log_is_asked_for() {
    let mut gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    c.put(put("/gone/k", b"v")).await.unwrap();
    drop(c);
    gw.stop().await;
    let old = read_log(&gw.config.audit.path);
    let (old_id, old_last) = (old[0].1.log_id.clone().unwrap(), old.last().unwrap().1.seq);
    delete_log(&gw.config.audit.path);

    let err =
        refused_at_start(&gw.config, "a gateway began a new log in place of a deleted one").await;
    assert!(err.contains("no audit log here"), "{err}");
    assert!(err.contains(&format!("{old_id} (seq {old_last})")), "{err}");
    assert!(err.contains("--new-audit-log"), "{err}");
    let dir = gw.config.audit.path.parent().unwrap();
    assert!(files_under(dir).is_empty(), "the refusal wrote a log: {:?}", files_under(dir));

    // Asked for, a new log begins, and its genesis names the one left behind.
    gw.config.audit.new_log = true;
    gw.start_again().await;
    gw.stop().await;
    let new = read_log(&gw.config.audit.path);
    let genesis = &new[0].1;
    assert_eq!(genesis.kind(), Kind::Genesis);
    assert_ne!(genesis.log_id.as_deref(), Some(old_id.as_str()));
    let note = genesis.reason.as_deref().unwrap_or_default();
    assert!(note.contains(&format!("{old_id} (seq {old_last})")), "{note}");
    verify_log(&gw.config.audit.path, &gw.config.audit.signing_key);

    // The new log now continues without the setting.
    gw.config.audit.new_log = false;
    gw.start_again().await;
    gw.stop().await;
    let again = read_log(&gw.config.audit.path);
    assert_eq!(again[0].0, new[0].0, "the same log continues");
    assert!(again.len() > new.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_an_etcd_store_each_keep_their_own_log() {
    let cluster = EtcdCluster::start().await;
    let mut one = TestGateway::start_with(|c| cluster.configure(c, "/sg-replicas/", 5000)).await;
    let mut c = one.client(ADMIN).await;
    c.put(put("/replicas/k", b"v")).await.unwrap();
    drop(c);
    one.stop().await;
    // A second replica (its own log and signing key) begins its log, though the store
    // keeps the first one's checkpoint.
    let mut two = TestGateway::start_with(|c| cluster.configure(c, "/sg-replicas/", 5000)).await;
    two.stop().await;
    assert_eq!(read_log(&two.config.audit.path)[0].1.kind(), Kind::Genesis);
    // The first replica's log deleted: the store remembers it, by its key.
    delete_log(&one.config.audit.path);
    let err =
        refused_at_start(&one.config, "a replica began a new log in place of its deleted one")
            .await;
    assert!(err.contains("no audit log here"), "{err}");
    // The second replica goes on with its own.
    two.start_again().await;
    two.stop().await;
}

#[tokio::test]
async fn a_signing_key_that_is_not_the_logs_own_is_refused_at_start() {
    let mut gw = TestGateway::start().await;
    gw.stop().await;
    let before = std::fs::read(&gw.config.audit.path).unwrap();
    let other = SigningKey::generate().unwrap();
    std::fs::remove_file(&gw.config.audit.signing_key).unwrap();
    let _ = std::fs::remove_file(pub_path(&gw.config.audit.signing_key));
    other.save(&gw.config.audit.signing_key).unwrap();

    let err =
        refused_at_start(&gw.config, "a gateway signed a log's checkpoints with another key").await;
    assert!(err.contains("not this log's key"), "{err}");
    assert!(err.contains(&other.verifying_key().to_string()), "{err}");
    assert_eq!(std::fs::read(&gw.config.audit.path).unwrap(), before, "the log was written");
}

// ---------------------------------------------------------------------------------------------
// The log found at start must be the one the store attests (issue 16, finding 1).

/// A chained request record claiming that the reader read /root/key and was allowed.
fn forged_after(last: &(String, secretgate::audit::Record)) -> String {
    let mut r = secretgate::audit::Record::new(Kind::Request);
    r.principal = Some("spiffe://test.example/reader".into());
    r.method = Some("secretgate.v1.Secrets/Get".into());
    r.path = Some("/root/key".into());
    r.action = Some(secretgate::authz::Action::Read);
    r.decision = Some(secretgate::authz::Effect::Allow);
    r.status = Some("OK".into());
    (r.seq, r.ts, r.prev) = (last.1.seq + 1, last.1.ts.clone(), line_hash(last.0.as_bytes()));
    r.to_line()
}

fn append(log: &std::path::Path, line: &str) {
    let mut text = std::fs::read_to_string(log).unwrap();
    text.push_str(line);
    text.push('\n');
    std::fs::write(log, text).unwrap();
}

/// A gateway started with `f`, given `puts` writes, then stopped cleanly.
async fn stopped_after(puts: usize, f: impl FnOnce(&mut secretgate::Config)) -> TestGateway {
    let mut gw = TestGateway::start_with(f).await;
    let mut c = gw.client(ADMIN).await;
    for i in 0..puts {
        c.put(put(&format!("/start/k{i}"), b"v")).await.unwrap();
    }
    drop(c);
    gw.stop().await;
    gw
}

/// Replaces the log file with `lines`.
fn write_lines(log: &std::path::Path, lines: &[(String, secretgate::audit::Record)]) {
    let text: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
    std::fs::write(log, text).unwrap();
}

#[tokio::test]
async fn a_forged_record_after_a_clean_stop_is_refused_at_start() {
    let gw = stopped_after(1, |_| {}).await;
    let log = gw.config.audit.path.clone();
    let lines = read_log(&log);
    let last = lines.last().unwrap();
    assert_eq!(last.1.reason.as_deref(), Some(FINAL_CHECKPOINT), "a clean stop ends the log");
    append(&log, &forged_after(last));

    let err = refused_at_start(&gw.config, "a gateway signed a record forged while stopped").await;
    assert!(err.contains("1 records follow the final checkpoint of the last clean stop"), "{err}");
    assert!(err.contains(&format!("(seq {})", last.1.seq)), "{err}");
}

#[tokio::test]
async fn a_forged_log_with_a_new_id_is_refused_at_start() {
    let gw = stopped_after(1, |_| {}).await;
    let log = gw.config.audit.path.clone();
    let real_id = read_log(&log)[0].1.log_id.clone().unwrap();
    delete_log(&log);
    // A genesis that names the right public key (audit.key.pub is not secret).
    let pubkey = std::fs::read_to_string(pub_path(&gw.config.audit.signing_key)).unwrap();
    let mut genesis = secretgate::audit::Record::new(Kind::Genesis);
    genesis.log_id = Some("feedfacefeedface".into());
    genesis.pubkey = Some(pubkey.lines().rfind(|l| !l.starts_with('#')).unwrap().trim().into());
    (genesis.ts, genesis.prev) = ("2026-12-01T00:00:00.000Z".into(), GENESIS_PREV.into());
    std::fs::write(&log, format!("{}\n", genesis.to_line())).unwrap();

    let err = refused_at_start(&gw.config, "a gateway continued a forged log").await;
    assert!(err.contains("(log id feedfacefeedface) is not one the store knows"), "{err}");
    assert!(err.contains(&real_id), "{err}");
}

#[tokio::test]
async fn a_log_cut_before_the_stored_checkpoint_and_padded_is_refused_at_start() {
    let gw = stopped_after(5, |_| {}).await;
    let log = gw.config.audit.path.clone();
    let lines = read_log(&log);
    let stored_seq = lines.last().unwrap().1.seq;
    // Cut the last records with the stored checkpoint, then pad past it with a high seq.
    let kept = &lines[..lines.len() - 3];
    write_lines(&log, kept);
    let mut pad = kept.last().unwrap().clone();
    pad.1.seq = stored_seq + 1000;
    append(&log, &forged_after(&pad));

    let err = refused_at_start(&gw.config, "a gateway started on a cut and padded log").await;
    assert!(err.contains(&format!("(seq {stored_seq}) is not in the log")), "{err}");
}

#[tokio::test]
async fn records_after_a_crash_are_marked_unattested() {
    let mut gw = stopped_after(7, |c| {
        c.audit.checkpoint_every = secretgate::config::Ranged::of::<4>();
    })
    .await;
    // What a crash leaves: no final checkpoint in the log, and in the store an earlier one.
    let log = gw.config.audit.path.clone();
    let mut lines = read_log(&log);
    lines.pop();
    let last_cp = lines.iter().rposition(|(_, r)| r.kind() == Kind::Checkpoint).unwrap();
    let (cp_line, cp) = lines[last_cp].clone();
    assert!(last_cp + 2 < lines.len(), "records follow the last periodic checkpoint");
    write_lines(&log, &lines);
    {
        let store = EmbeddedStore::open(gw.store_path(), 10).unwrap();
        let log_id = cp.log_id.clone().unwrap();
        store.put_audit_checkpoint(&log_id, cp_line.as_bytes()).await.unwrap();
    }

    gw.start_again().await;
    gw.stop().await;
    let after = read_log(&log);
    let resume = after.iter().find(|(_, r)| r.kind() == Kind::Resume).map(|(_, r)| r.clone());
    let resume = resume.expect("a resume record names the unattested records");
    let last_before = lines.last().unwrap().1.seq;
    assert_eq!(
        (resume.unattested_from, resume.unattested_to),
        (Some(cp.seq + 1), Some(last_before))
    );
    let verified = verify_log(&log, &gw.config.audit.signing_key);
    let note = format!("records seq {}..{last_before} were written after", cp.seq + 1);
    assert!(verified.notes.iter().any(|n| n.contains(&note)), "{:?}", verified.notes);
}
