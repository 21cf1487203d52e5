//! Tampering with a real audit log, five ways (an edited byte, an inserted copy, a deleted
//! line, two swapped lines, a cut before the stored checkpoint), is caught by the library and
//! by `secretgate audit verify`.

use secretgate_testkit as support;

use std::{
    path::Path,
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use secretgate::{
    audit::{
        Kind, Record, VerifyingKey,
        signing::pub_path,
        verify::{Problem, Tamper, verify_files},
    },
    proto::v1::AuditStatusRequest,
};
use support::{
    TestGateway,
    audit::{find, get, put},
};

const ADMIN: &str = "spiffe://test.example/admin";
const BIN: &str = env!("CARGO_BIN_EXE_secretgate");

// ---------------------------------------------------------------------------------------------
// Tampering with a real log, five ways, is caught by the library and by the CLI.

#[test]
fn an_untouched_log_verifies() {
    let p = pristine();
    let dir = p.write(&p.lines());
    let v = verify_files(&[dir.path().join("audit.log")], Some(&p.key()), Some(&p.checkpoint))
        .unwrap_or_else(|e| panic!("the untouched log must verify: {e}"));
    let last = p.lines().len() as u64 - 1;
    assert_eq!((v.records, v.first_seq, v.last_seq), (last + 1, 0, last));
    assert_eq!(v.last_signed_seq, Some(last), "the final checkpoint signs everything");
    assert!(v.checkpoints >= 3, "checkpoints every 5 records: {v:?}");
    let out = verify_cli(dir.path(), true);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).starts_with("OK"), "{}", output_text(&out));
}

#[test]
fn an_edited_byte_in_a_middle_record_is_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    let line = &mut lines[at];
    let pos = find(line, b"\"path\":\"/tamper/k").unwrap() + "\"path\":\"/tamper/k".len();
    line[pos] = if line[pos] == b'1' { b'0' } else { b'1' };
    p.assert_caught(&lines, false, Tamper::Edited, at + 1);
}

#[test]
fn an_inserted_copy_of_a_line_is_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    let copy = lines[at - 6].clone();
    lines.insert(at + 1, copy);
    p.assert_caught(&lines, false, Tamper::Inserted, at + 2);
}

#[test]
fn a_deleted_line_is_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    lines.remove(at);
    p.assert_caught(&lines, false, Tamper::Deleted, at + 1);
}

#[test]
fn two_swapped_lines_are_caught() {
    let p = pristine();
    let mut lines = p.lines();
    let at = p.middle();
    lines.swap(at, at + 1);
    p.assert_caught(&lines, false, Tamper::Reordered, at + 1);
}

#[test]
fn a_log_cut_before_the_stored_checkpoint_is_caught() {
    let p = pristine();
    let stored = Record::parse(&p.checkpoint).unwrap();
    assert_eq!(stored.kind(), Kind::Checkpoint);
    // Cut the stored checkpoint and the record before it, and everything after.
    let mut lines = p.lines();
    let keep = stored.seq as usize - 1;
    assert!(keep + 4 < lines.len(), "records follow the stored checkpoint");
    lines.truncate(keep);
    // The chain alone cannot see a clean cut at the end: the stored checkpoint does.
    let dir = p.write(&lines);
    let chain_only = verify_files(&[dir.path().join("audit.log")], Some(&p.key()), None);
    assert!(chain_only.is_ok(), "without the stored checkpoint: {chain_only:?}");
    p.assert_caught(&lines, true, Tamper::Truncated, keep + 1);
}

/// A log a real gateway wrote (a checkpoint every 5 records), its public key, and the
/// checkpoint the gateway had stored, as `Admin/AuditStatus` reported it.
struct Pristine {
    log: Vec<u8>,
    pubkey: Vec<u8>,
    checkpoint: Vec<u8>,
}

/// Written once, by a gateway in its own runtime, and tampered with by each test in a copy.
fn pristine() -> &'static Pristine {
    static PRISTINE: OnceLock<Pristine> = OnceLock::new();
    PRISTINE.get_or_init(|| tokio::runtime::Runtime::new().unwrap().block_on(write_pristine()))
}

