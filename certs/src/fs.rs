//! Small file helpers: atomic writes with an exact mode from the first byte.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Mode for certificates and other public material.
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Mode for private keys.
pub(crate) const SECRET_MODE: u32 = 0o600;
/// Mode for directories this crate creates.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and missing parents) with mode 0700; an existing directory is left alone.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| Error::Io {
            op: "create directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `contents` to `path` atomically (temp file + rename in the same directory).
///
/// The temp file is created with `mode` (`O_CREAT|O_EXCL`), so a key is never readable by
/// others, not even between create and chmod; `fchmod` then pins the mode regardless of umask.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { op, path, source }
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temp_path(dir, path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(io("set permissions on", &tmp))?;
        file.write_all(contents).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename into place", path))
    })();
    if result.is_err() {
        // Best effort: do not leave a half-written temp file behind.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_path(dir: &Path, target: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Reads a UTF-8 file.
pub(crate) fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}
