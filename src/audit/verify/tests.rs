use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::{
    audit::SigningKey,
    authz::{Action, Effect},
};

type Files = Vec<(String, Vec<u8>)>;

/// A valid log of `requests` request records: genesis, a checkpoint after every `every`
/// requests, rotation before a file would pass `per_file` lines (a checkpoint ends the
/// old file, a continue record starts the new one), and a final checkpoint. The files
/// are named as the writer names them, oldest first.
pub(crate) fn test_log(requests: u64, every: u64, per_file: usize) -> (SigningKey, Files) {
    let key = SigningKey::generate().unwrap();
    let mut w =
        Writer { key: &key, seq: 0, prev: GENESIS_PREV.into(), files: vec![(0, String::new())] };
    let mut genesis = Record::new(Kind::Genesis);
    genesis.pubkey = Some(key.verifying_key().to_string());
    w.push(genesis);
    for n in 0..requests {
        if w.files.last().unwrap().1.lines().count() + 2 >= per_file {
            w.push(Record::new(Kind::Checkpoint));
            w.files.push((w.seq, String::new()));
            let mut cont = Record::new(Kind::Continue);
            cont.reason = Some("rotation".into());
            w.push(cont);
        }
        let mut r = Record::new(Kind::Request);
        r.principal = Some(format!("spiffe://test/{}", ["app", "admin"][n as usize % 2]));
        r.method = Some("secretgate.v1.Secrets/Get".into());
        r.path = Some(["/app/db", "/app/db/user", "/apple", "/ops/k"][n as usize % 4].into());
        r.action = Some([Action::Read, Action::Write, Action::Read][n as usize % 3]);
        let ok = n % 5 != 0;
        r.decision = Some(if ok { Effect::Allow } else { Effect::Deny });
        r.status = Some(if ok { "OK" } else { "PERMISSION_DENIED" }.into());
        r.version = ok.then_some(n);
        w.push(r);
        if (n + 1) % every == 0 {
            w.push(Record::new(Kind::Checkpoint));
        }
    }
    w.push(Record::new(Kind::Checkpoint));
    let last = w.files.len() - 1;
    let files = w.files.into_iter().enumerate();
    let files = files.map(|(i, (first, text))| {
        let name = if i == last { "audit.log".into() } else { format!("audit.log.{first:020}") };
        (name, text.into_bytes())
    });
    (key, files.collect())
}

/// Writes `files` into `dir`; their paths.
pub(crate) fn log_files(dir: &Path, files: &Files) -> Vec<PathBuf> {
    let write = |(name, bytes): &(String, Vec<u8>)| {
        std::fs::write(dir.join(name), bytes).unwrap();
        dir.join(name)
    };
    files.iter().map(write).collect()
}

struct Writer<'a> {
    key: &'a SigningKey,
    seq: u64,
    prev: String,
    files: Vec<(u64, String)>,
}

impl Writer<'_> {
    fn push(&mut self, mut r: Record) {
        (r.seq, r.prev) = (self.seq, self.prev.clone());
        r.ts = format!("2026-01-01T00:{:02}:{:02}.000Z", self.seq / 60 % 60, self.seq % 60);
        if r.kind() != Kind::Request {
            r.log_id = Some("log-1".into());
        }
        if r.kind() == Kind::Checkpoint {
            r.sig = Some(self.key.sign(&checkpoint_message("log-1", r.seq, &r.ts, &r.prev)));
        }
        let line = r.to_line();
        self.prev = line_hash(line.as_bytes());
        self.seq += 1;
        let file = &mut self.files.last_mut().unwrap().1;
        file.push_str(&line);
        file.push('\n');
    }
}

/// One file's lines, with their newlines.
fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

fn single(requests: u64) -> (SigningKey, Vec<Vec<u8>>) {
    let (key, files) = test_log(requests, 5, usize::MAX);
    (key, lines(&files[0].1))
}

fn run(lines: &[Vec<u8>], key: &SigningKey, stored: Option<&[u8]>) -> Result<Verified, Problem> {
    verify_bytes(&[("audit.log".into(), lines.concat())], Some(&key.verifying_key()), stored)
}

