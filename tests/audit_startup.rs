//! What a gateway accepts of the audit log it finds at start: a log cut short, a deleted log
//! (until a new log is asked for) and a foreign signing key are refused; replicas sharing an
//! etcd store each keep their own log.

use secretgate_testkit as support;

use secretgate::audit::{Kind, SigningKey, signing::pub_path};
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
    assert!(err.contains("audit.new_log"), "{err}");
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
