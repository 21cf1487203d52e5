//! The log's files: writing chained lines, noticing a removed or replaced file, rotation.

use super::*;

impl State {
    /// Chains `records` (and a checkpoint if `checkpoint`), writes them in one write and
    /// syncs; returns the sequence number of the first. All lines of one write carry the
    /// same timestamp. On failure the file is cut back and the head is unchanged.
    pub(super) fn write(&mut self, records: &[&Body], checkpoint: bool) -> io::Result<u64> {
        let mut head = self.head.clone();
        let first = head.next_seq;
        let ts = crate::clock::now_rfc3339_millis();
        let size: usize = records.iter().map(|b| b.len() + 128).sum();
        let mut buf = Vec::with_capacity(size + if checkpoint { 512 } else { 0 });
        let chain = |body: &Body, buf: &mut Vec<u8>, head: &mut Head| {
            let start = buf.len();
            write_line(buf, head.next_seq, &ts, body, &head.prev);
            head.prev = line_hash(&buf[start..]);
            head.next_seq += 1;
            buf.push(b'\n');
            start..buf.len() - 1
        };
        for body in records {
            chain(body, &mut buf, &mut head);
        }
        let mut cp_line = None;
        if checkpoint {
            let mut cp = Record::new(Kind::Checkpoint);
            cp.log_id = Some(self.log_id.clone());
            if self.stopping {
                cp.reason = Some(FINAL_CHECKPOINT.into());
            }
            let msg = checkpoint_message(&self.log_id, head.next_seq, &ts, &head.prev);
            cp.sig = Some(self.key.sign(&msg));
            let line = chain(&cp.body(), &mut buf, &mut head);
            cp_line = Some(String::from_utf8_lossy(&buf[line]).into_owned());
        }
        let syncing = Instant::now();
        let result = self.file.write_all(&buf).and_then(|()| self.file.sync_data());
        let took = syncing.elapsed();
        self.sync_time = (self.sync_time * 7 + took) / 8;
        if let Err(e) = result {
            // Cut back anything partly written, so the file ends with a whole durable line.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(e);
        }
        self.len += buf.len() as u64;
        let written = records.len() as u64 + u64::from(cp_line.is_some());
        self.shared.records.fetch_add(written, Ordering::Relaxed);
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.shared.sync_micros.fetch_add(micros, Ordering::Relaxed);
        crate::metrics::audit_written(written, took);
        self.since_checkpoint += records.len() as u64;
        self.head = head;
        if let Some(line) = cp_line {
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
            let _ = self.checkpoints.send((self.log_id.clone(), line.clone()));
            self.last_checkpoint_line = Some(line);
        }
        Ok(first)
    }

    /// Notices a removed or replaced active file and starts a new one in its place.
    pub(super) fn check_file(&mut self) -> io::Result<()> {
        let same = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()) == self.ino);
        match same {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => {
                tracing::error!(log = %self.path.display(), "the audit log file was removed or replaced; starting a new file that continues the chain");
                self.start_file("the log file was removed or replaced")
            }
        }
    }

    /// Ends the active file with a checkpoint, renames it, and starts a new one.
    pub(super) fn rotate(&mut self, reason: &str) -> io::Result<()> {
        if self.since_checkpoint > 0 || self.last_checkpoint_line.is_none() {
            self.write(&[], true)?;
        }
        let rotated = rotated_name(&self.path, self.first_seq);
        std::fs::rename(&self.path, &rotated)?;
        sync_dir(&self.path);
        tracing::info!(rotated = %rotated.display(), "audit log rotated");
        self.start_file(reason)
    }

    pub(super) fn start_file(&mut self, reason: &str) -> io::Result<()> {
        let file = open_append(&self.path)?;
        let meta = file.metadata()?;
        (self.file, self.ino, self.len) = (file, (meta.dev(), meta.ino()), meta.len());
        sync_dir(&self.path);
        self.first_seq = self.head.next_seq;
        let mut r = Record::new(Kind::Continue);
        r.log_id = Some(self.log_id.clone());
        r.reason = Some(reason.into());
        self.write(&[&r.body()], false).map(drop)
    }
}

/// Where a rotated file goes.
pub fn rotated_name(path: &Path, first_seq: u64) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{first_seq:020}"));
    p.into()
}

pub(super) fn random_id() -> io::Result<String> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(hex::encode(id))
}