async fn write_pristine() -> Pristine {
    let mut gw = TestGateway::start_with(|c| {
        c.audit.checkpoint_every = secretgate::config::Ranged::of::<5>()
    })
    .await;
    let mut c = gw.client(ADMIN).await;
    for i in 0..12 {
        let path = format!("/tamper/k{i:02}");
        c.put(put(&path, b"value")).await.unwrap();
        c.get(get(&path)).await.unwrap();
    }
    let mut admin = gw.admin(ADMIN).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let checkpoint = loop {
        let status = admin.audit_status(AuditStatusRequest {}).await.unwrap().into_inner();
        if !status.checkpoint.is_empty() {
            break status.checkpoint;
        }
        assert!(Instant::now() < deadline, "no checkpoint stored: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for i in 0..6 {
        c.get(get(&format!("/tamper/k{i:02}"))).await.unwrap();
    }
    drop((c, admin));
    gw.stop().await;
    Pristine {
        log: std::fs::read(&gw.config.audit.path).unwrap(),
        pubkey: std::fs::read(pub_path(&gw.config.audit.signing_key)).unwrap(),
        checkpoint: checkpoint.into_bytes(),
    }
}

impl Pristine {
    fn lines(&self) -> Vec<Vec<u8>> {
        let body = self.log.strip_suffix(b"\n").expect("the log ends with a whole line");
        body.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn key(&self) -> VerifyingKey {
        VerifyingKey::parse(
            std::str::from_utf8(&self.pubkey)
                .unwrap()
                .lines()
                .find(|l| !l.starts_with('#'))
                .unwrap(),
        )
        .unwrap()
    }

    /// Index of a request record with a path in the middle of the log.
    fn middle(&self) -> usize {
        let lines = self.lines();
        (lines.len() / 2..lines.len() - 2)
            .find(|i| {
                let r = Record::parse(&lines[*i]).unwrap();
                r.kind() == Kind::Request
                    && r.path.as_deref().is_some_and(|p| p.starts_with("/tamper/k"))
            })
            .expect("a request record in the middle")
    }

    /// Writes `lines` as `audit.log`, with the public key and the stored checkpoint, into a
    /// new directory.
    fn write(&self, lines: &[Vec<u8>]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut log = lines.join(&b'\n');
        log.push(b'\n');
        std::fs::write(dir.path().join("audit.log"), log).unwrap();
        std::fs::write(dir.path().join("audit.key.pub"), &self.pubkey).unwrap();
        std::fs::write(dir.path().join("checkpoint"), &self.checkpoint).unwrap();
        dir
    }

    /// Both `verify_files` and `secretgate audit verify` report `kind` at `line`.
    fn assert_caught(&self, lines: &[Vec<u8>], with_checkpoint: bool, kind: Tamper, line: usize) {
        let dir = self.write(lines);
        let log = dir.path().join("audit.log");
        let checkpoint = with_checkpoint.then_some(self.checkpoint.as_slice());
        match verify_files(std::slice::from_ref(&log), Some(&self.key()), checkpoint) {
            Err(Problem::Tampered(t)) => {
                assert_eq!((t.kind, t.line), (kind, line), "{t}");
                assert_eq!(t.file, log.display().to_string());
            }
            other => panic!("{kind} not caught: {other:?}"),
        }
        let out = verify_cli(dir.path(), with_checkpoint);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "exit code 1 for tampering: {text}");
        assert!(text.contains(&format!("audit.log:{line} ")), "names the line: {text}");
        assert!(text.contains(&format!(": {kind}: ")), "names the kind {kind}: {text}");
    }
}

/// Runs `secretgate audit verify --pubkey … [--checkpoint …] audit.log` in `dir`.
fn verify_cli(dir: &Path, with_checkpoint: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["audit", "verify", "--pubkey"]).arg(dir.join("audit.key.pub"));
    if with_checkpoint {
        cmd.arg("--checkpoint").arg(dir.join("checkpoint"));
    }
    cmd.arg(dir.join("audit.log")).env_remove("SECRETGATE_OUTPUT").output().unwrap()
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
