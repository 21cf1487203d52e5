//! `audit verify`: checks the hash chain and the checkpoint signatures of audit log files
//! and names the first bad record and the kind of tampering.
//!
//! The chain proves that no line was edited, inserted, deleted or moved *between* the first
//! and last line given; a checkpoint signature proves that the lines before it are what the
//! holder of the signing key wrote. What neither can show is a cut at the end: for that, pass
//! the checkpoint the gateway keeps in its store (`--checkpoint`). Verification is over the
//! exact bytes of each line, never a re-serialization.
//!
//! The classification names the simplest explanation of the first break (one line changed,
//! added, removed or moved). No break goes unreported; only its name is a judgement. The
//! files are read whole into memory (rotation bounds each file).

use std::{cell::OnceCell, collections::HashSet, fmt, path::PathBuf};

use serde::Serialize;

use super::{
    query::order_key,
    record::{GENESIS_PREV, Kind, Record, checkpoint_message, line_hash},
    signing::VerifyingKey,
};

/// The kinds of tampering told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tamper {
    /// A line's bytes were changed.
    Edited,
    /// A line was added (forged or duplicated).
    Inserted,
    /// Lines are missing (a gap in the seqs).
    Deleted,
    /// Every line is there, but not in order.
    Reordered,
    /// The log was cut: mid-record, or before the gateway's stored checkpoint.
    Truncated,
}

/// The first bad record, where it is and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tampering {
    /// The file.
    pub file: String,
    /// 1-based line number in `file`.
    pub line: usize,
    /// The record's seq (or the seq expected there, when the line is not a record).
    pub seq: u64,
    /// What kind of tampering.
    pub kind: Tamper,
    /// What exactly is wrong, for people.
    pub detail: String,
}

/// Why a log did not verify.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The log was tampered with.
    #[error("{0}")]
    Tampered(Tampering),
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The stored checkpoint given with `--checkpoint` cannot be used.
    #[error("the stored checkpoint: {0}")]
    Checkpoint(String),
}

/// What a log that verified holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Checkpoint records among them.
    pub checkpoints: u64,
    /// The seq of the first record.
    pub first_seq: u64,
    /// The seq of the last record.
    pub last_seq: u64,
    /// The seq of the last checkpoint whose signature was checked.
    pub last_signed_seq: Option<u64>,
    /// What the result does not prove, and files that held nothing.
    pub notes: Vec<String>,
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Edited => "edited",
            Self::Inserted => "inserted",
            Self::Deleted => "deleted",
            Self::Reordered => "reordered",
            Self::Truncated => "truncated",
        })
    }
}

impl fmt::Display for Tampering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { file, line, seq, kind, detail } = self;
        write!(f, "{file}:{line} (seq {seq}): {kind}: {detail}")
    }
}

/// Verifies log files given in any order (each path once). `key` is the auditor's copy of
/// the public key; without it checkpoints are checked with the key the genesis record names,
/// which proves consistency only. `checkpoint` is the gateway's stored checkpoint line.
pub fn verify_files(
    files: &[PathBuf],
    key: Option<&VerifyingKey>,
    checkpoint: Option<&[u8]>,
) -> Result<Verified, Problem> {
    let mut seen = HashSet::new();
    let mut inputs = Vec::with_capacity(files.len());
    for path in files {
        if seen.insert(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone())) {
            let bytes = std::fs::read(path).map_err(|source| Problem::Unreadable {
                path: path.display().to_string(),
                source,
            })?;
            inputs.push((path.display().to_string(), bytes));
        }
    }
    verify_bytes(&inputs, key, checkpoint)
}

/// [`verify_files`] over files already in memory, as (name, contents).
pub fn verify_bytes(
    inputs: &[(String, Vec<u8>)],
    key: Option<&VerifyingKey>,
    checkpoint: Option<&[u8]>,
) -> Result<Verified, Problem> {
    let stored = checkpoint.map(parse_stored).transpose()?;
    let mut ordered: Vec<_> = inputs.iter().collect();
    ordered.sort_by_cached_key(|(name, bytes)| {
        (order_key(name, split(bytes).map(|(l, _)| l)), name.clone())
    });
    let mut log = Log { lines: Vec::new(), index: OnceCell::new() };
    let mut notes = Vec::new();
    for (name, bytes) in ordered {
        if bytes.is_empty() {
            notes.push(format!("{name} is empty"));
        }
        let lines = split(bytes).enumerate();
        log.lines.extend(lines.map(|(i, (bytes, newline))| Line {
            file: name,
            no: i + 1,
            bytes,
            newline,
        }));
    }
    if log.lines.is_empty() {
        let file = inputs.first().map(|(n, _)| n.clone()).unwrap_or_default();
        let detail = "no records at all: a log always starts with a genesis record".into();
        let kind = Tamper::Truncated;
        return Err(Problem::Tampered(Tampering { file, line: 1, seq: 0, kind, detail }));
    }
    let mut chain =
        Chain { key: key.cloned(), given_key: key.is_some(), log_id: None, unchecked: 0 };
    let mut v = chain.walk(&log, stored.as_ref())?;
    v.notes.splice(0..0, notes);
    Ok(v)
}

