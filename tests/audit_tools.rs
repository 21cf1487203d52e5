//! The auditor's tools as an auditor runs them: `secretgate audit verify|query|tail|keygen`
//! on signed, chained, rotated logs built with the library (no gateway needed).

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use secretgate::audit::{
    Kind, Record, SigningKey,
    record::{GENESIS_PREV, checkpoint_message, line_hash},
};

const BIN: &str = env!("CARGO_BIN_EXE_secretgate");

/// A log on disk: `audit.log` and its rotated files, the public key, the stored checkpoint.
struct Log {
    dir: tempfile::TempDir,
    key: SigningKey,
    seq: u64,
    prev: String,
    /// Lines of the active file so far.
    active: String,
    first_seq: u64,
}

impl Log {
    /// `requests` request records with a checkpoint after every 5, rotated every `per_file`
    /// lines, ending with a checkpoint that is also stored as the gateway stores it.
    fn new(requests: u64, per_file: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        key.save(&dir.path().join("audit.key")).unwrap();
        let mut log = Self {
            dir,
            key,
            seq: 0,
            prev: GENESIS_PREV.into(),
            active: String::new(),
            first_seq: 0,
        };
        let mut genesis = Record::new(Kind::Genesis);
        genesis.pubkey = Some(log.key.verifying_key().to_string());
        log.push(genesis);
        for n in 0..requests {
            if log.active.lines().count() + 2 >= per_file {
                log.push(Record::new(Kind::Checkpoint));
                let rotated = format!("audit.log.{:020}", log.first_seq);
                std::fs::write(log.path(&rotated), std::mem::take(&mut log.active)).unwrap();
                log.first_seq = log.seq;
                let mut cont = Record::new(Kind::Continue);
                cont.reason = Some("rotation".into());
                log.push(cont);
            }
            log.push(request(n));
            if (n + 1) % 5 == 0 {
                log.push(Record::new(Kind::Checkpoint));
            }
        }
        log.push(Record::new(Kind::Checkpoint));
        log.flush();
        let stored = log.active.lines().last().unwrap().to_owned();
        std::fs::write(log.path("checkpoint"), stored).unwrap();
        log
    }

    fn push(&mut self, mut r: Record) {
        (r.seq, r.prev) = (self.seq, self.prev.clone());
        r.ts = format!("2026-03-01T10:{:02}:{:02}.000Z", self.seq / 60 % 60, self.seq % 60);
        if r.kind() != Kind::Request {
            r.log_id = Some("log-test".into());
        }
        if r.kind() == Kind::Checkpoint {
            let msg = checkpoint_message("log-test", r.seq, &r.ts, &r.prev);
            r.sig = Some(self.key.sign(&msg));
        }
        let line = r.to_line();
        self.prev = line_hash(line.as_bytes());
        self.seq += 1;
        self.active.push_str(&line);
        self.active.push('\n');
    }

    /// Appends one record to the active file on disk; its seq.
    fn append(&mut self, r: Record) -> u64 {
        use std::io::Write;
        self.push(r);
        let line = self.active.lines().last().unwrap().to_owned() + "\n";
        let mut f = std::fs::OpenOptions::new().append(true).open(self.path("audit.log")).unwrap();
        f.write_all(line.as_bytes()).unwrap();
        self.seq - 1
    }

    fn flush(&self) {
        std::fs::write(self.path("audit.log"), &self.active).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every log file, newest first (the order a careless glob might give).
    fn files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string())
            .filter(|p| p.contains("audit.log"))
            .collect();
        files.sort();
        files.reverse();
        files
    }

    /// Runs `secretgate audit ARGS… FILES…` with `--pubkey` and `--checkpoint` first.
    fn verify(&self, extra: &[&str]) -> Output {
        let (pubkey, cp) = (self.path("audit.key.pub"), self.path("checkpoint"));
        let mut args = vec!["verify", "--pubkey", pubkey.to_str().unwrap()];
        args.extend(["--checkpoint", cp.to_str().unwrap()]);
        args.extend(extra);
        let files = self.files();
        args.extend(files.iter().map(String::as_str));
        audit(&args)
    }

    /// Rewrites the active file's lines with `change`.
    fn tamper(&self, change: impl FnOnce(&mut Vec<String>)) {
        let text = std::fs::read_to_string(self.path("audit.log")).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        change(&mut lines);
        std::fs::write(self.path("audit.log"), lines.join("\n") + "\n").unwrap();
    }
}