fn tampered(result: Result<Verified, Problem>) -> Tampering {
    match result {
        Err(Problem::Tampered(t)) => t,
        other => panic!("not tampered: {other:?}"),
    }
}

fn edit(line: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(line.to_vec()).unwrap();
    assert!(text.contains(from), "{text}");
    text.replacen(from, to, 1).into_bytes()
}

#[test]
fn an_untouched_log_verifies_in_any_file_order() {
    let (key, mut files) = test_log(60, 7, 20);
    assert!(files.len() >= 4);
    files.reverse();
    let v = verify_bytes(&files, Some(&key.verifying_key()), None).unwrap();
    assert_eq!((v.first_seq, v.last_seq, v.last_signed_seq), (0, v.records - 1, Some(v.last_seq)));
    assert!(v.records > 60 + files.len() as u64 * 2 && v.checkpoints >= 8 + 4, "{v:?}");
    assert!(v.notes.is_empty(), "{:?}", v.notes);
    let v = verify_bytes(&files, None, None).unwrap();
    assert!(v.notes.iter().any(|n| n.contains("consistent, not authentic")), "{:?}", v.notes);
}

#[test]
fn an_edited_line_is_reported_itself() {
    let (key, mut l) = single(20);
    l[4] = edit(&l[4], "spiffe://test/", "spiffe://evil/");
    let t = tampered(run(&l, &key, None));
    assert_eq!((t.line, t.seq, t.kind), (5, 4, Tamper::Edited), "{t}");
    l[4] = b"{\"seq\":4, broken\n".to_vec();
    let t = tampered(run(&l, &key, None));
    assert_eq!((t.line, t.kind), (5, Tamper::Edited), "{t}");
}

#[test]
fn an_edited_seq_or_prev_is_reported_on_its_line() {
    let (key, l) = single(20);
    let mut seq = l.clone();
    seq[6] = edit(&l[6], "\"seq\":6,", "\"seq\":9,");
    assert_eq!(tampered(run(&seq, &key, None)).line, 7);
    let mut prev = l.clone();
    prev[6] = edit(&l[6], "\"prev\":\"", "\"prev\":\"0");
    let t = tampered(run(&prev, &key, None));
    assert_eq!((t.line, t.kind), (7, Tamper::Edited), "{t}");
}

#[test]
fn a_checkpoint_with_a_bad_signature_is_edited() {
    let (key, l) = single(20);
    let last = l.len() - 1;
    let mut bad = l.clone();
    bad[last] = edit(&l[last], "2026-01-01T00:00:", "2026-01-01T00:01:");
    let t = tampered(run(&bad, &key, None));
    assert_eq!((t.line, t.kind), (last + 1, Tamper::Edited), "{t}");
    assert!(t.detail.contains("signature"), "{t}");
}

#[test]
fn a_rewritten_chain_fails_at_the_next_checkpoint() {
    let (key, l) = single(20);
    let mut records: Vec<Record> =
        l.iter().map(|b| Record::parse(b.trim_ascii_end()).unwrap()).collect();
    records[3].principal = Some("spiffe://test/someone-else".into());
    let mut prev = GENESIS_PREV.to_owned();
    let rewritten: Vec<Vec<u8>> = records
        .iter_mut()
        .map(|r| {
            r.prev = prev.clone();
            prev = line_hash(r.to_line().as_bytes());
            format!("{}\n", r.to_line()).into_bytes()
        })
        .collect();
    let t = tampered(run(&rewritten, &key, None));
    let first_checkpoint = records.iter().position(|r| r.kind() == Kind::Checkpoint).unwrap();
    assert_eq!((t.line, t.kind), (first_checkpoint + 1, Tamper::Edited), "{t}");
}

#[test]
fn a_log_rewritten_under_a_new_key_fails_only_with_pubkey() {
    let (key, files) = test_log(10, 3, usize::MAX);
    let (_, other) = test_log(10, 3, usize::MAX);
    assert!(verify_bytes(&other, None, None).is_ok());
    let t = tampered(verify_bytes(&other, Some(&key.verifying_key()), None));
    assert_eq!((t.line, t.seq, t.kind), (1, 0, Tamper::Edited), "{t}");
    assert!(t.detail.contains("--pubkey"), "{t}");
    assert!(verify_bytes(&files, Some(&key.verifying_key()), None).is_ok());
}