/// One line of a file: its bytes without the newline, and whether the newline was there.
struct Line<'a> {
    file: &'a str,
    no: usize,
    bytes: &'a [u8],
    newline: bool,
}

/// All lines in log order, and (built only to classify a break) where each seq is.
struct Log<'a> {
    lines: Vec<Line<'a>>,
    index: OnceCell<Vec<(u64, usize)>>,
}

/// What the walk has learnt so far.
struct Chain {
    key: Option<VerifyingKey>,
    given_key: bool,
    log_id: Option<String>,
    unchecked: u64,
}

/// The gateway's stored checkpoint: its exact bytes and the record.
struct Stored {
    bytes: Vec<u8>,
    record: Record,
}

impl Chain {
    fn walk(&mut self, log: &Log<'_>, stored: Option<&Stored>) -> Result<Verified, Problem> {
        let mut v = Verified::default();
        let mut prev: Option<Record> = None;
        for (i, line) in log.lines.iter().enumerate() {
            let rec = match Record::parse(line.bytes) {
                Ok(rec) => rec,
                Err(e) => return Err(log.unparseable(i, prev.as_ref(), &e)),
            };
            match &prev {
                None => self.check_start(log, &rec, &mut v)?,
                Some(p) if !links(p, log.lines[i - 1].bytes, &rec) => {
                    return Err(log.classify(i, p, &rec, self.key.as_ref()));
                }
                Some(_) => {}
            }
            if !line.newline {
                return Err(log.tamper(i, rec.seq, Tamper::Truncated, CUT));
            }
            self.check_record(log, i, &rec, &mut v, stored)?;
            v.records += 1;
            v.last_seq = rec.seq;
            prev = Some(rec);
        }
        self.finish(log, v, stored)
    }

    /// The first record given: a genesis, or a continue when earlier files are not given.
    fn check_start(&self, log: &Log<'_>, rec: &Record, v: &mut Verified) -> Result<(), Problem> {
        v.first_seq = rec.seq;
        let s = rec.seq;
        let (kind, detail) = match rec.kind() {
            Kind::Genesis if s == 0 && rec.prev == GENESIS_PREV => return Ok(()),
            Kind::Genesis => (Tamper::Edited, "a genesis record has seq 0 and a zero prev".into()),
            Kind::Continue => {
                v.notes.push(format!(
                    "the chain starts at seq {s} (a continue record): earlier files not given, \
                     so the records before it are not checked"
                ));
                return Ok(());
            }
            _ if log.record(1).is_some_and(|n| matches!(n.kind(), Kind::Genesis)) => {
                match log.count(s) {
                    1 => (Tamper::Reordered, "a record was moved before the genesis record".into()),
                    _ => (Tamper::Inserted, "a record was put before the genesis record".into()),
                }
            }
            _ => (
                Tamper::Deleted,
                format!(
                    "a log file starts with a genesis or continue record, this one with seq {s}: \
                     the records before it were deleted"
                ),
            ),
        };
        Err(log.tamper(0, s, kind, detail))
    }

