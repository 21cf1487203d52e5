//! `audit query` and `audit tail`: pick records out of audit log files by who, what, when.
//!
//! Files are read in log order (by the seq of their first records, see [`order_files`]), so
//! a shell glob such as `audit/audit.log*` works whatever order it expands in. Query does
//! not check the chain; run `audit verify` for that.

use std::{
    collections::VecDeque,
    fs::File,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::record::{Kind, Record};
use crate::authz::{Action, Effect};

/// Why a query cannot run, or a line it could not read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A line is not a record (the query goes on after it).
    #[error("{path}:{line}: not an audit record: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        reason: String,
    },
    /// A filter argument cannot be parsed.
    #[error("{0}")]
    BadFilter(String),
}

/// Which records to keep. Empty fields match everything; set fields must all match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The principal, exactly.
    pub principal: Option<String>,
    /// A path prefix, segment-wise: `/a` matches `/a` and `/a/b` but not `/ab`.
    pub path: Option<String>,
    /// The action.
    pub action: Option<Action>,
    /// Allow or deny.
    pub decision: Option<Effect>,
    /// gRPC status code name, e.g. `PERMISSION_DENIED` (any case).
    pub status: Option<String>,
    /// Records at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Records before this time.
    pub until: Option<OffsetDateTime>,
    /// The record kind.
    pub kind: Option<Kind>,
}

/// One matching record, with the exact line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// The line as written (no newline).
    pub text: String,
    /// The parsed record.
    pub record: Record,
}

impl Filter {
    /// Whether `r` passes every set condition.
    pub fn matches(&self, r: &Record) -> bool {
        let same = |want: &Option<String>, have: &Option<String>| match (want, have) {
            (None, _) => true,
            (Some(w), Some(h)) => w.eq_ignore_ascii_case(h),
            (Some(_), None) => false,
        };
        let in_time = || {
            if self.since.is_none() && self.until.is_none() {
                return true;
            }
            let Ok(ts) = OffsetDateTime::parse(&r.ts, &Rfc3339) else { return false };
            self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts < u)
        };
        self.principal.as_ref().is_none_or(|p| r.principal.as_ref() == Some(p))
            && self.path.as_deref().is_none_or(|p| r.path.as_deref().is_some_and(|rp| under(rp, p)))
            && self.action.is_none_or(|a| r.action == Some(a))
            && self.decision.is_none_or(|d| r.decision == Some(d))
            && same(&self.status, &r.status)
            && self.kind.is_none_or(|k| r.kind() == k)
            && in_time()
    }
}

/// Parses an RFC 3339 time for `--since` / `--until`.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, QueryError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        QueryError::BadFilter(format!(
            "{text:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z: {e}"
        ))
    })
}

/// Parses a record kind name (`request`, `checkpoint`, …).
pub fn parse_kind(text: &str) -> Result<Kind, QueryError> {
    Kind::ALL.into_iter().find(|k| k.as_str() == text).ok_or_else(|| {
        let names: Vec<_> = Kind::ALL.into_iter().map(Kind::as_str).collect();
        QueryError::BadFilter(format!("unknown kind {text:?}; use one of {}", names.join(", ")))
    })
}

/// Parses an action name for `--action` (any case).
pub fn parse_action(text: &str) -> Result<Action, QueryError> {
    Action::parse(&text.to_ascii_lowercase()).ok_or_else(|| {
        QueryError::BadFilter(format!(
            "unknown action {text:?}; use read, write, delete, destroy, list or admin"
        ))
    })
}

/// Parses `allow` or `deny` for `--decision` (any case).
pub fn parse_decision(text: &str) -> Result<Effect, QueryError> {
    match text.to_ascii_lowercase().as_str() {
        "allow" => Ok(Effect::Allow),
        "deny" => Ok(Effect::Deny),
        _ => Err(QueryError::BadFilter(format!("unknown decision {text:?}; use allow or deny"))),
    }
}

