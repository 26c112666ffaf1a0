//! The `progress` hook: the progress display
//! ([`crate::tracking::progress`]) with the newest loss and held-out
//! numbers. On with `--progress` (the default; `--quiet` turns it off) or
//! `[hooks.progress]`, on rank 0.

use super::Resources;
use crate::tracking::progress::Progress;
use vlmatch_core::hook::priority;
use vlmatch_core::{Hook, Record, Result, RunEnd, RunStart};
use vlmatch_registry::hooks::HookContext;

vlmatch_registry::register!(hook "progress" => build);

struct Display {
    bar: Option<Progress>,
}

fn build(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    let flag = ctx.host::<Resources>().is_some_and(|r| r.flags.progress);
    if ctx.rank != 0 || !ctx.enabled(flag) {
        return Ok(None);
    }
    Ok(Some(Box::new(Display { bar: None })))
}

impl Hook for Display {
    fn priority(&self) -> i32 {
        priority::DISPLAY
    }

    fn on_start(&mut self, start: RunStart) -> Result<()> {
        self.bar = Some(Progress::new(true, start.step, start.total_steps));
        Ok(())
    }

    fn on_record(&mut self, r: Record<'_>) -> Result<()> {
        let Some(bar) = self.bar.as_mut() else {
            return Ok(());
        };
        match r.group {
            "train" => bar.logged(
                r.step,
                r.get("loss").unwrap_or(f64::NAN),
                r.get("lr").unwrap_or(f64::NAN),
            ),
            "heldout" => bar.heldout(
                r.step,
                r.get("retrieval.i2t_r1").unwrap_or(f64::NAN),
                r.get("matching.itm_acc").unwrap_or(f64::NAN),
            ),
            _ => {}
        }
        Ok(())
    }

    fn on_step_end(&mut self, step: i64) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
        Ok(())
    }

    fn on_end(&mut self, end: RunEnd) -> Result<()> {
        if let Some(bar) = &self.bar {
            match end {
                RunEnd::Finished { .. } => bar.finish(),
                RunEnd::Stopped { .. } | RunEnd::Halted { .. } => bar.abandon(),
            }
        }
        Ok(())
    }
}