#[test]
fn inserted_lines_are_named() {
    let (key, l) = single(20);
    let mut dup = l.clone();
    dup.insert(9, l[4].clone());
    let t = tampered(run(&dup, &key, None));
    assert_eq!((t.line, t.seq, t.kind), (10, 4, Tamper::Inserted), "{t}");
    let mut right_after = l.clone();
    right_after.insert(5, l[4].clone());
    let t = tampered(run(&right_after, &key, None));
    assert_eq!((t.line, t.kind), (6, Tamper::Inserted), "{t}");
    // A forged record that links from the line before it and takes over its seq.
    let mut forged = Record::parse(l[5].trim_ascii_end()).unwrap();
    forged.principal = Some("spiffe://test/ghost".into());
    let mut ins = l.clone();
    ins.insert(5, format!("{}\n", forged.to_line()).into_bytes());
    let t = tampered(run(&ins, &key, None));
    assert_eq!((t.line, t.seq, t.kind), (6, 5, Tamper::Inserted), "{t}");
    let mut junk = l.clone();
    junk.insert(3, b"hello\n".to_vec());
    assert_eq!(tampered(run(&junk, &key, None)).kind, Tamper::Inserted);
    forged.seq = 999;
    let mut far = l.clone();
    far.insert(7, format!("{}\n", forged.to_line()).into_bytes());
    let t = tampered(run(&far, &key, None));
    assert_eq!((t.line, t.kind), (8, Tamper::Inserted), "{t}");
}

#[test]
fn deleted_lines_are_a_gap() {
    let (key, l) = single(20);
    let mut del = l.clone();
    del.drain(6..8);
    let t = tampered(run(&del, &key, None));
    assert_eq!((t.line, t.seq, t.kind), (7, 8, Tamper::Deleted), "{t}");
    assert!(t.detail.contains("6..7"), "{t}");
    let t = tampered(run(&l[1..], &key, None));
    assert_eq!((t.line, t.kind), (1, Tamper::Deleted), "{t}");
    let (key, files) = test_log(60, 7, 20);
    let mut gap = files.clone();
    gap.remove(1);
    let t = tampered(verify_bytes(&gap, Some(&key.verifying_key()), None));
    assert_eq!((t.file.as_str(), t.line, t.kind), (gap[1].0.as_str(), 1, Tamper::Deleted), "{t}");
}

#[test]
fn swapped_or_moved_lines_are_reordered() {
    let (key, l) = single(20);
    for (a, b) in [(5, 6), (0, 1), (4, 12), (l.len() - 2, l.len() - 1)] {
        let mut swap = l.clone();
        swap.swap(a, b);
        let t = tampered(run(&swap, &key, None));
        assert_eq!((t.line, t.kind), (a + 1, Tamper::Reordered), "swap {a} {b}: {t}");
    }
    let mut moved = l.clone();
    let line = moved.remove(3);
    moved.push(line);
    let t = tampered(run(&moved, &key, None));
    assert_eq!((t.line, t.kind), (4, Tamper::Reordered), "{t}");
    let mut moved = l.clone();
    let line = moved.pop().unwrap();
    moved.insert(2, line);
    assert_eq!(tampered(run(&moved, &key, None)).kind, Tamper::Reordered);
}

#[test]
fn truncation_mid_record_or_before_the_stored_checkpoint() {
    let (key, l) = single(20);
    let mut cut = l.clone();
    let last = cut.len() - 1;
    cut[last].truncate(30);
    let t = tampered(run(&cut, &key, None));
    assert_eq!((t.line, t.kind), (last + 1, Tamper::Truncated), "{t}");
    cut[last] = l[last].trim_ascii_end().to_vec();
    assert_eq!(tampered(run(&cut, &key, None)).kind, Tamper::Truncated);
    let stored = l[last].trim_ascii_end();
    let t = tampered(run(&l[..last - 3], &key, Some(stored)));
    assert_eq!((t.line, t.seq, t.kind), (last - 2, last as u64 - 3, Tamper::Truncated), "{t}");
    let v = run(&l[..last - 3], &key, None).unwrap();
    assert!(v.notes.iter().any(|n| n.contains("not covered by a signature")), "{:?}", v.notes);
    let v = run(&l, &key, Some(stored)).unwrap();
    assert_eq!(v.last_signed_seq, Some(last as u64));
    let t = tampered(verify_bytes(&[("audit.log".into(), Vec::new())], None, None));
    assert_eq!(t.kind, Tamper::Truncated);
}

