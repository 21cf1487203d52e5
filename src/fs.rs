//! Private files and directories: the one place that creates, checks and replaces the
//! files that hold keys and records (keyrings, signing keys, the dev PKI, the audit log and
//! the embedded store).
//!
//! Guarantees: directories are created `0700`; a private file is never readable by others,
//! not even for an instant (it is created with its final mode, never `chmod`ed afterwards);
//! an atomic write either leaves the old file or the whole new one, synced.

use std::{
    fs::{DirBuilder, File, OpenOptions, Permissions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Creates `dir` and its missing parents with mode `0700`. An existing directory keeps
/// its mode (see [`restrict`]).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Sets `path`'s permission bits to `mode`.
pub fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(mode))
}

/// The permission bits of `path` if its group or others may read, write or run it (a key
/// file must not be shared); `None` when it is private to its owner.
pub fn shared_mode(path: &Path) -> io::Result<Option<u32>> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Writes `bytes` to `path` atomically: a fresh file created with `mode` next to it, synced,
/// then renamed into place (a stale temporary file from an earlier crash is replaced).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.write_all(bytes).and_then(|()| f.sync_all())?;
    std::fs::rename(&tmp, path)
}

/// Creates `path` with `bytes` and mode `mode`, refusing to replace an existing file.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(bytes).and_then(|()| f.sync_all())
}

/// Opens `path` for appending, creating it with mode `0600`.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

/// Makes a rename or create in `path`'s directory durable (best effort).
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_created_private_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        create_private_dir(&sub).unwrap();
        assert_eq!(std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777, 0o700);
        let key = sub.join("key");
        write_atomic(&key, b"one", 0o600).unwrap();
        assert_eq!(shared_mode(&key).unwrap(), None);
        std::fs::write(key.with_extension("tmp"), b"stale").unwrap();
        write_atomic(&key, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"two");
        assert!(!key.with_extension("tmp").exists());
        assert_eq!(
            write_new(&key, b"three", 0o600).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        restrict(&key, 0o640).unwrap();
        assert_eq!(shared_mode(&key).unwrap(), Some(0o640));
    }
}
