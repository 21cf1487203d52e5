//! The highest version of each control object this replica has put in force, kept in a
//! local file (`replica.state_file`), so that the forward-only rule survives a restart: a
//! replica that finds the store's newest usable version lower than its mark (the newest
//! versions deleted, or the store restored from an older backup) refuses to start instead of
//! enforcing an older policy, keyring or client trust. Marks are per store (etcd prefix or
//! embedded file): pointing a replica at another store starts afresh.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::ControlError;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The store the marks are for.
    store: String,
    /// Kind to the highest version put in force.
    accepted: BTreeMap<String, u64>,
}

/// See the module docs.
#[derive(Debug)]
pub struct HighWater {
    /// `None`: no state file (`replica.state_file = ""`): nothing survives a restart.
    path: Option<PathBuf>,
    file: Mutex<File>,
}

impl HighWater {
    /// The marks kept in `path` for `store` (none yet when the file is missing, or holds
    /// another store's marks).
    pub fn load(path: &Path, store: &str) -> Result<Self, ControlError> {
        if path.as_os_str().is_empty() {
            return Ok(Self { path: None, file: Mutex::default() });
        }
        let unreadable = |why: String| {
            ControlError::Refused(format!("replica.state_file {}: {why}", path.display()))
        };
        let file = match std::fs::read(path) {
            Ok(bytes) => {
                let file: File =
                    serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
                if file.store == store {
                    file
                } else {
                    tracing::warn!(state_file = %path.display(), was = %file.store, now = %store, "the state file's marks are for another store; starting afresh");
                    File { store: store.to_owned(), ..File::default() }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                File { store: store.to_owned(), ..File::default() }
            }
            Err(e) => return Err(unreadable(e.to_string())),
        };
        Ok(Self { path: Some(path.to_owned()), file: Mutex::new(file) })
    }

    /// The highest version of `kind` put in force here (0: none).
    pub fn mark(&self, kind: &str) -> u64 {
        self.lock().accepted.get(kind).copied().unwrap_or(0)
    }

    /// Records that `version` of `kind` is in force, if higher than the mark: written to the
    /// file at once (atomically). A failed write is logged; the mark in memory still holds.
    pub fn raise(&self, kind: &str, version: u64) {
        let mut file = self.lock();
        let mark = file.accepted.entry(kind.to_owned()).or_default();
        if version <= *mark {
            return;
        }
        *mark = version;
        let Some(path) = &self.path else { return };
        let written = serde_json::to_vec_pretty(&*file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fs::write_atomic(path, &bytes, 0o600));
        if let Err(e) = written {
            tracing::error!(state_file = %path.display(), error = %e, "cannot record the control versions in force; a restart could not tell a rolled-back store");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, File> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_rise_survive_a_reload_and_are_per_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let marks = HighWater::load(&path, "etcd prefix /a/").unwrap();
        assert_eq!(marks.mark("policy"), 0);
        marks.raise("policy", 3);
        marks.raise("policy", 2);
        marks.raise("keyring", 1);
        let again = HighWater::load(&path, "etcd prefix /a/").unwrap();
        assert_eq!((again.mark("policy"), again.mark("keyring")), (3, 1));
        assert_eq!(HighWater::load(&path, "etcd prefix /b/").unwrap().mark("policy"), 0);
        std::fs::write(&path, "garbage").unwrap();
        assert!(HighWater::load(&path, "etcd prefix /a/").is_err());
        let off = HighWater::load(Path::new(""), "x").unwrap();
        off.raise("policy", 9);
        assert_eq!(off.mark("policy"), 9);
    }
}
