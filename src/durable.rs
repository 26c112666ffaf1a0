//! Durable writes, one helper for every file a crash must not leave half
//! written or lost: write a temporary file, sync it, rename it over the
//! target, sync the directory (so the rename itself survives a power cut).
//! Checkpoints, their `.crc32`, `latest`, the run's `config.toml`, the
//! logs cut back on resume, evaluation results, fine-tuning outputs and
//! NegGen's negatives all go through it; a directory (an export) is
//! replaced whole by [`replace_dir`].
//!
//! The file-system calls go through [`Fs`], so a unit test can record
//! their order ([`Recorder`]); [`REAL`] does them.

use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};

/// The file-system calls a durable write makes.
pub trait Fs {
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
    /// fsync a file's data and metadata.
    fn sync_file(&self, path: &Path) -> std::io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// fsync a directory, making the renames in it durable.
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()>;
    fn remove(&self, path: &Path) -> std::io::Result<()>;
}

/// The real file system.
pub struct RealFs;

/// The real file system, for callers.
pub const REAL: RealFs = RealFs;

impl Fs for RealFs {
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(path, bytes)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        // Opening a directory read-only and syncing it is how POSIX makes
        // its entries durable; some file systems refuse, which loses
        // nothing that was there to keep.
        match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            other => other,
        }
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// The temporary name a durable write of `path` uses.
pub fn temporary(path: &Path) -> PathBuf {
    suffixed(path, ".tmp")
}

/// `path` with `suffix` appended to its name.
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory of `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Make the file `tmp`, already written, durable as `path`: sync it,
/// rename it, sync the directory.
pub fn commit(fs: &dyn Fs, tmp: &Path, path: &Path) -> Result<()> {
    fs.sync_file(tmp).map_err(|e| Error::io(tmp, e))?;
    fs.rename(tmp, path).map_err(|e| Error::io(path, e))?;
    let dir = parent(path);
    fs.sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Write `bytes` to `path` durably (on `fs`).
pub fn write_with(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary(path);
    if let Err(e) = fs.write(&tmp, bytes) {
        let _ = fs.remove(&tmp);
        return Err(Error::io(&tmp, e));
    }
    commit(fs, &tmp, path)
}

/// Write `bytes` to `path` durably.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    write_with(&REAL, path, bytes.as_ref())
}

/// Write the directory `dir` whole, as `write` fills it: into a sibling
/// `DIR.partial`, every file and the directory synced, then swapped in by
/// renames. A crash leaves either the old `dir` (a stale `DIR.partial`
/// beside it is cleared by the next write) or, between the two renames,
/// the old contents as `DIR.replaced` and the complete new ones as
/// `DIR.partial`; never a half-written `dir`.
pub fn replace_dir(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (tmp, old) = (suffixed(dir, ".partial"), suffixed(dir, ".replaced"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write(&tmp)?;
    sync_tree(&tmp)?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    let parent = parent(dir);
    REAL.sync_dir(parent).map_err(|e| Error::io(parent, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// fsync every file and directory under `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            REAL.sync_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    REAL.sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// A file system that records each call (`write a`, `sync a`, `rename a ->
/// b`, `sync dir d`, `remove a`, with file names only) and does it on the
/// real one: for tests of the order of durable writes.
#[derive(Default)]
pub struct Recorder {
    pub calls: std::cell::RefCell<Vec<String>>,
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

impl Fs for Recorder {
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        self.calls
            .borrow_mut()
            .push(format!("write {}", name(path)));
        REAL.write(path, bytes)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        self.calls.borrow_mut().push(format!("sync {}", name(path)));
        REAL.sync_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.calls
            .borrow_mut()
            .push(format!("rename {} -> {}", name(from), name(to)));
        REAL.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.calls
            .borrow_mut()
            .push(format!("sync dir {}", name(dir)));
        REAL.sync_dir(dir)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.calls
            .borrow_mut()
            .push(format!("remove {}", name(path)));
        REAL.remove(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_syncs_the_file_then_renames_then_syncs_the_directory() {
        let dir = std::env::temp_dir().join(format!("vlmatch-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fs = Recorder::default();
        write_with(&fs, &dir.join("latest"), b"step-00000004.safetensors").unwrap();
        let d = name(&dir);
        assert_eq!(
            *fs.calls.borrow(),
            [
                "write latest.tmp".to_string(),
                "sync latest.tmp".into(),
                "rename latest.tmp -> latest".into(),
                format!("sync dir {d}"),
            ]
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("latest")).unwrap(),
            "step-00000004.safetensors"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
