//! The `tensorboard` hook: every record (the logged lines as `train/...`,
//! evaluations as `heldout/...`) into TensorBoard event files under
//! `RUN/tb/` ([`crate::tracking::tensorboard`]). On with
//! `train.tensorboard` (or `[hooks.tensorboard]`), on rank 0.

use crate::tracking::tensorboard::EventWriter;
use std::path::PathBuf;
use vlmatch_core::hook::priority;
use vlmatch_core::{Hook, Record, Result, RunStart};
use vlmatch_registry::hooks::HookContext;

vlmatch_registry::register!(hook "tensorboard" => build);

struct TensorBoard {
    dir: PathBuf,
    writer: Option<EventWriter>,
}

fn build(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    if ctx.rank != 0 || !ctx.enabled(ctx.loaded.config.train.tensorboard) {
        return Ok(None);
    }
    Ok(Some(Box::new(TensorBoard {
        dir: ctx.run_dir.join("tb"),
        writer: None,
    })))
}

impl Hook for TensorBoard {
    fn priority(&self) -> i32 {
        priority::LOGGING
    }

    /// A resumed run's file marks the restart, so that TensorBoard drops
    /// what a killed run logged after its checkpoint.
    fn on_start(&mut self, start: RunStart) -> Result<()> {
        let resumed_at = start.resumed.then_some(start.step);
        self.writer = Some(EventWriter::create(&self.dir, resumed_at)?);
        Ok(())
    }

    fn on_record(&mut self, record: Record<'_>) -> Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.scalars(record.step, record.group, record.scalars),
            None => Ok(()),
        }
    }
}
