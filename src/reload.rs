//! Hot reload of file-backed values: the keyring, the policy, the server certificate and key,
//! and the client trust (CA bundle and CRLs).
//!
//! A [`Reloadable`] holds the last good value. A background task re-reads the file when its
//! contents change (checked every interval) and on SIGHUP; a new file that fails to load is
//! refused with an error log line and the last good value stays in force. Readers take a
//! cheap `Arc` snapshot, so a reload never blocks a request and a request never sees half
//! of an old value and half of a new one.

use std::{
    fmt::Display,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use sha2::{Digest, Sha256};

/// A value loaded from a file, swapped atomically on reload.
pub struct Reloadable<T> {
    current: RwLock<Arc<T>>,
    last_error: RwLock<Option<String>>,
    path: PathBuf,
    /// Further files read by the loader (a private key next to its certificate): a change
    /// to any of them is a change.
    also: Vec<PathBuf>,
    what: &'static str,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Reloadable").field("what", &self.what).field("current", &*current).finish()
    }
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Wraps an initial value loaded from `path`.
    pub fn new(value: T, path: &Path, what: &'static str) -> Arc<Self> {
        Self::with_files(value, path, &[], what)
    }

    /// Like [`Reloadable::new`], for a value whose loader also reads the files `also`.
    pub fn with_files(value: T, path: &Path, also: &[&Path], what: &'static str) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(value)),
            last_error: RwLock::new(None),
            path: path.to_owned(),
            also: also.iter().map(|p| p.to_path_buf()).collect(),
            what,
        })
    }

    /// What it is (`keyring`, `policy`, `client trust`): in logs and metrics.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        // A poisoned lock only means a writer panicked mid-swap; the Arc inside is whole.
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Why the newest version of the file was refused, if it was (cleared by a good reload).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the file again with `load`; on success the new value is in force, on failure
    /// the error is kept for [`Reloadable::last_error`] and the old value stays.
    pub fn reload<E: Display>(&self, load: impl Fn(&Path) -> Result<T, E>) -> Result<Arc<T>, E> {
        let mut last_error = self.last_error.write().unwrap_or_else(|e| e.into_inner());
        match load(&self.path) {
            Ok(value) => {
                let value = Arc::new(value);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&value);
                *last_error = None;
                Ok(value)
            }
            Err(e) => {
                *last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Puts `value` in force and clears the last error: for a value that does not come from
    /// its files (the policy kept in the store).
    pub fn replace(&self, value: T) -> Arc<T> {
        let mut last_error = self.last_error.write().unwrap_or_else(|e| e.into_inner());
        let value = Arc::new(value);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&value);
        *last_error = None;
        value
    }

    /// Forgets a refusal that no longer holds (the refused version is gone).
    pub fn clear_error(&self) {
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Records why a newer version was refused; the value in force stays.
    pub fn refuse(&self, why: String) {
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Spawns the watcher: reload when the contents of its files change (polled every `interval`)
    /// or on SIGHUP. `describe` names the new value in the log (e.g. its version).
    pub fn watch<E, L, D>(
        self: &Arc<Self>,
        interval: Duration,
        load: L,
        describe: D,
    ) -> tokio::task::JoinHandle<()>
    where
        E: Display,
        L: Fn(&Path) -> Result<T, E> + Send + Sync + 'static,
        D: Fn(&T) -> String + Send + Sync + 'static,
    {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // Signal registration fails only without a signal driver; polling still works.
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut last = this.digest();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let now = this.digest();
                if !forced && now == last {
                    continue;
                }
                last = now;
                match this.reload(&load) {
                    Ok(v) => {
                        tracing::info!(what = this.what, path = %this.path.display(), version = %describe(&v), "reloaded")
                    }
                    Err(e) => {
                        crate::metrics::reload_failed(this.what);
                        tracing::error!(
                            what = this.what, path = %this.path.display(), error = %e,
                            "reload refused; the last good version stays in force"
                        )
                    }
                }
            }
        })
    }
}

impl<T> Reloadable<T> {
    /// The digest of every file the value is loaded from (see [`digest`]); `None` if one
    /// cannot be read.
    fn digest(&self) -> Option<Vec<[u8; 32]>> {
        std::iter::once(&self.path).chain(&self.also).map(|p| digest(p)).collect()
    }
}

/// SHA-256 of the file's permission bits and bytes — or, for a directory, of the names, modes
/// and bytes of every file below it in sorted order — or `None` if it cannot be read (a
/// missing file is a change the reload then reports). The mode is in it so that a `chmod`
/// alone is a change too: a keyring made readable by others is refused at the next check.
fn digest(path: &Path) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    feed(&mut h, path, 0)?;
    Some(h.finalize().into())
}

fn feed(h: &mut Sha256, path: &Path, depth: usize) -> Option<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    h.update(mode.to_be_bytes());
    if path.is_dir() {
        // Policy directories are shallow; the bound keeps a symlink loop from recursing.
        if depth > 4 {
            return Some(());
        }
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for e in entries {
            h.update(e.as_os_str().as_encoded_bytes());
            feed(h, &e, depth + 1)?;
        }
    } else {
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).ok()?);
        h.update(&*bytes);
    }
    Some(())
}
