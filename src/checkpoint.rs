//! Checkpoints: one safetensors file per save holding the model
//! (`model.<var>`), the optimizer (`optim.<state>`) and the trainer state
//! (`state.step`, `state.batches`, `state.seed`). Written to a temporary
//! file, then renamed; `checkpoints/latest` (also replaced atomically) names
//! the newest. A run killed at any point leaves a complete checkpoint.
//!
//! RNG state needs no saving: the trainer reseeds libtorch from
//! `(train.seed, step)` at every step and data order depends on the seed and
//! the batch count only.

use std::collections::HashMap;
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

fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn save(
    dir: &Path,
    vs: &nn::VarStore,
    optim: Vec<(String, Tensor)>,
    state: TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let ckpt_dir = dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir).map_err(|e| Error::io(&ckpt_dir, e))?;
    let name = format!("step-{:08}.safetensors", state.step);
    let path = ckpt_dir.join(&name);
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
    tensors.push(("state.step".into(), Tensor::from(state.step)));
    tensors.push(("state.batches".into(), Tensor::from(state.batches)));
    tensors.push(("state.seed".into(), Tensor::from(state.seed)));
    write_atomic(&path, |tmp| {
        Tensor::write_safetensors(&tensors, tmp).map_err(Error::from)
    })?;
    write_atomic(&ckpt_dir.join("latest"), |tmp| {
        std::fs::write(tmp, &name).map_err(|e| Error::io(tmp, e))
    })?;
    prune(&ckpt_dir, keep.max(1))?;
    Ok(path)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(keep);
    for f in &files[..excess] {
        std::fs::remove_file(f).map_err(|e| Error::io(f, e))?;
    }
    Ok(())
}

/// The newest checkpoint of a run directory.
pub fn latest(run_dir: &Path) -> Result<PathBuf> {
    let pointer = run_dir.join("checkpoints").join("latest");
    let name = std::fs::read_to_string(&pointer).map_err(|e| {
        Error::Config(format!(
            "cannot resume from {}: no checkpoint ({}: {e})",
            run_dir.display(),
            pointer.display()
        ))
    })?;
    Ok(run_dir.join("checkpoints").join(name.trim()))
}

/// Load a checkpoint into `vs`; returns the optimizer state and counters.
pub fn load(path: &Path, vs: &mut nn::VarStore) -> Result<(HashMap<String, Tensor>, TrainerState)> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read checkpoint: {e}"),
    })?;
    let mut model = HashMap::new();
    let mut optim = HashMap::new();
    let mut state = HashMap::new();
    for (k, v) in tensors {
        if let Some(rest) = k.strip_prefix("model.") {
            model.insert(rest.to_string(), v);
        } else if let Some(rest) = k.strip_prefix("optim.") {
            optim.insert(rest.to_string(), v);
        } else if let Some(rest) = k.strip_prefix("state.") {
            state.insert(rest.to_string(), v.int64_value(&[]));
        }
    }
    let bad = |m: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: m,
    };
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
    Ok((optim, st))
}