    /// Kind-specific checks of a record that links to the one before it.
    fn check_record(
        &mut self,
        log: &Log<'_>,
        i: usize,
        rec: &Record,
        v: &mut Verified,
        stored: Option<&Stored>,
    ) -> Result<(), Problem> {
        let edited = |detail: String| log.tamper(i, rec.seq, Tamper::Edited, detail);
        if matches!(rec.kind(), Kind::Genesis | Kind::Continue | Kind::Checkpoint) {
            self.same_log(rec).map_err(edited)?;
        }
        match rec.kind() {
            Kind::Genesis => {
                let named = VerifyingKey::parse(rec.pubkey.as_deref().unwrap_or_default())
                    .map_err(|e| edited(format!("the genesis public key is {e}")))?;
                match &self.key {
                    Some(k) if *k != named => {
                        return Err(edited(
                            "the genesis record names another public key than --pubkey: the log \
                             was rewritten under a new key, or --pubkey is not this log's key"
                                .into(),
                        ));
                    }
                    Some(_) => {}
                    None => self.key = Some(named),
                }
            }
            Kind::Checkpoint => {
                v.checkpoints += 1;
                match &self.key {
                    None => self.unchecked += 1,
                    Some(k) if signed(k, rec) => v.last_signed_seq = Some(rec.seq),
                    Some(_) => {
                        return Err(edited(format!(
                            "the signature does not verify with {}: the records up to this \
                             checkpoint were altered (and the chain recomputed), or it was",
                            self.key_source()
                        )));
                    }
                }
            }
            _ => {}
        }
        match stored {
            Some(s) if s.record.seq == rec.seq && s.bytes != log.lines[i].bytes => Err(edited(
                "the line differs from the checkpoint the gateway stored for this seq \
                 (--checkpoint): the log was rewritten up to here"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// The stored checkpoint against the end of the log, and the notes on what is unproven.
    fn finish(
        &self,
        log: &Log<'_>,
        mut v: Verified,
        stored: Option<&Stored>,
    ) -> Result<Verified, Problem> {
        match stored.map(|s| &s.record) {
            Some(s) if s.seq > v.last_seq => return Err(self.cut(log, &v, s)),
            Some(s) if s.seq < v.first_seq => v.notes.push(format!(
                "the stored checkpoint (seq {}) is before the first record given: not checked",
                s.seq
            )),
            Some(s) => v.notes.push(format!("the log holds the stored checkpoint (seq {})", s.seq)),
            None => {}
        }
        let unsigned = match v.last_signed_seq {
            Some(s) if s == v.last_seq => None,
            Some(s) => {
                Some(format!("{} records after the last checkpoint (seq {s})", v.last_seq - s))
            }
            None => Some(format!("all {} records", v.records)),
        };
        if let Some(records) = unsigned {
            v.notes.push(format!(
                "{records} are not covered by a signature; --checkpoint from the store narrows this"
            ));
        }
        if self.unchecked > 0 {
            v.notes.push(format!(
                "{} checkpoint signatures were not checked: no --pubkey, and no genesis record",
                self.unchecked
            ));
        } else if !self.given_key && v.checkpoints > 0 {
            v.notes.push(
                "signatures were checked with the public key in the genesis record: this proves \
                 the log is consistent, not authentic (whoever rewrites the log can put in a new \
                 key); --pubkey is the real check"
                    .into(),
            );
        }
        Ok(v)
    }

    /// The log ends before the stored checkpoint `s`: truncated, if `s` is this log's.
    fn cut(&self, log: &Log<'_>, v: &Verified, s: &Record) -> Problem {
        let Some(key) = &self.key else {
            return Problem::Checkpoint("no key to check it with: pass --pubkey".into());
        };
        if !signed(key, s) || s.log_id != self.log_id {
            return Problem::Checkpoint(format!(
                "not a checkpoint of this log signed by {}: another log's, or this log was \
                 rewritten under a new key",
                self.key_source()
            ));
        }
        let last = &log.lines[log.lines.len() - 1];
        Problem::Tampered(Tampering {
            file: last.file.to_owned(),
            line: last.no + 1,
            seq: v.last_seq.saturating_add(1),
            kind: Tamper::Truncated,
            detail: format!(
                "the log ends at seq {} but the gateway's stored checkpoint is at seq {}: records \
                 were cut off the end",
                v.last_seq, s.seq
            ),
        })
    }

    fn same_log(&mut self, rec: &Record) -> Result<(), String> {
        match (&rec.log_id, &self.log_id) {
            (None, _) => Err("the record has no log_id".into()),
            (Some(id), Some(log)) if id != log => Err(format!("log_id {id}, not {log}")),
            (Some(_), Some(_)) => Ok(()),
            (Some(id), None) => {
                self.log_id = Some(id.clone());
                Ok(())
            }
        }
    }

    fn key_source(&self) -> &'static str {
        if self.given_key { "--pubkey" } else { "the genesis record's public key" }
    }
}

/// The detail of a line without its newline.
const CUT: &str = "the file ends in the middle of this record (no newline): it was cut";

impl Log<'_> {
    /// Line `i` is not a record: edited into garbage, a foreign line, or cut.
    fn unparseable(&self, i: usize, prev: Option<&Record>, err: &str) -> Problem {
        let seq = prev.map_or(0, |p| p.seq.saturating_add(1));
        if !self.lines[i].newline {
            return self.tamper(i, seq, Tamper::Truncated, CUT);
        }
        let around = match (prev, self.record(i + 1)) {
            (Some(p), Some(n)) => links(p, self.lines[i - 1].bytes, &n),
            (None, Some(n)) => n.kind() == Kind::Genesis,
            _ => false,
        };
        if around {
            let detail = format!("not a record ({err}); the chain goes on around it");
            self.tamper(i, seq, Tamper::Inserted, detail)
        } else {
            let detail = format!("the line was changed: not a valid record ({err})");
            self.tamper(i, seq, Tamper::Edited, detail)
        }
    }

    /// Record `c` at line `i` does not link to `p` before it: says which line is bad and why.
    fn classify(&self, i: usize, p: &Record, c: &Record, key: Option<&VerifyingKey>) -> Problem {
        let (s, expected) = (c.seq, p.seq.checked_add(1));
        let want = expected.map_or_else(|| "none".to_owned(), |e| e.to_string());
        // Written right after `p` (its prev says so), yet with another seq: the seq was changed.
        if Some(s) != expected && c.prev == line_hash(self.lines[i - 1].bytes) {
            let detail = format!("its seq was changed: {s} where {want} belongs");
            return self.tamper(i, s, Tamper::Edited, detail);
        }
        let next = self.record(i + 1);
        let around = next.as_ref().is_none_or(|n| links(p, self.lines[i - 1].bytes, n));
        let gap = expected.filter(|e| s > *e && self.none_between(*e, s));
        if around && gap.is_none() && self.is_extra(i, c, expected) {
            let detail = match self.elsewhere(s, i) {
                Some(at) => {
                    format!("a second seq {s} (the other at {at}); the chain goes on around it")
                }
                None => format!("seq {s} does not belong here; the chain goes on around it"),
            };
            return self.tamper(i, s, Tamper::Inserted, detail);
        }
        let before_p = i.checked_sub(2).and_then(|j| Some((j, self.record(j)?)));
        if s == p.seq && before_p.is_some_and(|(j, pp)| links(&pp, self.lines[j].bytes, c)) {
            let no = self.lines[i].no;
            let detail = format!("two records claim seq {s}; the chain goes on through line {no}");
            return self.tamper(i - 1, s, Tamper::Inserted, detail);
        }
        if let Some(e) = gap {
            let missing = if s - e == 1 {
                format!("record {e} is")
            } else {
                format!("records {e}..{} are", s - 1)
            };
            return self.tamper(i, s, Tamper::Deleted, format!("{missing} missing before this"));
        }
        if Some(s) != expected {
            if let Some(at) = self.elsewhere(s, i) {
                return self.tamper(i, s, Tamper::Inserted, format!("seq {s} is also at {at}"));
            }
            let at =
                expected.and_then(|e| self.elsewhere(e, i)).unwrap_or_else(|| "nowhere".into());
            let detail =
                format!("seq {s} where {want} belongs (seq {want} is at {at}): lines were moved");
            return self.tamper(i, s, Tamper::Reordered, detail);
        }
        // The right seq, the wrong prev: the line before was changed, or this line's prev.
        let genuine = match &next {
            Some(n) => links(c, self.lines[i].bytes, n),
            None => c.kind() == Kind::Checkpoint && key.is_some_and(|k| signed(k, c)),
        };
        if genuine {
            let detail = format!(
                "the line was changed: its hash no longer matches the prev of line {}",
                self.lines[i].no
            );
            self.tamper(i - 1, p.seq, Tamper::Edited, detail)
        } else {
            let detail = "its prev was changed: it does not match the line before it";
            self.tamper(i, s, Tamper::Edited, detail)
        }
    }

    /// Whether record `c` at line `i` is one too many: a second copy of a seq, or a seq out
    /// of the log's range that does not link after any line (a moved line would).
    fn is_extra(&self, i: usize, c: &Record, expected: Option<u64>) -> bool {
        let s = c.seq;
        if self.elsewhere(s, i).is_some() {
            return true;
        }
        let others = self.index().iter().filter(|(_, j)| *j != i).map(|(seq, _)| *seq);
        let (min, max) = (others.clone().min(), others.max());
        let outside = min.is_none_or(|m| s < m) || max.is_none_or(|m| s > m);
        let moved = s.checked_sub(1).is_some_and(|before| {
            self.positions(before).any(|j| line_hash(self.lines[j].bytes) == c.prev)
        });
        Some(s) != expected && outside && !moved
    }

    fn tamper(&self, i: usize, seq: u64, kind: Tamper, detail: impl Into<String>) -> Problem {
        let (file, line) = (self.lines[i].file.to_owned(), self.lines[i].no);
        Problem::Tampered(Tampering { file, line, seq, kind, detail: detail.into() })
    }

    fn record(&self, i: usize) -> Option<Record> {
        self.lines.get(i).and_then(|l| Record::parse(l.bytes).ok())
    }

    /// (seq, line index) of every line that is a record, sorted.
    fn index(&self) -> &[(u64, usize)] {
        self.index.get_or_init(|| {
            let mut ix: Vec<_> =
                (0..self.lines.len()).filter_map(|i| Some((self.record(i)?.seq, i))).collect();
            ix.sort_unstable();
            ix
        })
    }

    fn positions(&self, seq: u64) -> impl Iterator<Item = usize> {
        let ix = self.index();
        let start = ix.partition_point(|(s, _)| *s < seq);
        ix[start..].iter().take_while(move |(s, _)| *s == seq).map(|(_, j)| *j)
    }

    fn count(&self, seq: u64) -> usize {
        self.positions(seq).count()
    }

    /// Where else than line `i` a record with `seq` is, as `file:line`.
    fn elsewhere(&self, seq: u64, i: usize) -> Option<String> {
        let j = self.positions(seq).find(|j| *j != i)?;
        Some(format!("{}:{}", self.lines[j].file, self.lines[j].no))
    }

    /// Whether no record has a seq in `from..to`.
    fn none_between(&self, from: u64, to: u64) -> bool {
        let ix = self.index();
        ix.get(ix.partition_point(|(s, _)| *s < from)).is_none_or(|(s, _)| *s >= to)
    }
}

/// Whether `b` is the record right after `a` (whose line is `a_line`).
fn links(a: &Record, a_line: &[u8], b: &Record) -> bool {
    // Public hashes of public lines: no need for a constant-time comparison.
    a.seq.checked_add(1) == Some(b.seq) && b.prev == line_hash(a_line)
}

/// Whether checkpoint `r` carries `key`'s signature.
pub(crate) fn signed(key: &VerifyingKey, r: &Record) -> bool {
    let (Some(log_id), Some(sig)) = (&r.log_id, &r.sig) else { return false };
    key.verify(&checkpoint_message(log_id, r.seq, &r.ts, &r.prev), sig)
}

/// The lines of a file's bytes, each without its newline, with whether it had one.
fn split(bytes: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    bytes.split_inclusive(|b| *b == b'\n').map(|l| match l.strip_suffix(b"\n") {
        Some(l) => (l, true),
        None => (l, false),
    })
}

fn parse_stored(bytes: &[u8]) -> Result<Stored, Problem> {
    let bytes = bytes.trim_ascii_end().to_vec();
    let record = Record::parse(&bytes)
        .map_err(|e| Problem::Checkpoint(format!("not an audit record: {e}")))?;
    if record.kind() != Kind::Checkpoint {
        return Err(Problem::Checkpoint("not a checkpoint record".into()));
    }
    Ok(Stored { bytes, record })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::audit::SigningKey;

    type Files = Vec<(String, Vec<u8>)>;

    /// A valid log of `requests` request records: genesis, a checkpoint after every `every`
    /// requests, rotation before a file would pass `per_file` lines (a checkpoint ends the
    /// old file, a continue record starts the new one), and a final checkpoint. The files
    /// are named as the writer names them, oldest first.
    pub(crate) fn test_log(requests: u64, every: u64, per_file: usize) -> (SigningKey, Files) {
        let key = SigningKey::generate().unwrap();
        let mut w = Writer {
            key: &key,
            seq: 0,
            prev: GENESIS_PREV.into(),
            files: vec![(0, String::new())],
        };
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
            r.action = Some(["read", "write", "read"][n as usize % 3].into());
            let ok = n % 5 != 0;
            r.decision = Some(if ok { "allow" } else { "deny" }.into());
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
            let name =
                if i == last { "audit.log".into() } else { format!("audit.log.{first:020}") };
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

    fn run(
        lines: &[Vec<u8>],
        key: &SigningKey,
        stored: Option<&[u8]>,
    ) -> Result<Verified, Problem> {
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
        assert_eq!(
            (v.first_seq, v.last_seq, v.last_signed_seq),
            (0, v.records - 1, Some(v.last_seq))
        );
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
        assert_eq!(
            (t.file.as_str(), t.line, t.kind),
            (gap[1].0.as_str(), 1, Tamper::Deleted),
            "{t}"
        );
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
}
