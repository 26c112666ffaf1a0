//! Hooks: code the trainer runs at fixed points of a run, so that a training
//! feature (momentum distillation, TensorBoard, the progress display, a
//! periodic evaluation) is a plugin, not a change to the trainer.
//!
//! The points, in the order a step reaches them:
//!
//! | point | method | told |
//! |---|---|---|
//! | the run starts (after resume or initialisation) | [`Hook::on_start`] | the first step, whether resumed |
//! | an optimizer step starts | [`Hook::before_step`] | the step (from 0) |
//! | each micro-batch, before the objectives | [`Hook::before_forward`] | the batch's [`Forward`], to attach state to |
//! | each micro-batch, after the objectives | [`Hook::after_objectives`] | the same [`Forward`] |
//! | each micro-batch, before backward | [`Hook::before_backward`] | the weighted total loss, to transform |
//! | after the optimizer step | [`Hook::after_optimizer_step`] | whether the guard applied it (a device bool) |
//! | a logging step | [`Hook::on_log`] | the line so far, to add scalars to |
//! | a record is complete | [`Hook::on_record`] | a logged line or an evaluation's scalars |
//! | a checkpoint is written | [`Hook::on_checkpoint`] | its path |
//! | an evaluation step, and after the last step | [`Hook::evaluate`] | the model and the step; returns its scalars |
//! | the step is over | [`Hook::on_step_end`] | the step (from 1) |
//! | the run ends | [`Hook::on_end`] | how it ended |
//!
//! Hooks run in the order of their [`Hook::priority`] (lowest first; ties
//! by name), at every point. State a hook keeps across a resume it lists in
//! [`Hook::state`]: live tensor handles and counters, which the trainer
//! saves in each checkpoint under `<hook name>.<state name>`, restores on
//! resume and broadcasts from rank 0 in data-parallel runs. The trainer
//! calls the step points on every rank; [`Hook::on_record`],
//! [`Hook::evaluate`] and [`Hook::on_checkpoint`] on rank 0 only.

use crate::{Forward, Result, VlModel};
use std::path::Path;
use tch::Tensor;

/// Conventional priorities ([`Hook::priority`]); lower runs first.
pub mod priority {
    /// Hooks that change the model or what the objectives see.
    pub const MODEL: i32 = 10;
    /// Hooks that evaluate the model.
    pub const EVALUATION: i32 = 50;
    /// Hooks that write or show what others produced.
    pub const LOGGING: i32 = 80;
    /// The display, after everything it may show.
    pub const DISPLAY: i32 = 90;
}

/// What a hook keeps across a resume: live handles to its tensors (the
/// trainer copies them out to save and copies into them to restore or
/// broadcast) and its counters.
#[derive(Debug, Default)]
pub struct HookState {
    pub tensors: Vec<(String, Tensor)>,
    pub counters: Vec<(String, i64)>,
}

/// Where a run starts: the first step this invocation runs (from 0), the
/// run's step count, and whether it continues a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStart {
    pub step: i64,
    pub total_steps: i64,
    pub resumed: bool,
}

/// A finished record: the scalars logged at a step (`group` "train"), or
/// an evaluation's (`group` its name, such as "heldout"). Keys are dotted
/// paths (`matching.itm_acc`); a non-finite value is NaN.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub step: i64,
    pub group: &'a str,
    pub scalars: &'a [(String, f64)],
}

impl Record<'_> {
    /// The value of `key`, if the record has it.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.scalars.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// An evaluation's results: a group name (`heldout`) and its scalars.
pub type Evaluation = (String, Vec<(String, f64)>);

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// It ran every step.
    Finished { step: i64 },
    /// A stop signal stopped it after `step`, with a checkpoint.
    Stopped { step: i64 },
    /// It halted on purpose (tests), as a kill would: no final checkpoint.
    Halted { step: i64 },
}

/// Code run at fixed points of training; see the module docs for the
/// points and their order. Every method has a default that does nothing.
pub trait Hook {
    /// Order among hooks: lower runs first ([`priority`]).
    fn priority(&self) -> i32 {
        priority::EVALUATION
    }
    /// What to save, restore and broadcast (names without the hook's
    /// prefix). Handles must stay valid for the hook's life.
    fn state(&self) -> HookState {
        HookState::default()
    }
    /// The counters of [`Hook::state`] as restored or broadcast; the error
    /// says which value is out of range.
    fn set_counters(&mut self, _counters: &[(String, i64)]) -> Result<()> {
        Ok(())
    }
    fn on_start(&mut self, _start: RunStart) -> Result<()> {
        Ok(())
    }
    fn before_step(&self, _step: i64) {}
    /// Attach state to a micro-batch's forward cache (momentum
    /// distillation attaches its model and queues).
    fn before_forward<'a>(&'a self, forward: Forward<'a>) -> Forward<'a> {
        forward
    }
    fn after_objectives(&self, _forward: &Forward<'_>) {}
    /// The micro-batch's total loss before it is back-propagated (and
    /// checked by the non-finite guard): a loss scaler's point, and the
    /// fault tests' NaN. Default: unchanged.
    fn before_backward(&self, _step: i64, loss: Tensor) -> Tensor {
        loss
    }
    /// `applied`: a bool scalar on the device, whether the non-finite guard
    /// applied this step. Reading it synchronises; prefer `where_self`.
    fn after_optimizer_step(&self, _applied: &Tensor) {}
    /// Scalars to add to the logged line of `step`.
    fn on_log(&mut self, _step: i64, _line: &mut Vec<(String, f64)>) {}
    fn on_record(&mut self, _record: Record<'_>) -> Result<()> {
        Ok(())
    }
    /// Whether this hook evaluates after step `step` (counted from 1);
    /// the same answer on every rank (the others wait for rank 0).
    fn evaluates_at(&self, _step: i64) -> bool {
        false
    }
    /// An evaluation after `step` (`at_end`: the one after the last step,
    /// asked whether or not [`Hook::evaluates_at`]); returns its group name
    /// and scalars, which every hook then receives as a [`Record`]. `None`:
    /// nothing to evaluate now.
    fn evaluate(
        &mut self,
        _model: &VlModel,
        _step: i64,
        _at_end: bool,
    ) -> Result<Option<Evaluation>> {
        Ok(None)
    }
    fn on_checkpoint(&mut self, _step: i64, _path: &Path) -> Result<()> {
        Ok(())
    }
    /// At the end of every step (after logging, checkpoints and
    /// evaluation), on every rank.
    fn on_step_end(&mut self, _step: i64) -> Result<()> {
        Ok(())
    }
    /// After the step of `end`, before the trainer returns.
    fn on_end(&mut self, _end: RunEnd) -> Result<()> {
        Ok(())
    }
}
