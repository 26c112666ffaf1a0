//! Checkpoints: one safetensors file per save holding the model
//! (`model.<var>`), the optimizer (`optim.<state>`) and the trainer state
//! (`state.step`, `state.batches`, `state.seed`). Written to a temporary
//! file and synced, its CRC-32 and length recorded beside it
//! (`step-N.safetensors.crc32`), then renamed; `checkpoints/latest` (also
//! replaced atomically) names the newest. A run killed at any point leaves
//! a complete checkpoint, and a failed write (a full disk) leaves the
//! previous ones as they were. [`newest_intact`] verifies the checksum on
//! resume and falls back to an older checkpoint when the newest is damaged.
//!
//! RNG state needs no saving: the trainer reseeds libtorch from
//! `(train.seed, step)` at every step and data order depends on the seed and
//! the batch count only.
//!
//! A training checkpoint also records how the run split its batches
//! ([`Layout`]: `state.world_size`, `state.batch_size`), so that a resume
//! with another rank count can check that the global batch is unchanged.
//! In data-parallel training only rank 0 writes checkpoints.
//!
//! A checkpoint also holds the state of the run's hooks under each hook's
//! name (`<hook>.<name>`, [`crate::hooks`]): momentum distillation's
//! momentum model, ITC queues and queue pointer (`momentum.*`), which have
//! no gradient and are not in the optimizer.

use crate::fault::WriteFault;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};
use vlmatch_core::{Error, Result};

/// Trainer counters restored with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: i64,
    /// Micro-batches consumed from the loader.
    pub batches: i64,
    pub seed: i64,
}

/// How the run that wrote a checkpoint split each global batch: `world_size`
/// ranks of `batch_size` pairs. Checkpoints from before data-parallel
/// training have none (one process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub world_size: i64,
    pub batch_size: i64,
}

impl Layout {
    pub fn global_batch(&self) -> i64 {
        self.world_size * self.batch_size
    }

    /// Whether a run laid out as `self` may continue with `now`: the same
    /// global batch (so loader position and schedule line up). The error
    /// says what to set.
    pub fn check_resume(&self, now: Layout) -> Result<()> {
        if self.global_batch() == now.global_batch() {
            return Ok(());
        }
        let g = self.global_batch();
        let was = format!(
            "this run used {} rank{} x train.batch_size {} = global batch {g}",
            self.world_size,
            if self.world_size == 1 { "" } else { "s" },
            self.batch_size
        );
        let fix = if g % now.world_size == 0 {
            format!(
                "with {} rank{} set --set train.batch_size={}",
                now.world_size,
                if now.world_size == 1 { "" } else { "s" },
                g / now.world_size
            )
        } else {
            let fits: Vec<String> = (1..=g)
                .filter(|w| g % w == 0)
                .map(|w| w.to_string())
                .collect();
            format!(
                "{} ranks cannot split it evenly; resume with a rank count that divides {g} \
                 ({}) and train.batch_size = {g} / ranks",
                now.world_size,
                fits.join(", ")
            )
        };
        Err(Error::Config(format!(
            "cannot resume with {} rank{} x train.batch_size {} = global batch {}: {was}; {fix}",
            now.world_size,
            if now.world_size == 1 { "" } else { "s" },
            now.batch_size,
            now.global_batch()
        )))
    }
}

pub fn save(
    dir: &Path,
    vs: &nn::VarStore,
    optim: Vec<(String, Tensor)>,
    state: TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    save_with_layout(dir, vs, optim, Vec::new(), state, None, keep)
}

/// [`save`], recording the run's [`Layout`] and `extra` tensors under
/// their own names (the hooks' state, `<hook>.<name>`).
pub fn save_with_layout(
    dir: &Path,
    vs: &nn::VarStore,
    optim: Vec<(String, Tensor)>,
    extra: Vec<(String, Tensor)>,
    state: TrainerState,
    layout: Option<Layout>,
    keep: usize,
) -> Result<PathBuf> {
    let tensors = checkpoint_tensors(vs, optim, extra, state, layout);
    save_tensors(&crate::durable::REAL, dir, &tensors, state.step, keep)
}

/// Everything a checkpoint holds, by name, on the CPU.
fn checkpoint_tensors(
    vs: &nn::VarStore,
    optim: Vec<(String, Tensor)>,
    extra: Vec<(String, Tensor)>,
    state: TrainerState,
    layout: Option<Layout>,
) -> Vec<(String, Tensor)> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, v) in vs.variables() {
        tensors.push((
            format!("model.{k}"),
            v.detach().to_device(Device::Cpu).contiguous(),
        ));
    }
    for (k, v) in optim {
        tensors.push((
            format!("optim.{k}"),
            v.detach().to_device(Device::Cpu).contiguous(),
        ));
    }
    for (k, v) in extra {
        debug_assert!(!["model.", "optim.", "state."]
            .iter()
            .any(|p| k.starts_with(p)));
        tensors.push((k, v.detach().to_device(Device::Cpu).contiguous()));
    }
    tensors.push(("state.step".into(), Tensor::from(state.step)));
    tensors.push(("state.batches".into(), Tensor::from(state.batches)));
    tensors.push(("state.seed".into(), Tensor::from(state.seed)));
    if let Some(l) = layout {
        tensors.push(("state.world_size".into(), Tensor::from(l.world_size)));
        tensors.push(("state.batch_size".into(), Tensor::from(l.batch_size)));
    }
    tensors
}

