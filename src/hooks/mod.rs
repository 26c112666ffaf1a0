//! The trainer's hooks ([`vlmatch_core::Hook`]): the run's list, built from
//! the registry, and the calls the trainer makes at each point, in order.
//! The hooks this crate registers: `momentum` (ALBEF's momentum
//! distillation, [`crate::momentum`]), `heldout` (periodic and final
//! held-out evaluation), `tensorboard`, `progress` (the display) and
//! `fault` (the fault tests' injected failures).
//!
//! State: each hook's [`HookState`] is saved in checkpoints under
//! `<hook>.<name>` (tensors as they are, counters as `i64` scalars),
//! restored on resume, and broadcast from rank 0 to the other ranks.

pub mod fault;
pub mod heldout;
pub mod progress;
pub mod tensorboard;

use crate::data::Dataset;
use crate::tokenizer::Tokenizer;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Tensor};
use vlmatch_core::{Error, Evaluation, Forward, HookState, Record, Result, RunEnd, RunStart};
use vlmatch_core::{Hook, VlModel};
use vlmatch_registry::hooks::{build_hooks, BuiltHook, HookContext};

/// Hooks the command line turns on, rather than the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    /// Show the progress display (`--progress`, rank 0).
    pub progress: bool,
    /// A failure to inject (`--fault`, the fault tests).
    pub fault: Option<crate::fault::Fault>,
}

/// What the trainer offers this crate's hooks (through
/// [`HookContext::host`]).
pub struct Resources {
    pub flags: Flags,
    pub tokenizer: Arc<Tokenizer>,
    /// The held-out pairs, when the data has a held-out split.
    pub heldout: Option<Arc<Dataset>>,
    /// The held-out evaluation after the last step, for the summary.
    pub final_heldout: Rc<RefCell<Option<crate::eval::HeldOut>>>,
}

/// The run's hooks in the order they run.
#[derive(Default)]
pub struct Hooks {
    list: Vec<BuiltHook>,
}

impl Hooks {
    /// No hooks (the benchmark's step).
    pub fn none() -> Hooks {
        Hooks::default()
    }

    /// Every registered hook the run turns on, built-in or from a plugin
    /// library; `ctx` is the run's context (any `name`), whose `host` is
    /// this crate's [`Resources`].
    pub fn build(ctx: &HookContext<'_>) -> Result<Hooks> {
        let registry = crate::libraries::registry(ctx.loaded)?;
        let list = build_hooks(&registry, ctx)?;
        tracing::debug!(hooks = ?list.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), "hooks");
        Ok(Hooks { list })
    }

    /// The names of the hooks, in run order.
    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|h| h.name.as_str()).collect()
    }

    /// A hook by name (tests).
    pub fn get(&self, name: &str) -> Option<&dyn Hook> {
        self.list.iter().find(|h| h.name == name).map(|h| &*h.hook)
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn Hook) -> Result<()>) -> Result<()> {
        self.list.iter_mut().try_for_each(|h| f(&mut *h.hook))
    }

    pub fn on_start(&mut self, start: RunStart) -> Result<()> {
        self.each(|h| h.on_start(start))
    }

    pub fn before_step(&self, step: i64) {
        self.list.iter().for_each(|h| h.hook.before_step(step));
    }

    pub fn before_forward<'a>(&'a self, forward: Forward<'a>) -> Forward<'a> {
        self.list
            .iter()
            .fold(forward, |f, h| h.hook.before_forward(f))
    }

    pub fn after_objectives(&self, forward: &Forward<'_>) {
        self.list
            .iter()
            .for_each(|h| h.hook.after_objectives(forward));
    }

    pub fn before_backward(&self, step: i64, loss: Tensor) -> Tensor {
        self.list
            .iter()
            .fold(loss, |l, h| h.hook.before_backward(step, l))
    }

    pub fn after_optimizer_step(&self, applied: &Tensor) {
        self.list
            .iter()
            .for_each(|h| h.hook.after_optimizer_step(applied));
    }

    /// The scalars hooks add to the line logged after `step`.
    pub fn on_log(&mut self, step: i64) -> Vec<(String, f64)> {
        let mut line = Vec::new();
        for h in &mut self.list {
            h.hook.on_log(step, &mut line);
        }
        line
    }

    pub fn on_record(&mut self, record: Record<'_>) -> Result<()> {
        self.each(|h| h.on_record(record))
    }

    /// Whether a hook evaluates after `step`.
    pub fn evaluates_at(&self, step: i64) -> bool {
        self.list.iter().any(|h| h.hook.evaluates_at(step))
    }

    /// Every hook's evaluation after `step` (rank 0), each then recorded
    /// by every hook.
    pub fn evaluate(&mut self, model: &VlModel, step: i64, at_end: bool) -> Result<()> {
        let mut done: Vec<Evaluation> = Vec::new();
        for h in &mut self.list {
            if at_end || h.hook.evaluates_at(step) {
                done.extend(h.hook.evaluate(model, step, at_end)?);
            }
        }
        for (group, scalars) in &done {
            self.on_record(Record {
                step,
                group,
                scalars,
            })?;
        }
        Ok(())
    }

    pub fn on_checkpoint(&mut self, step: i64, path: &Path) -> Result<()> {
        self.each(|h| h.on_checkpoint(step, path))
    }

    pub fn on_step_end(&mut self, step: i64) -> Result<()> {
        self.each(|h| h.on_step_end(step))
    }

    pub fn on_end(&mut self, end: RunEnd) -> Result<()> {
        self.each(|h| h.on_end(end))
    }

    /// Every hook's state as a checkpoint holds it ([`state_tensors`]).
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        self.list
            .iter()
            .flat_map(|h| state_tensors(&h.name, &*h.hook))
            .collect()
    }

    /// Every hook's counters by full name (`momentum.queue.ptr`).
    pub fn counters(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for h in &self.list {
            for (n, c) in h.hook.state().counters {
                out.insert(format!("{}.{n}", h.name), c);
            }
        }
        out
    }

    /// Restore every hook's tensors from a checkpoint's and return their
    /// counters by full name ([`load_tensors`]).
    pub fn load(
        &self,
        saved: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<BTreeMap<String, i64>> {
        let mut counters = BTreeMap::new();
        for h in &self.list {
            counters.extend(load_tensors(&h.name, &*h.hook, saved, path)?);
        }
        Ok(counters)
    }

    /// Hand each hook its counters (`all`: by full name, as
    /// [`Hooks::counters`] gives them).
    pub fn set_counters(&mut self, all: &BTreeMap<String, i64>) -> Result<()> {
        for h in &mut self.list {
            set_counters(&h.name, &mut *h.hook, all)?;
        }
        Ok(())
    }

    /// The tensors rank 0 broadcasts to the others at the start, in hook
    /// order (the counters travel with the trainer's state).
    pub fn broadcast_tensors(&self) -> Vec<Tensor> {
        self.list
            .iter()
            .flat_map(|h| h.hook.state().tensors.into_iter().map(|(_, t)| t))
            .collect()
    }
}

