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
    /// True when the chain starts at a `continue` record, not at the genesis record: the
    /// files before it were not given (removed, or not passed), so the records before
    /// `first_seq` are unchecked and may be gone.
    pub starts_after_genesis: bool,
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
                v.starts_after_genesis = true;
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
            Kind::Resume => {
                if let (Some(from), Some(to)) = (rec.unattested_from, rec.unattested_to) {
                    v.notes.push(format!(
                        "records seq {from}..{to} were written after the last checkpoint the \
                         gateway stored, before it stopped without a final one (a crash); the \
                         resume record at seq {} says so: they chain, and later checkpoints \
                         sign them, but no checkpoint attested them when they were written",
                        rec.seq
                    ));
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

mod classify;

use classify::CUT;
#[cfg(test)]
pub(crate) mod tests;
