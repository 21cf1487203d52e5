//! Start-up: finding the end of the log on disk and checking it against the checkpoints the
//! store keeps, before anything is written.

use super::*;

impl State {
    pub(super) fn open(
        config: &AuditConfig,
        key: SigningKey,
        checkpoints: tokio::sync::mpsc::UnboundedSender<(String, String)>,
        stored: &[(String, Vec<u8>)],
        health: watch::Sender<Option<String>>,
        shared: Arc<Shared>,
    ) -> Result<Self, AuditError> {
        let path = config.path.clone();
        let fail = |reason: String| AuditError::Open { path: path.display().to_string(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(|e| fail(format!("cannot create directory: {e}")))?;
        }
        let found = find_tail(&path).map_err(|e| fail(e.to_string()))?;
        let genesis_note =
            check_start(found.as_ref(), stored, &key, config.new_log).map_err(fail)?;
        let checkpoint_now = genesis_note.is_some();
        let unattested = match found.as_ref() {
            Some(tail) => after_stored_checkpoint(&path, tail, stored).map_err(fail)?,
            None => None,
        };
        let file = open_append(&path).map_err(|e| fail(e.to_string()))?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        let mut state = Self {
            path: path.clone(),
            ino: (meta.dev(), meta.ino()),
            len: meta.len(),
            file,
            first_seq: 0,
            head: Head { next_seq: 0, prev: GENESIS_PREV.into() },
            log_id: String::new(),
            key,
            checkpoint_every: config.checkpoint_every.get(),
            checkpoint_interval: config.checkpoint_interval(),
            max_file_bytes: config.max_file_bytes.get(),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            last_checkpoint_line: None,
            outage: None,
            checkpoints,
            health,
            group_commit: config.group_commit(),
            sync_time: Duration::ZERO,
            shared,
            dispatch: None,
            stopping: false,
        };
        // Answer waiters from a task of the runtime: one wakeup crosses threads per batch,
        // and the waiters are woken on a worker's own queue (promptly) rather than one by
        // one through the runtime's shared queue.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
            runtime.spawn(async move {
                while let Some(done) = rx.recv().await {
                    done.send();
                }
            });
            state.dispatch = Some(tx);
        }
        let first = match found {
            Some(Tail { head, log_id, first_seq, in_active: true, .. }) => {
                tracing::info!(log = %path.display(), next_seq = head.next_seq, %log_id, "audit log continues");
                (state.head, state.log_id, state.first_seq) = (head, log_id, first_seq);
                None
            }
            Some(Tail { head, log_id, .. }) => {
                tracing::warn!(log = %path.display(), "active audit log file missing; continuing the chain of the newest rotated file");
                (state.head, state.log_id) = (head, log_id);
                let mut r = Record::new(Kind::Continue);
                r.reason = Some("the active log file was missing at start".into());
                Some(r)
            }
            None => {
                state.log_id = random_id().map_err(|e| fail(e.to_string()))?;
                let mut r = Record::new(Kind::Genesis);
                r.pubkey = Some(state.key.verifying_key().to_string());
                r.reason = genesis_note;
                Some(r)
            }
        };
        // A new log begun while the store keeps others' checkpoints gets its own at once (the
        // gateway stores it before serving), so a crash now cannot leave a log the store has
        // never seen.
        if let Some(mut r) = first {
            r.log_id = Some(state.log_id.clone());
            state.first_seq = state.head.next_seq;
            state
                .write(&[&r.body()], checkpoint_now)
                .map_err(|e| fail(format!("cannot write: {e}")))?;
        }
        if let Some((from, to)) = unattested {
            tracing::warn!(
                from,
                to,
                "audit log resumed after a crash: records after the last stored checkpoint are marked unattested"
            );
            let mut r = Record::new(Kind::Resume);
            r.log_id = Some(state.log_id.clone());
            r.unattested_from = Some(from);
            r.unattested_to = Some(to);
            r.reason = Some(
                "started after a crash: these records chain, but no checkpoint the store kept \
                 covered them"
                    .into(),
            );
            state.write(&[&r.body()], false).map_err(|e| fail(format!("cannot write: {e}")))?;
        }
        Ok(state)
    }
}

/// The last whole line of the log found on disk.
pub(super) struct Tail {
    pub(super) head: Head,
    pub(super) log_id: String,
    pub(super) first_seq: u64,
    /// Found in the active file (else in the newest rotated one).
    pub(super) in_active: bool,
    /// The public key named by the file's first line, when that is the genesis record.
    pub(super) genesis_pubkey: Option<String>,
}

