//! A data loader that stops making progress (a hung network file system, a
//! read that never returns) is named rather than waited on forever: the
//! loader's threads record what they read in a [`Reading`], and
//! [`receive`] warns after `data.stall_timeout` without progress, naming
//! that file or shard, and fails after three times that.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vlmatch_core::{Error, Result};

/// What the loader's threads read now, and a count of their progress
/// (files opened, images decoded, batches made). Shared by clones.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    what: Arc<Mutex<String>>,
    progress: Arc<AtomicU64>,
}

impl Reading {
    /// The threads now read `path` (an image file, a shard).
    pub fn path(&self, path: &Path) {
        self.set(&path.to_string_lossy());
    }

    /// The threads now read `what`. Reuses the buffer: no allocation once
    /// it has held a name this long.
    pub fn set(&self, what: &str) {
        let mut w = self.what.lock().unwrap_or_else(|e| e.into_inner());
        w.clear();
        w.push_str(what);
        drop(w);
        self.progressed();
    }

    /// Something was read or made.
    pub fn progressed(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn now(&self) -> (u64, String) {
        let what = self.what.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (self.progress.load(Ordering::Relaxed), what)
    }
}

/// The next message of `rx`, or `None` once its sender is gone. While none
/// comes, the loader is watched through `reading`: after `stall` without
/// progress a warning names what it reads; after three times `stall`
/// without progress, an error naming it.
pub fn receive<T>(rx: &Receiver<T>, stall: Duration, reading: &Reading) -> Result<Option<T>> {
    let stall = stall.max(Duration::from_millis(1));
    let (mut seen, _) = reading.now();
    let mut since = Instant::now();
    let mut warned = false;
    loop {
        let wait = (stall / 4).max(Duration::from_millis(1));
        match rx.recv_timeout(wait) {
            Ok(v) => return Ok(Some(v)),
            Err(RecvTimeoutError::Disconnected) => return Ok(None),
            Err(RecvTimeoutError::Timeout) => {}
        }
        let (progress, what) = reading.now();
        if progress != seen {
            (seen, since, warned) = (progress, Instant::now(), false);
            continue;
        }
        let idle = since.elapsed();
        let what = if what.is_empty() {
            "the data loader's first file".to_string()
        } else {
            what
        };
        if idle >= 3 * stall {
            return Err(Error::Data {
                path: PathBuf::from(&what),
                line: None,
                message: format!(
                    "the data loader made no progress for {:.0} s while reading this (3 x \
                     `data.stall_timeout` = {} s): is its storage hung? Raise \
                     `data.stall_timeout` if reads this slow are expected",
                    idle.as_secs_f64(),
                    stall.as_secs()
                ),
            });
        }
        if idle >= stall && !warned {
            warned = true;
            tracing::warn!(
                "the data loader has made no progress for {:.0} s; it is reading {what} \
                 (it stops after 3 x `data.stall_timeout` = {} s)",
                idle.as_secs_f64(),
                3 * stall.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn a_silent_loader_is_named_and_a_slow_one_is_not() {
        let reading = Reading::default();
        let (tx, rx) = sync_channel::<u32>(1);
        reading.set("/data/shard-0007.tar");
        let stall = Duration::from_millis(40);
        let e = receive(&rx, stall, &reading).unwrap_err().to_string();
        assert!(
            e.starts_with("/data/shard-0007.tar: the data loader made no progress"),
            "{e}"
        );
        // Progress every few ms keeps it waiting past 3 x stall.
        let r = reading.clone();
        let feeder = std::thread::spawn(move || {
            for i in 0..40 {
                std::thread::sleep(Duration::from_millis(5));
                r.set(&format!("image {i}"));
            }
            tx.send(7).unwrap();
        });
        assert_eq!(receive(&rx, stall, &reading).unwrap(), Some(7));
        feeder.join().unwrap();
        assert_eq!(receive(&rx, stall, &reading).unwrap(), None);
    }
}