/// Reads `files` in log order and yields the records that pass `filter`, one file at a
/// time (memory stays bounded by the longest line). Lines that are not records come out
/// as [`QueryError::Malformed`] items; the iteration goes on after them.
pub fn query_files(
    files: &[PathBuf],
    filter: &Filter,
) -> Result<impl Iterator<Item = Result<Match, QueryError>>, QueryError> {
    let files = order_files(files)?;
    let filter = filter.clone();
    let lines = files.into_iter().flat_map(|path| -> Box<dyn Iterator<Item = _>> {
        match File::open(&path) {
            Ok(f) => Box::new(numbered_lines(path, BufReader::new(f))),
            Err(e) => Box::new(std::iter::once(Err(unreadable(&path, e)))),
        }
    });
    Ok(lines.filter_map(move |item| match item {
        Ok(entry) => filter.matches(&entry.record).then_some(Ok(entry)),
        Err(e) => Some(Err(e)),
    }))
}

/// The last `n` records that pass `filter` among `lines` of the file `path` (for `audit
/// tail`, which reads the file itself to follow it from where it ended).
pub fn last_matching(
    path: &Path,
    lines: impl BufRead,
    filter: &Filter,
    n: usize,
) -> Result<Vec<Match>, QueryError> {
    let mut last = VecDeque::with_capacity(n.min(4096));
    for item in numbered_lines(path.to_owned(), lines) {
        match item {
            Ok(entry) if filter.matches(&entry.record) => {
                if last.len() == n {
                    last.pop_front();
                }
                if n > 0 {
                    last.push_back(entry);
                }
            }
            Ok(_) | Err(QueryError::Malformed { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(last.into())
}

/// Sorts log files into log order: by the seq of their first records, then by name.
pub fn order_files(files: &[PathBuf]) -> Result<Vec<PathBuf>, QueryError> {
    let mut keyed = Vec::with_capacity(files.len());
    for path in files {
        let file = File::open(path).map_err(|e| unreadable(path, e))?;
        let lines = BufReader::new(file).split(b'\n').map_while(Result::ok);
        keyed.push((order_key(&path.display().to_string(), lines), path.clone()));
    }
    keyed.sort();
    Ok(keyed.into_iter().map(|(_, p)| p).collect())
}

/// Where a file goes in log order: the seq its first line has (or should have).
///
/// The key comes from the first two neighbouring lines whose seqs agree, so that one
/// edited line cannot move a file; failing that, from the first record, then from a
/// rotated file's name (`audit.log.<first seq>`); files with nothing to go by sort last.
pub(crate) fn order_key<L: AsRef<[u8]>>(name: &str, lines: impl IntoIterator<Item = L>) -> u64 {
    let mut first = None;
    let mut previous = None;
    for (i, line) in lines.into_iter().take(16).enumerate() {
        let base = Record::parse(line.as_ref()).ok().map(|r| r.seq.saturating_sub(i as u64));
        if base.is_some() && base == previous {
            return base.unwrap_or_default();
        }
        first = first.or(base);
        previous = base;
    }
    let suffix = name.rsplit_once('.').and_then(|(_, s)| s.parse::<u64>().ok());
    first.or(suffix).unwrap_or(u64::MAX)
}

/// Whether `path` is `prefix` or below it, segment-wise.
fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The lines of one file as entries (or errors), numbered from 1.
fn numbered_lines(
    path: PathBuf,
    reader: impl BufRead,
) -> impl Iterator<Item = Result<Match, QueryError>> {
    reader.split(b'\n').enumerate().map(move |(i, line)| {
        let bytes = line.map_err(|e| unreadable(&path, e))?;
        let malformed = |reason: String| QueryError::Malformed {
            path: path.display().to_string(),
            line: i + 1,
            reason,
        };
        let record = Record::parse(&bytes).map_err(malformed)?;
        let text = String::from_utf8(bytes).map_err(|e| malformed(e.to_string()))?;
        Ok(Match { file: path.clone(), line: i + 1, text, record })
    })
}

fn unreadable(path: &Path, source: io::Error) -> QueryError {
    QueryError::Unreadable { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify::tests::{log_files, test_log};
    use proptest::prelude::*;

    fn request(seq: u64, principal: &str, path: &str, action: &str, status: &str) -> Record {
        let mut r = Record::new(Kind::Request);
        r.seq = seq;
        r.ts = format!("2026-01-01T00:00:{seq:02}.000Z");
        r.principal = Some(principal.into());
        r.path = Some(path.into());
        r.action = Action::parse(action);
        r.decision = Some(if status == "OK" { Effect::Allow } else { Effect::Deny });
        r.status = Some(status.into());
        r
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        let f = Filter { path: Some("/a".into()), ..Filter::default() };
        assert!(f.matches(&request(1, "p", "/a", "read", "OK")));
        assert!(f.matches(&request(1, "p", "/a/b", "read", "OK")));
        assert!(!f.matches(&request(1, "p", "/ab", "read", "OK")));
        assert!(!f.matches(&Record::new(Kind::Checkpoint)), "no path, no match");
        let f = Filter { path: Some("/a/".into()), ..Filter::default() };
        assert!(f.matches(&request(1, "p", "/a/b", "read", "OK")));
        let f = Filter { path: Some("/".into()), ..Filter::default() };
        assert!(f.matches(&request(1, "p", "/x", "read", "OK")));
    }

    #[test]
    fn every_condition_must_hold() {
        let r = request(5, "spiffe://x/app", "/pay/db", "read", "PERMISSION_DENIED");
        assert!(Filter::default().matches(&r));
        let f = Filter {
            principal: Some("spiffe://x/app".into()),
            action: Some(parse_action("READ").unwrap()),
            decision: Some(parse_decision("deny").unwrap()),
            status: Some("permission_denied".into()),
            kind: Some(Kind::Request),
            ..Filter::default()
        };
        assert!(f.matches(&r));
        assert!(!Filter { principal: Some("spiffe://x/ap".into()), ..f.clone() }.matches(&r));
        assert!(!Filter { decision: Some(Effect::Allow), ..f.clone() }.matches(&r));
        assert!(!Filter { action: Some(Action::Write), ..f.clone() }.matches(&r));
        assert_eq!(parse_decision("ALLOW").unwrap(), Effect::Allow);
        assert!(parse_action("fly").unwrap_err().to_string().contains("unknown action"));
        assert!(parse_decision("maybe").unwrap_err().to_string().contains("allow or deny"));
        assert!(!Filter { kind: Some(Kind::Checkpoint), ..f }.matches(&r));
    }

    #[test]
    fn time_range_includes_since_and_excludes_until() {
        let f = Filter {
            since: Some(parse_time("2026-01-01T00:00:05Z").unwrap()),
            until: Some(parse_time("2026-01-01T00:00:07Z").unwrap()),
            ..Filter::default()
        };
        let hits: Vec<u64> = (0..10)
            .map(|s| request(s, "p", "/a", "read", "OK"))
            .filter(|r| f.matches(r))
            .map(|r| r.seq)
            .collect();
        assert_eq!(hits, [5, 6]);
        let mut bad_ts = request(6, "p", "/a", "read", "OK");
        bad_ts.ts = "yesterday".into();
        assert!(!f.matches(&bad_ts));
        assert!(parse_time("2026-01-01").is_err());
    }

    #[test]
    fn kinds_parse_by_their_log_names() {
        for k in Kind::ALL {
            assert_eq!(parse_kind(k.as_str()).unwrap(), k);
            assert!(serde_json::to_string(&k).unwrap().contains(k.as_str()));
        }
        assert!(parse_kind("requests").is_err());
    }

    #[test]
    fn query_reads_files_in_log_order_and_yields_exact_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (_, inputs) = test_log(40, 7, 15);
        let mut files = log_files(dir.path(), &inputs);
        files.reverse();
        let f = Filter { kind: Some(Kind::Request), ..Filter::default() };
        let hits: Vec<Match> = query_files(&files, &f).unwrap().map(Result::unwrap).collect();
        assert!(hits.len() > 20, "{}", hits.len());
        assert!(hits.windows(2).all(|w| w[0].record.seq < w[1].record.seq));
        let all: Vec<u8> = inputs.iter().flat_map(|(_, b)| b.clone()).collect();
        let all = String::from_utf8(all).unwrap();
        assert!(hits.iter().all(|e| all.contains(&format!("{}\n", e.text))));
    }

    #[test]
    fn malformed_lines_are_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let r = request(3, "p", "/a", "read", "OK").to_line();
        std::fs::write(&path, format!("{r}\nnot json\n{r}\n")).unwrap();
        let items: Vec<_> =
            query_files(std::slice::from_ref(&path), &Filter::default()).unwrap().collect();
        assert_eq!(items.len(), 3);
        assert!(matches!(items[1], Err(QueryError::Malformed { line: 2, .. })));
        let bytes = std::fs::read(&path).unwrap();
        let last = last_matching(&path, bytes.as_slice(), &Filter::default(), 1).unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].line, 3);
        assert!(last_matching(&path, bytes.as_slice(), &Filter::default(), 0).unwrap().is_empty());
    }

    #[test]
    fn order_keys_survive_one_edited_first_line() {
        let lines = |seqs: &[u64]| -> Vec<String> {
            seqs.iter().map(|s| request(*s, "p", "/a", "read", "OK").to_line()).collect()
        };
        assert_eq!(order_key("x", lines(&[10, 11, 12])), 10);
        assert_eq!(order_key("x", lines(&[99, 11, 12])), 10);
        assert_eq!(order_key("audit.log.00000000000000000042", Vec::<String>::new()), 42);
        assert_eq!(order_key("audit.log", ["junk"]), u64::MAX);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parse_time_never_panics_and_accepts_only_round_tripping_times(
            text in prop_oneof![
                any::<String>(),
                "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|z|[+-][0-9]{2}:[0-9]{2})",
                "2026-0[1-2]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{0,3})?(Z|[+-]0[0-9]:[0-5][0-9])\\PC{0,2}",
                "[0-9]{4}-0[1-9]-[0-2][1-8]T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]{1,9})?(Z|z|[+-][01][0-9]:[0-5][0-9])",
            ],
        ) {
            match parse_time(&text) {
                Ok(t) => {
                    prop_assert!(text.is_ascii(), "{:?}", text);
                    let shown = t.format(&Rfc3339).unwrap();
                    prop_assert_eq!(parse_time(&shown).unwrap(), t);
                    // Same instant and offset as the text says: the date and hour:minute are
                    // written back as they were (a leap second 60 aside).
                    prop_assert_eq!(&shown[..16], &text[..16].replace(['t', ' '], "T"));
                }
                Err(QueryError::BadFilter(msg)) => {
                    let quoted = format!("{text:?} is not an RFC 3339 time");
                    prop_assert!(msg.starts_with(&quoted), "{}", msg);
                    prop_assert!(!msg.chars().any(char::is_control), "{:?}", msg);
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }

        #[test]
        fn parse_kind_accepts_exactly_the_log_names(
            text in prop_oneof![
                any::<String>(),
                "(genesis|continue|request|handshake|checkpoint|outage|Request| request|requests|)",
            ],
        ) {
            match parse_kind(&text) {
                Ok(k) => prop_assert_eq!(k.as_str(), text.as_str()),
                Err(QueryError::BadFilter(msg)) => {
                    prop_assert!(Kind::ALL.iter().all(|k| k.as_str() != text), "{:?} refused", text);
                    prop_assert!(Kind::ALL.iter().all(|k| msg.contains(k.as_str())), "{}", msg);
                    prop_assert!(!msg.chars().any(char::is_control), "{:?}", msg);
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }

        #[test]
        fn order_key_never_panics_and_falls_back_to_the_file_name(
            garbage in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..60),
                    "\\PC{0,60}".prop_map(String::into_bytes),
                ],
                0..20,
            ),
            suffix in any::<u64>(),
            base in 0u64..1_000_000,
        ) {
            // With no `{` or `[`, no line can be a JSON record.
            let not_records: Vec<Vec<u8>> = garbage
                .iter()
                .map(|l| {
                    l.iter().map(|&b| if matches!(b, b'{' | b'[') { b'x' } else { b }).collect()
                })
                .collect();
            let name = format!("audit.log.{suffix:020}");
            prop_assert_eq!(order_key(&name, &not_records), suffix);
            prop_assert_eq!(order_key("audit.log", &not_records), u64::MAX);
            // Two neighbouring records that agree fix the key whatever garbage follows.
            let mut lines: Vec<Vec<u8>> = (0..2)
                .map(|i| request(base + i, "p", "/a", "read", "OK").to_line().into_bytes())
                .collect();
            lines.extend(garbage.iter().cloned());
            prop_assert_eq!(order_key(&name, &lines), base);
        }
    }
}
