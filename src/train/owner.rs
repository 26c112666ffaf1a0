//! A run directory has one owner: rank 0 holds an exclusive `flock` on
//! `run.lock` for the run's life (the kernel releases it when the process
//! ends, however it ends), with its pid and host written inside, so a
//! second trainer on the same directory stops naming the first. A new run
//! refuses a directory that holds another run's checkpoints unless told
//! `--force`, which moves them aside.
//!
//! `flock` is advisory and local: on a network file system (NFS without
//! lock support, some FUSE mounts) it may not exclude a trainer on another
//! machine; the pid and host in `run.lock` are then the only sign.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use vlmatch_core::{Error, Result};

/// The lock on a run directory, released when dropped (or the process
/// ends).
pub struct RunLock {
    _file: File,
}

/// Take `run_dir/run.lock` (creating the directory), or say who holds it.
pub fn lock(run_dir: &Path) -> Result<RunLock> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let path = run_dir.join("run.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !taken {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.split_whitespace().collect::<Vec<_>>().join(" ");
        return Err(Error::Config(format!(
            "{} is in use by another trainer ({}, per {}); wait for it to end or stop it \
             (on a network file system the lock may not be seen across machines)",
            run_dir.display(),
            if holder.is_empty() {
                "it has not written its pid yet".to_string()
            } else {
                holder
            },
            path.display()
        )));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| writeln!(file, "pid {} host {host}", std::process::id()))
        .map_err(|e| Error::io(&path, e))?;
    Ok(RunLock { _file: file })
}

/// A new run in `run_dir`: refuse a directory holding checkpoints (another
/// run's), unless `force`, which moves them to `checkpoints.old-SECONDS`.
pub fn claim(run_dir: &Path, force: bool) -> Result<()> {
    let ckpt = run_dir.join("checkpoints");
    let holds = std::fs::read_dir(&ckpt)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| crate::checkpoint::step_of(&e.path()).is_some())
        })
        .unwrap_or(false);
    if !holds {
        return Ok(());
    }
    if !force {
        return Err(Error::Config(format!(
            "{} holds another run's checkpoints; continue that run with `vlmatch train \
             --resume {}`, or start a new one there with --force (its checkpoints move to \
             checkpoints.old-TIME)",
            run_dir.display(),
            run_dir.display()
        )));
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = run_dir.join(format!("checkpoints.old-{secs}"));
    std::fs::rename(&ckpt, &aside).map_err(|e| Error::io(&aside, e))?;
    tracing::warn!(
        "--force: the checkpoints already in {} moved to {}",
        run_dir.display(),
        aside.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_one_is_free() {
        let dir = std::env::temp_dir().join(format!("vlmatch-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = lock(&dir).unwrap();
        // flock locks are per open file description: a second open in the
        // same process conflicts like another process would.
        let e = lock(&dir).err().expect("the lock is held").to_string();
        assert!(
            e.contains("in use by another trainer")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        lock(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_with_checkpoints_is_refused_unless_forced() {
        let dir = std::env::temp_dir().join(format!("vlmatch-claim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        claim(&dir, false).unwrap();
        std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
        std::fs::write(dir.join("checkpoints/step-00000004.safetensors"), b"x").unwrap();
        let e = claim(&dir, false).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--force"), "{e}");
        claim(&dir, true).unwrap();
        assert!(!dir.join("checkpoints").exists());
        let moved: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            moved.iter().any(|n| n.starts_with("checkpoints.old-")),
            "{moved:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