/// Checks the log found on disk (`found`) against the checkpoints the store keeps
/// (`stored`, of every log: replicas sharing a store each have their own) before anything
/// is written; returns what a new log's genesis record notes (`Some` when a new log begins,
/// with `new_log`, although the store keeps checkpoints signed by `key`).
pub(super) fn check_start(
    found: Option<&Tail>,
    stored: &[(String, Vec<u8>)],
    key: &SigningKey,
    new_log: bool,
) -> Result<Option<String>, String> {
    let public = key.verifying_key();
    let Some(tail) = found else {
        // No log here. Checkpoints that this key signed are of a log that was here (or of a
        // replica sharing the key); other replicas' logs are none of this gateway's business.
        let mine = signed_by(stored, &public);
        if mine.is_empty() {
            return Ok(None);
        }
        let logs = mine.join(", ");
        if !new_log {
            return Err(format!(
                "no audit log here, but the store keeps checkpoints that audit.signing_key \
                 signed, of audit log {logs}: the log was deleted or moved, or audit.path \
                 changed. Put the log files back; or, to begin a new log on purpose (or for a \
                 new replica that shares this key), start once with \
                 `secretgate serve --new-audit-log`: its genesis record then names the logs left \
                 behind"
            ));
        }
        tracing::warn!(previous = %logs, "--new-audit-log: beginning a new audit log; the store keeps checkpoints of others");
        return Ok(Some(format!(
            "begun with --new-audit-log; the store keeps checkpoints of {logs}"
        )));
    };
    if let Some(named) = &tail.genesis_pubkey {
        if *named != public.to_string() {
            return Err(format!(
                "audit.signing_key is not this log's key: its genesis record names public key \
                 {named}, the configured key's is {public}. Configure the log's own key; to \
                 change keys, move the log aside (it stays verifiable with its key) and begin a \
                 new one with `secretgate serve --new-audit-log`"
            ));
        }
    }
    let Some((_, line)) = stored.iter().find(|(id, _)| *id == tail.log_id) else {
        // A log the store has never seen, while it keeps checkpoints this key signed: a log
        // put in place of the real one (a new genesis written with the public key).
        let mine = signed_by(stored, &public);
        if !mine.is_empty() {
            return Err(format!(
                "the audit log here (log id {}) is not one the store knows, but the store keeps \
                 checkpoints that audit.signing_key signed, of audit log {}: the log was \
                 replaced. Keep it as evidence, put the real log back; or move it aside and \
                 begin a new log with `secretgate serve --new-audit-log`",
                tail.log_id,
                mine.join(", ")
            ));
        }
        return Ok(None);
    };
    {
        let cp = Record::parse(line).map_err(|e| {
            format!(
                "the checkpoint the store keeps for this log ({}) cannot be read ({e}); the \
                 store was damaged or tampered with. Restore the store from a backup",
                tail.log_id
            )
        })?;
        let last = tail.head.next_seq.saturating_sub(1);
        if cp.seq >= tail.head.next_seq {
            return Err(format!(
                "the log ends at seq {last} but the store holds a checkpoint at seq {}: it was \
                 cut short or replaced. Keep it as evidence, move it aside (with its rotated \
                 files) and begin a new log with `secretgate serve --new-audit-log`",
                cp.seq
            ));
        }
        if cp.kind() != Kind::Checkpoint || !signed(&public, &cp) {
            return Err(format!(
                "the checkpoint the store keeps for this log (seq {}) is not signed by \
                 audit.signing_key ({public}): the key is not this log's, or the store was \
                 tampered with",
                cp.seq
            ));
        }
    }
    Ok(None)
}

/// The stored checkpoints that `public` signed, as `log id (seq N)`.
fn signed_by(stored: &[(String, Vec<u8>)], public: &crate::audit::VerifyingKey) -> Vec<String> {
    stored
        .iter()
        .filter_map(|(id, line)| Record::parse(line).ok().map(|r| (id, r)))
        .filter(|(_, r)| r.kind() == Kind::Checkpoint && signed(public, r))
        .map(|(id, r)| format!("{id} (seq {})", r.seq))
        .collect()
}