/// Hook `name`'s state as a checkpoint holds it: `<name>.<state name>`, on
/// the CPU, contiguous; counters as `i64` scalars.
pub fn state_tensors(name: &str, hook: &dyn Hook) -> Vec<(String, Tensor)> {
    let state: HookState = hook.state();
    let mut out = Vec::new();
    for (n, t) in state.tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        out.push((format!("{name}.{n}"), t));
    }
    for (n, c) in state.counters {
        out.push((format!("{name}.{n}"), Tensor::from(c)));
    }
    out
}

/// Copy hook `name`'s tensors from a checkpoint's (`saved`, by full name,
/// read from `path`) into the hook's, and return its counters by full
/// name; the error names the checkpoint and the missing or misshapen entry.
pub fn load_tensors(
    name: &str,
    hook: &dyn Hook,
    saved: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<BTreeMap<String, i64>> {
    let state = hook.state();
    let bad = |message: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message,
    };
    let found = |n: &str| -> Result<&Tensor> {
        let key = format!("{name}.{n}");
        saved.get(&key).ok_or_else(|| {
            bad(format!(
                "checkpoint lacks `{key}`, which the `{name}` hook keeps: it was written without \
                 that hook (`[hooks.{name}]`, or the key that turns it on, such as \
                 `momentum.enabled`) or with another model"
            ))
        })
    };
    tch::no_grad(|| -> Result<()> {
        for (n, live) in &state.tensors {
            let t = found(n)?;
            if t.size() != live.size() {
                return Err(bad(format!(
                    "`{name}.{n}` has shape {:?} in the checkpoint but {:?} in this run (another \
                     model, or another size in the hook's config?)",
                    t.size(),
                    live.size()
                )));
            }
            live.shallow_clone().copy_(t);
        }
        Ok(())
    })?;
    let mut counters = BTreeMap::new();
    for (n, _) in &state.counters {
        let value = crate::checkpoint::scalar_i64(found(n)?)
            .map_err(|m| bad(format!("`{name}.{n}`: {m}")))?;
        counters.insert(format!("{name}.{n}"), value);
    }
    Ok(counters)
}

/// Hand hook `name` its counters out of `all` (by full name).
pub fn set_counters(name: &str, hook: &mut dyn Hook, all: &BTreeMap<String, i64>) -> Result<()> {
    let prefix = format!("{name}.");
    let own: Vec<(String, i64)> = all
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), *v)))
        .collect();
    hook.set_counters(&own)
}
