//! Naming a break in the chain: the simplest explanation (one line changed, added, removed
//! or moved) of the first line that does not follow from the one before.

use super::*;

/// The detail of a line without its newline.
pub(super) const CUT: &str = "the file ends in the middle of this record (no newline): it was cut";

impl Log<'_> {
    /// Line `i` is not a record: edited into garbage, a foreign line, or cut.
    pub(super) fn unparseable(&self, i: usize, prev: Option<&Record>, err: &str) -> Problem {
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
    pub(super) fn classify(
        &self,
        i: usize,
        p: &Record,
        c: &Record,
        key: Option<&VerifyingKey>,
    ) -> Problem {
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
    pub(super) fn is_extra(&self, i: usize, c: &Record, expected: Option<u64>) -> bool {
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

    pub(super) fn tamper(
        &self,
        i: usize,
        seq: u64,
        kind: Tamper,
        detail: impl Into<String>,
    ) -> Problem {
        let (file, line) = (self.lines[i].file.to_owned(), self.lines[i].no);
        Problem::Tampered(Tampering { file, line, seq, kind, detail: detail.into() })
    }

    pub(super) fn record(&self, i: usize) -> Option<Record> {
        self.lines.get(i).and_then(|l| Record::parse(l.bytes).ok())
    }

    /// (seq, line index) of every line that is a record, sorted.
    pub(super) fn index(&self) -> &[(u64, usize)] {
        self.index.get_or_init(|| {
            let mut ix: Vec<_> =
                (0..self.lines.len()).filter_map(|i| Some((self.record(i)?.seq, i))).collect();
            ix.sort_unstable();
            ix
        })
    }

    pub(super) fn positions(&self, seq: u64) -> impl Iterator<Item = usize> {
        let ix = self.index();
        let start = ix.partition_point(|(s, _)| *s < seq);
        ix[start..].iter().take_while(move |(s, _)| *s == seq).map(|(_, j)| *j)
    }

    pub(super) fn count(&self, seq: u64) -> usize {
        self.positions(seq).count()
    }

    /// Where else than line `i` a record with `seq` is, as `file:line`.
    pub(super) fn elsewhere(&self, seq: u64, i: usize) -> Option<String> {
        let j = self.positions(seq).find(|j| *j != i)?;
        Some(format!("{}:{}", self.lines[j].file, self.lines[j].no))
    }

    /// Whether no record has a seq in `from..to`.
    pub(super) fn none_between(&self, from: u64, to: u64) -> bool {
        let ix = self.index();
        ix.get(ix.partition_point(|(s, _)| *s < from)).is_none_or(|(s, _)| *s >= to)
    }
}