/// Checks what follows the checkpoint the store keeps for this log, before anything is
/// written: the stored line must be in the log (in the active file, or ending the newest
/// rotated one), and every line after it must chain to it. After the final checkpoint of a
/// clean stop nothing may follow; after another (a crash), the records that follow are
/// returned as the range no stored checkpoint attested.
pub(super) fn after_stored_checkpoint(
    path: &Path,
    tail: &Tail,
    stored: &[(String, Vec<u8>)],
) -> Result<Option<(u64, u64)>, String> {
    let Some((_, cp_line)) = stored.iter().find(|(id, _)| *id == tail.log_id) else {
        return Ok(None);
    };
    let cp_line = cp_line.strip_suffix(b"\n").unwrap_or(cp_line);
    let cp = Record::parse(cp_line).map_err(|e| format!("the stored checkpoint: {e}"))?;
    let read = |p: &Path| match std::fs::read(p) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: {e}", p.display())),
    };
    fn split(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
        bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty())
    }
    // Usually in the active file; only when it is not there is the newest rotated file read
    // too (a checkpoint ends a file before rotation, and the stored copy may lag by one).
    let active = read(path)?;
    let mut lines: Vec<&[u8]> = split(&active).collect();
    let mut at = lines.iter().rposition(|l| *l == cp_line);
    let rotated;
    if at.is_none() {
        if let Some(newest) = newest_rotated(path).map_err(|e| e.to_string())? {
            rotated = read(&newest)?;
            let older: Vec<&[u8]> = split(&rotated).collect();
            at = older.iter().rposition(|l| *l == cp_line);
            lines = older.into_iter().chain(lines).collect();
        }
    }
    let Some(at) = at else {
        return Err(format!(
            "the checkpoint the store keeps for this log (seq {}) is not in the log: records \
             were cut off (or the log replaced) while the gateway was stopped. Keep it as \
             evidence, move it aside (with its rotated files) and begin a new log with \
             `secretgate serve --new-audit-log`",
            cp.seq
        ));
    };
    let after = &lines[at + 1..];
    let mut prev = (cp.seq, cp_line);
    for line in after {
        let r = Record::parse(line).map_err(|e| format!("a line after seq {}: {e}", prev.0))?;
        if r.seq != prev.0 + 1 || r.prev != line_hash(prev.1) {
            return Err(format!(
                "the record after seq {} (seq {}) does not chain to it: the log was altered \
                 after the checkpoint the store keeps (seq {}). Keep it as evidence; `secretgate \
                 audit verify` names the break",
                prev.0, r.seq, cp.seq
            ));
        }
        prev = (r.seq, line);
    }
    match after {
        [] => Ok(None),
        [..] if cp.reason.as_deref() == Some(FINAL_CHECKPOINT) => Err(format!(
            "{} records follow the final checkpoint of the last clean stop (seq {}): they were \
             added while the gateway was stopped. Keep the log as evidence, remove them (or \
             move the log aside and begin a new one with `secretgate serve --new-audit-log`)",
            after.len(),
            cp.seq
        )),
        [..] => Ok(Some((cp.seq + 1, prev.0))),
    }
}

/// The newest rotated file of the log whose active file is `path`.
fn newest_rotated(path: &Path) -> io::Result<Option<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(None) };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut rotated: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix))
                    .is_some_and(|s| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    rotated.sort();
    Ok(rotated.pop())
}

/// Finds where the chain ends: the active file, else the newest rotated file. Cuts a torn
/// last line off the active file.
pub(super) fn find_tail(path: &Path) -> io::Result<Option<Tail>> {
    if let Some(tail) = file_tail(path, true)? {
        return Ok(Some(Tail { in_active: true, ..tail }));
    }
    match newest_rotated(path)? {
        Some(newest) => file_tail(&newest, false),
        None => Ok(None),
    }
}

/// The head after the last whole line of `path` and the log id from its first line; `None`
/// for a missing or empty file. `repair`: cut a torn last line off.
pub(super) fn file_tail(path: &Path, repair: bool) -> io::Result<Option<Tail>> {
    let invalid = |what: String| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
    };
    let mut file = match OpenOptions::new().read(true).write(repair).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut tail)?;
    let whole = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < tail.len() {
        if !repair {
            return Err(invalid("ends with a torn line".into()));
        }
        let keep = start + whole as u64;
        tracing::warn!(log = %path.display(), cut = len - keep, "audit log ends with a torn line (a crash mid-write, never acknowledged); cutting it off");
        file.set_len(keep)?;
        file.sync_data()?;
        if keep == 0 {
            return Ok(None);
        }
    }
    let body = &tail[..whole];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let last = body.rsplit(|&b| b == b'\n').next().unwrap_or_default();
    let record =
        Record::parse(last).map_err(|e| invalid(format!("last line is not a record: {e}")))?;
    file.seek(SeekFrom::Start(0))?;
    let mut first = Vec::new();
    std::io::BufRead::read_until(
        &mut io::BufReader::new(&mut file).take(TAIL_BYTES),
        b'\n',
        &mut first,
    )?;
    let first = Record::parse(first.strip_suffix(b"\n").unwrap_or(&first))
        .map_err(|e| invalid(format!("first line is not a record: {e}")))?;
    let log_id =
        first.log_id.clone().ok_or_else(|| invalid("first line names no log id".into()))?;
    let genesis_pubkey = if first.kind() == Kind::Genesis { first.pubkey.clone() } else { None };
    Ok(Some(Tail {
        head: Head { next_seq: record.seq + 1, prev: line_hash(last) },
        log_id,
        first_seq: first.seq,
        in_active: false,
        genesis_pubkey,
    }))
}