/// Write checkpoint `step` of `dir` on `fs`: the file synced, its checksum
/// written durably, the file renamed to its name and the directory synced,
/// then `latest` written durably; only then are old checkpoints pruned, so
/// a power cut at any point leaves an intact checkpoint `latest` names.
fn save_tensors(
    fs: &dyn crate::durable::Fs,
    dir: &Path,
    tensors: &[(String, Tensor)],
    step: i64,
    keep: usize,
) -> Result<PathBuf> {
    let fault = WriteFault::from_env().filter(|f| f.step == step);
    let ckpt_dir = dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir).map_err(|e| Error::io(&ckpt_dir, e))?;
    let name = format!("step-{step:08}.safetensors");
    let path = ckpt_dir.join(&name);
    let tmp = crate::durable::temporary(&path);
    let written = write_verified(fs, tensors, &tmp, &path, fault);
    if written.is_err() {
        // Nothing half-written stays behind; the previous checkpoints and
        // `latest` are untouched.
        let _ = fs.remove(&tmp);
        let _ = fs.remove(&check_path(&path));
    }
    written?;
    crate::durable::write_with(fs, &ckpt_dir.join("latest"), name.as_bytes())?;
    prune(fs, &ckpt_dir, keep.max(1))?;
    Ok(path)
}

/// The checksum file beside a checkpoint.
fn check_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".crc32");
    PathBuf::from(name)
}