fn request(n: u64) -> Record {
    let mut r = Record::new(Kind::Request);
    r.principal = Some(["spiffe://corp/app", "spiffe://corp/admin"][n as usize % 2].into());
    r.method = Some("secretgate.v1.Secrets/Get".into());
    r.path = Some(["/app/db", "/app/db/user", "/apple", "/ops/key"][n as usize % 4].into());
    r.action = Some(secretgate::authz::Action::Read);
    let ok = n % 3 != 0;
    r.decision =
        Some(if ok { secretgate::authz::Effect::Allow } else { secretgate::authz::Effect::Deny });
    r.status = Some(if ok { "OK" } else { "PERMISSION_DENIED" }.into());
    r.version = ok.then_some(n + 1);
    r
}

fn audit(args: &[&str]) -> Output {
    Command::new(BIN).arg("audit").args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Asserts `verify` fails with exit code 1 and names `kind`; returns the report line.
fn assert_tampered(log: &Log, kind: &str) -> String {
    let out = log.verify(&[]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let line = report.lines().find(|l| l.starts_with("TAMPERED: ")).unwrap_or_default();
    assert!(line.contains(&format!("): {kind}: ")), "{report}");
    line.to_owned()
}

#[test]
fn an_untouched_log_verifies_whatever_the_file_order() {
    let log = Log::new(40, 15);
    assert!(log.files().len() >= 4, "{:?}", log.files());
    let out = log.verify(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let last = log.seq - 1;
    let report = text(&out);
    assert!(report.starts_with(&format!("OK: {} records, seq 0..{last}, ", log.seq)), "{report}");
    assert!(report.lines().next().unwrap().ends_with(&format!("signed through seq {last}")));
    let out = log.verify(&["--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["verified"]["last_signed_seq"], last);
}

#[test]
fn an_edited_line_is_named_with_its_file_and_line() {
    let log = Log::new(20, 1000);
    log.tamper(|l| l[8] = l[8].replace("\"decision\":\"deny\"", "\"decision\":\"allow\""));
    let line = assert_tampered(&log, "edited");
    assert!(line.contains("audit.log:9 (seq 8)"), "{line}");
}

#[test]
fn an_inserted_line_is_named() {
    let log = Log::new(20, 1000);
    log.tamper(|l| {
        let copy = l[3].clone();
        l.insert(10, copy);
    });
    let line = assert_tampered(&log, "inserted");
    assert!(line.contains("audit.log:11 (seq 3)"), "{line}");
}

#[test]
fn a_deleted_line_is_named() {
    let log = Log::new(20, 1000);
    log.tamper(|l| {
        l.remove(4);
    });
    let line = assert_tampered(&log, "deleted");
    assert!(line.contains("audit.log:5 (seq 5)"), "{line}");
}

#[test]
fn swapped_lines_are_reordered() {
    let log = Log::new(20, 1000);
    log.tamper(|l| l.swap(8, 9));
    let line = assert_tampered(&log, "reordered");
    assert!(line.contains("audit.log:9 (seq 9)"), "{line}");
}

#[test]
fn a_cut_log_is_truncated_with_the_stored_checkpoint() {
    let log = Log::new(20, 1000);
    log.tamper(|l| l.truncate(l.len() - 4));
    assert_tampered(&log, "truncated");
    let out = audit(&["verify", log.path("audit.log").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "without --checkpoint a clean cut is not visible");
    assert!(text(&out).contains("not covered by a signature"), "{}", text(&out));
    let log = Log::new(20, 1000);
    let mut bytes = std::fs::read(log.path("audit.log")).unwrap();
    bytes.truncate(bytes.len() - 25);
    std::fs::write(log.path("audit.log"), bytes).unwrap();
    assert_tampered(&log, "truncated");
}

#[test]
fn a_wrong_pubkey_fails_and_a_missing_file_is_exit_2() {
    let log = Log::new(10, 1000);
    let other = tempfile::tempdir().unwrap();
    SigningKey::generate().unwrap().save(&other.path().join("k")).unwrap();
    let pubkey = other.path().join("k.pub");
    let out = audit(&["verify", "--pubkey", pubkey.to_str().unwrap(), &log.files()[0]]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--pubkey"), "{}", text(&out));
    let out = audit(&["verify", log.path("nope.log").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(audit(&["verify"]).status.code(), Some(2), "no files is a usage error");
}

#[test]
fn query_filters_and_prints_a_table_or_the_lines() {
    let log = Log::new(40, 15);
    let files = log.files();
    let run = |filters: &[&str]| -> Vec<Record> {
        let mut args = vec!["query", "--output", "json"];
        args.extend(filters);
        args.extend(files.iter().map(String::as_str));
        let out = audit(&args);
        assert!(out.status.success(), "{}", text(&out));
        let lines = String::from_utf8(out.stdout).unwrap();
        lines.lines().map(|l| Record::parse(l.as_bytes()).unwrap()).collect()
    };
    let admin = run(&["--principal", "spiffe://corp/admin", "--path", "/app/db"]);
    assert!(!admin.is_empty());
    assert!(admin.iter().all(|r| r.principal.as_deref() == Some("spiffe://corp/admin")
        && r.path.as_deref().is_some_and(|p| p == "/app/db" || p.starts_with("/app/db/"))));
    let denied = run(&["--decision", "deny", "--status", "PERMISSION_DENIED"]);
    assert_eq!(denied.len(), 14, "requests 0, 3, …, 39");
    let window = run(&["--since", "2026-03-01T10:00:10Z", "--until", "2026-03-01T10:00:20Z"]);
    assert_eq!(window.iter().map(|r| r.seq).collect::<Vec<_>>(), (10..20).collect::<Vec<_>>());
    assert!(run(&["--kind", "checkpoint"]).iter().all(|r| r.kind() == Kind::Checkpoint));
    assert!(run(&["--path", "/app"]).iter().all(|r| r.path.as_deref() != Some("/apple")));
    let mut args = vec!["query", "--action", "read"];
    args.extend(files.iter().map(String::as_str));
    let table = String::from_utf8(audit(&args).stdout).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["seq", "ts", "principal", "method", "path", "action", "decision", "status", "version"]
    );
    assert!(table.lines().nth(1).unwrap().contains("spiffe://corp/app"), "{table}");
    assert_eq!(audit(&["query", "--since", "yesterday", &files[0]]).status.code(), Some(2));
}

#[test]
fn tail_prints_the_last_matching_records() {
    let log = Log::new(20, 1000);
    let file = log.path("audit.log");
    let args = ["tail", "--no-follow", "-n", "3", "--kind", "request", "-o", "json"];
    let out = audit(&[&args[..], &[file.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let seqs: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| Record::parse(l.as_bytes()).unwrap().seq)
        .collect();
    assert_eq!(seqs, [21, 22, 23]);
}

#[test]
fn tail_follows_new_records_across_rotation() {
    let mut log = Log::new(3, 1000);
    let file = log.path("audit.log");
    let mut child = Command::new(BIN)
        .args(["audit", "tail", "-n", "1", "-o", "json", "--kind", "request"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(Record::parse(line.unwrap().as_bytes()).unwrap().seq);
        }
    });
    let wait_for = |seq: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) if s == seq => return,
                Ok(_) => {}
                Err(e) => panic!("tail did not print seq {seq}: {e}"),
            }
        }
    };
    wait_for(3); // The last request already there: tail is running.
    let appended = log.append(request(100));
    wait_for(appended);
    // Rotate: the file is renamed and a new one takes its place.
    std::fs::rename(&file, log.path("audit.log.00000000000000000000")).unwrap();
    std::fs::write(&file, "").unwrap();
    let rotated = log.append(request(101));
    wait_for(rotated);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    let out = audit(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("audit.key.pub"), "{}", text(&out));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(SigningKey::load(&key).is_ok());
    let public = secretgate::audit::VerifyingKey::load(&dir.path().join("audit.key.pub")).unwrap();
    assert_eq!(public, SigningKey::load(&key).unwrap().verifying_key());
    let before = std::fs::read(&key).unwrap();
    let out = audit(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("refusing to overwrite"), "{}", text(&out));
    assert_eq!(std::fs::read(&key).unwrap(), before);
}