#[test]
fn the_stored_checkpoint_must_be_in_the_log_byte_for_byte() {
    let (key, l) = single(20);
    let (_, other) = single(20);
    let last = l.len() - 1;
    let t = tampered(run(&l, &key, Some(other[last].trim_ascii_end())));
    assert_eq!((t.line, t.kind), (last + 1, Tamper::Edited), "{t}");
    let r = run(&l[..5], &key, Some(other[last].trim_ascii_end()));
    assert!(matches!(r, Err(Problem::Checkpoint(_))), "{r:?}");
    let r = run(&l, &key, Some(l[3].as_slice()));
    assert!(matches!(r, Err(Problem::Checkpoint(_))), "not a checkpoint: {r:?}");
}

#[test]
fn a_chain_starting_mid_way_verifies_from_there() {
    let (key, files) = test_log(60, 7, 20);
    let later = &files[2..];
    let v = verify_bytes(later, Some(&key.verifying_key()), None).unwrap();
    assert!(v.first_seq > 0 && v.last_signed_seq == Some(v.last_seq), "{v:?}");
    assert!(v.notes.iter().any(|n| n.contains("earlier files not given")), "{:?}", v.notes);
    let v = verify_bytes(later, None, None).unwrap();
    assert_eq!(v.last_signed_seq, None);
    assert!(v.notes.iter().any(|n| n.contains("were not checked")), "{:?}", v.notes);
}

#[test]
fn empty_files_and_unsigned_tails_are_noted() {
    let (key, l) = single(12);
    let mut files = vec![("audit.log".to_owned(), l[..l.len() - 1].concat())];
    files.push(("audit.log.empty".into(), Vec::new()));
    let v = verify_bytes(&files, Some(&key.verifying_key()), None).unwrap();
    assert!(v.notes.iter().any(|n| n == "audit.log.empty is empty"), "{:?}", v.notes);
    let unsigned = v.last_seq - v.last_signed_seq.unwrap();
    assert!(unsigned > 0);
    assert!(
        v.notes.iter().any(|n| n.starts_with(&format!("{unsigned} records after"))),
        "{:?}",
        v.notes
    );
}

fn tamper_kind(r: &Result<Verified, Problem>) -> Option<Tamper> {
    match r {
        Err(Problem::Tampered(t)) => Some(t.kind),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_input_never_panics(
        files in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..4),
        stored in prop::option::of(prop::collection::vec(any::<u8>(), 0..100)),
    ) {
        let files: Files =
            files.into_iter().enumerate().map(|(i, b)| (format!("f{i}"), b)).collect();
        let _ = verify_bytes(&files, None, stored.as_deref());
    }

    #[test]
    fn shuffled_and_duplicated_lines_never_panic_or_pass(
        picks in prop::collection::vec(0usize..40, 1..40),
    ) {
        let (key, l) = single(15);
        let chosen: Vec<Vec<u8>> = picks.iter().map(|i| l[i % l.len()].clone()).collect();
        let r = run(&chosen, &key, Some(l[l.len() - 1].trim_ascii_end()));
        prop_assert!(r.is_ok() == (chosen == l), "{r:?}");
    }

    #[test]
    fn any_changed_byte_is_an_edit_of_its_line(
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let (key, l) = single(12);
        let mut bytes = l.concat();
        let at = pos.index(bytes.len());
        prop_assume!(bytes[at] != b'\n' && bytes[at] != byte);
        bytes[at] = byte;
        let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
        let r = verify_bytes(&[("audit.log".into(), bytes)], Some(&key.verifying_key()), None);
        prop_assert_eq!(tamper_kind(&r), Some(Tamper::Edited), "{:?}", r);
        if let Err(Problem::Tampered(t)) = r {
            prop_assert_eq!(t.line, line, "{}", t);
        }
    }
}