/// CRC-32 and length of a file.
fn crc32_of(path: &Path) -> std::io::Result<(u32, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finalize(), len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// Write `tensors` to `tmp`, sync it, record its checksum beside `path`,
/// then rename it to `path`. `fault` (tests only) cuts the written file
/// at a byte and fails or kills the process there.
fn write_verified(
    fs: &dyn crate::durable::Fs,
    tensors: &[(String, Tensor)],
    tmp: &Path,
    path: &Path,
    fault: Option<WriteFault>,
) -> Result<()> {
    Tensor::write_safetensors(tensors, tmp).map_err(|e| Error::Data {
        path: tmp.to_path_buf(),
        line: None,
        message: format!("cannot write checkpoint: {e}"),
    })?;
    if let Some(f) = fault {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp)
            .map_err(|e| Error::io(tmp, e))?;
        let len = file.metadata().map_err(|e| Error::io(tmp, e))?.len();
        file.set_len(f.bytes.min(len))
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(tmp, e))?;
        if f.abort {
            tracing::warn!(path = %tmp.display(), bytes = f.bytes, "fault injection: SIGKILL inside a checkpoint write");
            // SAFETY: kill(2) on our own pid; nothing runs after it.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        return Err(Error::io(
            tmp,
            std::io::Error::other(format!(
                "write failed after {} bytes (injected fault)",
                f.bytes
            )),
        ));
    }
    fs.sync_file(tmp).map_err(|e| Error::io(tmp, e))?;
    let (crc, len) = crc32_of(tmp).map_err(|e| Error::io(tmp, e))?;
    crate::durable::write_with(
        fs,
        &check_path(path),
        format!("{crc:08x} {len}\n").as_bytes(),
    )?;
    fs.rename(tmp, path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs.sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Whether the checkpoint at `path` is whole: its length and CRC-32 match
/// what was recorded when it was written. `Err` says what is wrong.
/// Checkpoints written before checksums were recorded have none: they pass
/// if their safetensors header and sizes read back.
pub fn verify(path: &Path) -> std::result::Result<(), String> {
    let check = check_path(path);
    let (crc, len) = crc32_of(path).map_err(|e| format!("cannot read it: {e}"))?;
    match std::fs::read_to_string(&check) {
        Ok(text) => {
            let mut it = text.split_whitespace();
            let want_crc = it.next().and_then(|x| u32::from_str_radix(x, 16).ok());
            let want_len = it.next().and_then(|x| x.parse::<u64>().ok());
            match (want_crc, want_len) {
                (Some(c), Some(l)) if (c, l) == (crc, len) => Ok(()),
                (Some(c), Some(l)) => Err(format!(
                    "{len} bytes with CRC-32 {crc:08x}, but {l} bytes with CRC-32 {c:08x} were \
                     written ({})",
                    check.display()
                )),
                _ => Err(format!("its checksum file {} is garbled", check.display())),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Tensor::read_safetensors(path)
            .map(|_| ())
            .map_err(|e| format!("cannot read it: {e}")),
        Err(e) => Err(format!("cannot read {}: {e}", check.display())),
    }
}

/// The step of a checkpoint file name (`step-00000012.safetensors`).
pub fn step_of(path: &Path) -> Option<i64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| step_of(p).is_some())
        .collect();
    files.sort_by_key(|p| step_of(p));
    Ok(files)
}

fn prune(fs: &dyn crate::durable::Fs, dir: &Path, keep: usize) -> Result<()> {
    let files = checkpoint_files(dir)?;
    let excess = files.len().saturating_sub(keep);
    for f in &files[..excess] {
        fs.remove(f).map_err(|e| Error::io(f, e))?;
        let _ = fs.remove(&check_path(f));
    }
    Ok(())
}

/// The newest checkpoint of a run directory that passes [`verify`]: the
/// one `latest` names, or, if that one is damaged or missing, the newest
/// intact one before it, with a warning naming both. Removes what a write
/// cut short left behind (`*.tmp`).
pub fn newest_intact(run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir.join("checkpoints");
    // Without a readable `latest` (a crash before the first one was
    // written completes nothing; a damaged one can), the newest file.
    let named = match latest(run_dir) {
        Ok(p) => p,
        Err(e) => match checkpoint_files(&dir).ok().and_then(|f| f.last().cloned()) {
            Some(p) => {
                tracing::warn!("{e}; taking the newest checkpoint file, {}", p.display());
                p
            }
            None => return Err(e),
        },
    };
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let problem = if named.is_file() {
        match verify(&named) {
            Ok(()) => return Ok(named),
            Err(why) => why,
        }
    } else {
        "it does not exist".to_string()
    };
    let newest = step_of(&named).unwrap_or(i64::MAX);
    let mut older: Vec<PathBuf> = checkpoint_files(&dir)?
        .into_iter()
        .filter(|p| step_of(p).is_some_and(|s| s < newest))
        .collect();
    older.reverse();
    let mut also_damaged = Vec::new();
    for p in older {
        match verify(&p) {
            Ok(()) => {
                tracing::warn!(
                    "the newest checkpoint {} is damaged ({problem}){}; resuming from {} instead",
                    named.display(),
                    if also_damaged.is_empty() {
                        String::new()
                    } else {
                        format!(", and so are {}", also_damaged.join(", "))
                    },
                    p.display()
                );
                return Ok(p);
            }
            Err(_) => also_damaged.push(p.display().to_string()),
        }
    }
    Err(Error::Data {
        path: named,
        line: None,
        message: format!(
            "the newest checkpoint is damaged ({problem}) and no older intact checkpoint is left in \
             {}; start the run again without --resume",
            dir.display()
        ),
    })
}

/// The newest checkpoint of a run directory.
pub fn latest(run_dir: &Path) -> Result<PathBuf> {
    let pointer = run_dir.join("checkpoints").join("latest");
    let name = std::fs::read_to_string(&pointer).map_err(|e| {
        Error::Config(format!(
            "{} holds no checkpoint ({}: {e}); is it a run directory that trained at least \
             to its first checkpoint?",
            run_dir.display(),
            pointer.display()
        ))
    })?;
    let name = name.trim();
    // Only a checkpoint's file name in its own directory: never a path
    // that leads to another run's weights.
    let path = run_dir.join("checkpoints").join(name);
    if Path::new(name).components().count() != 1 || step_of(&path).is_none() {
        return Err(Error::Data {
            path: pointer,
            line: Some(1),
            message: format!(
                "names `{name}`; expected a checkpoint file name in this directory, such as \
                 `step-00000012.safetensors`"
            ),
        });
    }
    Ok(path)
}

/// Load a checkpoint into `vs`; returns the optimizer state and counters.
pub fn load(path: &Path, vs: &nn::VarStore) -> Result<(HashMap<String, Tensor>, TrainerState)> {
    load_with_layout(path, vs).map(|(optim, state, _)| (optim, state))
}

/// [`load`], also returning the [`Layout`] the checkpoint records.
pub fn load_with_layout(
    path: &Path,
    vs: &nn::VarStore,
) -> Result<(HashMap<String, Tensor>, TrainerState, Option<Layout>)> {
    load_full(path, vs).map(|l| (l.optim, l.state, l.layout))
}

/// A counter read from a checkpoint: a one-element integer tensor.
pub fn scalar_i64(t: &Tensor) -> std::result::Result<i64, String> {
    let integer = matches!(
        t.kind(),
        tch::Kind::Int64 | tch::Kind::Int | tch::Kind::Int16 | tch::Kind::Int8 | tch::Kind::Uint8
    );
    if t.numel() != 1 || !integer {
        return Err(format!(
            "expected one integer, found a {:?} tensor of shape {:?}",
            t.kind(),
            t.size()
        ));
    }
    Ok(t.int64_value(&[]))
}

/// Everything [`load_full`] reads besides the model.
pub struct Loaded {
    pub optim: HashMap<String, Tensor>,
    pub state: TrainerState,
    pub layout: Option<Layout>,
    /// The hooks' tensors and counters (`<hook>.<name>`), by full name.
    pub extra: HashMap<String, Tensor>,
}

/// [`load_with_layout`], also returning the hooks' (`<hook>.*`) tensors.
pub fn load_full(path: &Path, vs: &nn::VarStore) -> Result<Loaded> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read checkpoint: {e}"),
    })?;
    let mut model = HashMap::new();
    let mut optim = HashMap::new();
    let mut state = HashMap::new();
    let mut extra = HashMap::new();
    let bad = |m: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: m,
    };
    for (k, v) in tensors {
        if let Some(rest) = k.strip_prefix("model.") {
            model.insert(rest.to_string(), v);
        } else if let Some(rest) = k.strip_prefix("optim.") {
            optim.insert(rest.to_string(), v);
        } else if let Some(rest) = k.strip_prefix("state.") {
            let value = scalar_i64(&v).map_err(|m| bad(format!("`{k}`: {m}")))?;
            state.insert(rest.to_string(), value);
        } else {
            extra.insert(k, v);
        }
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vs.variables() {
            let t = model.get(&name).ok_or_else(|| {
                bad(format!(
                    "checkpoint lacks model tensor `{name}`; was it saved with another config?"
                ))
            })?;
            if t.size() != var.size() {
                return Err(bad(format!(
                    "model tensor `{name}` has shape {:?} in the checkpoint but {:?} in the model",
                    t.size(),
                    var.size()
                )));
            }
            var.copy_(t);
        }
        Ok(())
    })?;
    let get = |k: &str| {
        state
            .get(k)
            .copied()
            .ok_or_else(|| bad(format!("checkpoint lacks `state.{k}`")))
    };
    let st = TrainerState {
        step: get("step")?,
        batches: get("batches")?,
        seed: get("seed")?,
    };
    let layout = match (state.get("world_size"), state.get("batch_size")) {
        (Some(&world_size), Some(&batch_size)) => Some(Layout {
            world_size,
            batch_size,
        }),
        _ => None,
    };
    Ok(Loaded {
        optim,
        state: st,
        layout,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saving syncs the checkpoint, writes its checksum durably, renames it
    /// and syncs the directory, writes `latest` durably, and prunes last.
    #[test]
    fn a_checkpoint_is_durable_before_latest_names_it_and_pruning_comes_last() {
        let dir = std::env::temp_dir().join(format!("vlmatch-ckpt-order-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tensors = vec![("state.step".to_string(), Tensor::from(1i64))];
        save_tensors(&crate::durable::REAL, &dir, &tensors, 1, 1).unwrap();
        let fs = crate::durable::Recorder::default();
        save_tensors(&fs, &dir, &tensors, 2, 1).unwrap();
        let (c, t) = ("step-00000002.safetensors", "step-00000002.safetensors.tmp");
        let want: Vec<String> = [
            format!("sync {t}"),
            format!("write {c}.crc32.tmp"),
            format!("sync {c}.crc32.tmp"),
            format!("rename {c}.crc32.tmp -> {c}.crc32"),
            "sync dir checkpoints".into(),
            format!("rename {t} -> {c}"),
            "sync dir checkpoints".into(),
            "write latest.tmp".into(),
            "sync latest.tmp".into(),
            "rename latest.tmp -> latest".into(),
            "sync dir checkpoints".into(),
            "remove step-00000001.safetensors".into(),
            "remove step-00000001.safetensors.crc32".into(),
        ]
        .into();
        assert_eq!(*fs.calls.borrow(), want);
        assert_eq!(
            newest_intact(&dir).unwrap(),
            dir.join("checkpoints").join(c)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_needs_the_same_global_batch_and_says_what_to_set() {
        let was = Layout {
            world_size: 2,
            batch_size: 8,
        };
        assert!(was.check_resume(was).is_ok());
        let four = Layout {
            world_size: 4,
            batch_size: 4,
        };
        assert!(was.check_resume(four).is_ok());
        let e = was
            .check_resume(Layout {
                world_size: 4,
                batch_size: 8,
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("this run used 2 ranks x train.batch_size 8 = global batch 16")
                && e.contains("with 4 ranks set --set train.batch_size=4"),
            "{e}"
        );
        let e = was
            .check_resume(Layout {
                world_size: 3,
                batch_size: 8,
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("divides 16 (1, 2, 4, 8, 16)"), "{e}");
    }
}
