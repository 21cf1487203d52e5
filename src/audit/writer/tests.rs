use super::{
    resume::{Tail, check_start},
    *,
};
use crate::{audit::VerifyingKey, config::Ranged};

fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        path: dir.join("audit/audit.log"),
        checkpoint_every: Ranged::of::<10>(),
        ..AuditConfig::default()
    }
}

fn open(
    config: &AuditConfig,
) -> (AuditLog, VerifyingKey, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
    // The log's own key, kept beside its directory, so that a reopened log is signed by
    // it again.
    let path = config.path.parent().unwrap().with_extension("key");
    let key = match SigningKey::load(&path) {
        Ok(key) => key,
        Err(_) => {
            let key = SigningKey::generate().unwrap();
            key.save(&path).unwrap();
            key
        }
    };
    let public = key.verifying_key();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (AuditLog::open(config, key, tx, &[]).unwrap(), public, rx)
}

fn request(n: usize) -> Record {
    let mut r = Record::new(Kind::Request);
    r.path = Some(format!("/r/{n}"));
    r
}

/// Every line's `prev` is the hash of the line before; seqs count up by one.
fn assert_chained(lines: &[&str], first_prev: &str) -> Vec<Record> {
    let mut prev = first_prev.to_owned();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let r = Record::parse(line.as_bytes()).unwrap();
        assert_eq!(r.prev, prev, "line {i}");
        if let Some(before) = out.last() {
            let before: &Record = before;
            assert_eq!(r.seq, before.seq + 1, "line {i}");
        }
        prev = line_hash(line.as_bytes());
        out.push(r);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_chained_durable_and_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (log, public, mut checkpoints) = open(&config);
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let log = log.clone();
            tokio::spawn(async move { log.append(request(n)).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    // Durable when append returns: the file already holds every record.
    let text = std::fs::read_to_string(&config.path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let records = assert_chained(&lines, GENESIS_PREV);
    assert_eq!(records[0].kind(), Kind::Genesis);
    assert_eq!(records[0].pubkey.as_deref(), Some(public.to_string().as_str()));
    for seq in &seqs {
        assert_eq!(records[*seq as usize].kind(), Kind::Request);
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    let cps: Vec<&Record> = records.iter().filter(|r| r.kind() == Kind::Checkpoint).collect();
    // One checkpoint ends each batch in which 10 more records arrived (a batch is
    // written and synced as a whole).
    assert!(!cps.is_empty());
    let log_id = log.log_id().unwrap().to_owned();
    for cp in &cps {
        let msg = checkpoint_message(&log_id, cp.seq, &cp.ts, &cp.prev);
        assert!(public.verify(&msg, cp.sig.as_deref().unwrap()), "checkpoint {}", cp.seq);
    }
    let (id, sent) = checkpoints.recv().await.unwrap();
    assert_eq!(id, log_id);
    assert!(lines.contains(&sent.as_str()), "the stored checkpoint is a line of the log");
    let last = log.close().await.unwrap();
    assert_eq!(std::fs::read_to_string(&config.path).unwrap().lines().last(), Some(last.as_str()));
}

#[tokio::test]
async fn reopening_cuts_a_torn_line_and_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (log, _, _rx) = open(&config);
    for n in 0..3 {
        log.append(request(n)).await.unwrap();
    }
    log.close().await.unwrap();
    let before = std::fs::read_to_string(&config.path).unwrap();
    // A crash mid-write leaves part of a line that was never acknowledged.
    std::fs::write(&config.path, format!("{before}{{\"seq\":99,\"ts\":\"2026")).unwrap();
    let (log, _, _rx) = open(&config);
    assert_eq!(log.next_seq_at_open(), before.lines().count() as u64);
    let seq = log.append(request(9)).await.unwrap();
    assert_eq!(seq, before.lines().count() as u64);
    log.close().await.unwrap();
    let text = std::fs::read_to_string(&config.path).unwrap();
    assert!(text.starts_with(&before) && text.ends_with('\n'));
    assert_chained(&text.lines().collect::<Vec<_>>(), GENESIS_PREV);
}

#[tokio::test]
async fn rotation_and_a_removed_file_continue_the_chain_in_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = AuditConfig { max_file_bytes: Ranged::unchecked(4000), ..config(dir.path()) };
    let (log, _, _rx) = open(&config);
    for n in 0..60 {
        log.append(request(n)).await.unwrap();
    }
    let saved = std::fs::read_to_string(&config.path).unwrap();
    std::fs::remove_file(&config.path).unwrap();
    log.append(request(60)).await.unwrap();
    log.close().await.unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(config.path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &config.path)
        .collect();
    files.sort();
    assert!(files.len() >= 2, "rotated at 4000 bytes: {files:?}");
    let mut all = String::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let first = Record::parse(text.lines().next().unwrap().as_bytes()).unwrap();
        assert!(f.to_string_lossy().ends_with(&format!(".{:020}", first.seq)), "{f:?}");
        let last = Record::parse(text.lines().last().unwrap().as_bytes()).unwrap();
        assert_eq!(last.kind(), Kind::Checkpoint, "a rotated file ends with a checkpoint");
        all.push_str(&text);
    }
    let new = std::fs::read_to_string(&config.path).unwrap();
    let first = Record::parse(new.lines().next().unwrap().as_bytes()).unwrap();
    assert_eq!(first.kind(), Kind::Continue);
    assert!(first.reason.as_deref().unwrap().contains("removed"), "{first:?}");
    all.push_str(&saved);
    all.push_str(&new);
    let records = assert_chained(&all.lines().collect::<Vec<_>>(), GENESIS_PREV);
    assert_eq!(records.iter().filter(|r| r.kind() == Kind::Request).count(), 61);
}

fn windowed(dir: &Path) -> AuditConfig {
    AuditConfig { group_commit_us: Ranged::of::<100_000>(), ..config(dir) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_is_not_held_for_the_group_commit_window() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _, _rx) = open(&windowed(dir.path()));
    let before = log.stats();
    let started = Instant::now();
    for n in 0..5 {
        let _request = log.begin();
        log.append(request(n)).await.unwrap();
    }
    // Five windows would take 500 ms; each record went out on its own at once.
    assert!(started.elapsed() < Duration::from_millis(250), "{:?}", started.elapsed());
    let after = log.stats();
    assert_eq!(after.syncs - before.syncs, 5);
    assert_eq!(after.records - before.records, 5);
    // The time the five writes and syncs took is counted, and no more than the whole.
    let synced = Duration::from_micros(after.sync_micros - before.sync_micros);
    assert!(synced > Duration::ZERO && synced <= started.elapsed(), "{synced:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_progress_holds_the_batch_until_its_outcome_comes() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _, _rx) = open(&windowed(dir.path()));
    let before = log.stats();
    let writing = log.writing();
    let started = Instant::now();
    let held = {
        let log = log.clone();
        tokio::spawn(async move { (log.append(request(0)).await.unwrap(), started.elapsed()) })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let outcome = log.append_outcome(request(1), writing).await.unwrap();
    let (seq, waited) = held.await.unwrap();
    // One sync covered both: the first record waited for the write's outcome, and no
    // longer (the window is 100 ms).
    assert_eq!(outcome, seq + 1);
    assert_eq!(log.stats().syncs - before.syncs, 1);
    assert!(waited >= Duration::from_millis(15), "{waited:?}");
    assert!(waited < Duration::from_millis(90), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_never_ends_holds_records_for_one_window_only() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _, _rx) = open(&windowed(dir.path()));
    let _writing = log.writing();
    for n in 0..2 {
        let started = Instant::now();
        log.append(request(n)).await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(90), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
    }
}

#[tokio::test]
async fn a_disabled_log_accepts_everything_and_names_no_log() {
    let log = AuditLog::disabled();
    assert_eq!(log.append(request(0)).await.unwrap(), 0);
    assert!(log.log_id().is_none() && log.failure().is_none() && log.close().await.is_none());
}

/// A checkpoint line of log `log_id` at `seq`, signed by `key`.
fn checkpoint_line(key: &SigningKey, log_id: &str, seq: u64) -> Vec<u8> {
    let mut r = Record::new(Kind::Checkpoint);
    (r.seq, r.ts, r.prev) = (seq, crate::clock::now_rfc3339_millis(), line_hash(b"x"));
    r.log_id = Some(log_id.into());
    r.sig = Some(key.sign(&checkpoint_message(log_id, seq, &r.ts, &r.prev)));
    r.to_line().into_bytes()
}

fn tail(log_id: &str, next_seq: u64, genesis: Option<&SigningKey>) -> Tail {
    Tail {
        head: Head { next_seq, prev: line_hash(b"y") },
        log_id: log_id.into(),
        first_seq: 0,
        in_active: true,
        genesis_pubkey: genesis.map(|k| k.verifying_key().to_string()),
    }
}

#[test]
fn a_log_is_checked_against_the_stored_checkpoints_before_it_is_continued() {
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let stored = vec![("log-1".to_owned(), checkpoint_line(&key, "log-1", 40))];
    // Its own key, a checkpoint behind the end: continues.
    assert_eq!(check_start(Some(&tail("log-1", 50, Some(&key))), &stored, &key, false), Ok(None));
    assert_eq!(check_start(Some(&tail("log-1", 41, None)), &stored, &key, false), Ok(None));
    // None stored at all, or only other keys' (another replica's log): continues.
    assert_eq!(check_start(Some(&tail("log-1", 3, None)), &[], &key, false), Ok(None));
    let replica = vec![("log-9".to_owned(), checkpoint_line(&other, "log-9", 7))];
    assert_eq!(check_start(Some(&tail("log-2", 3, None)), &replica, &key, false), Ok(None));
    // A log the store has never seen while it keeps this key's checkpoints: replaced (issue
    // 16; this used to continue).
    let e = check_start(Some(&tail("log-2", 3, None)), &stored, &key, false).unwrap_err();
    assert!(e.contains("(log id log-2) is not one the store knows") && e.contains("log-1"), "{e}");
    assert_eq!(check_start(None, &[], &key, false), Ok(None));

    let refused = |found: Option<&Tail>, stored: &[(String, Vec<u8>)], key, new_log| {
        check_start(found, stored, key, new_log).expect_err("refused")
    };
    // Ends at or before the stored checkpoint.
    let e = refused(Some(&tail("log-1", 40, None)), &stored, &key, false);
    assert!(e.contains("ends at seq 39 ") && e.contains("checkpoint at seq 40"), "{e}");
    // The genesis names another key (whatever the store holds).
    let e = refused(Some(&tail("log-1", 50, Some(&key))), &[], &other, false);
    assert!(e.contains("not this log's key"), "{e}");
    // No genesis in the active file (rotated): the stored checkpoint's signature tells.
    let e = refused(Some(&tail("log-1", 50, None)), &stored, &other, false);
    assert!(e.contains("not signed by audit.signing_key"), "{e}");
    // A stored line that is not a checkpoint is no proof either.
    let mut req = Record::new(Kind::Request);
    (req.seq, req.log_id) = (40, Some("log-1".into()));
    let fake = vec![("log-1".to_owned(), req.to_line().into_bytes())];
    let e = refused(Some(&tail("log-1", 50, None)), &fake, &key, false);
    assert!(e.contains("not signed"), "{e}");
    // An unreadable stored checkpoint of this log is refused, not taken as seq 0.
    let broken = vec![("log-1".to_owned(), b"{\"seq\":".to_vec())];
    let e = refused(Some(&tail("log-1", 50, None)), &broken, &key, false);
    assert!(e.contains("cannot be read") && e.contains("log-1"), "{e}");
    // No log, but the store keeps a checkpoint this key signed: refused unless a new log
    // is asked for.
    let e = refused(None, &stored, &key, false);
    assert!(e.contains("no audit log here") && e.contains("log-1 (seq 40)"), "{e}");
    let note = check_start(None, &stored, &key, true).unwrap().unwrap();
    assert!(note.contains("log-1 (seq 40)"), "{note}");
    // Other replicas' logs (other keys), and lines that prove nothing, do not stop a new
    // replica's first start.
    let others = [stored.clone(), broken, fake].concat();
    assert_eq!(check_start(None, &others, &other, false), Ok(None));
}
