//! The `fault` hook: the fault tests' injected failures
//! ([`crate::fault::Fault`], `vlmatch train --fault RANK:STEP:KIND`,
//! hidden): a NaN loss at the chosen step, or a kill, hang or SIGTERM right
//! after it, on the chosen rank. On only when a fault is given; it runs
//! last, after the step's checkpoint and evaluation.

use super::Resources;
use crate::fault::Fault;
use tch::Tensor;
use vlmatch_core::{Hook, Result};
use vlmatch_registry::hooks::HookContext;

vlmatch_registry::register!(hook "fault" => build);

struct Inject {
    fault: Fault,
    rank: usize,
}

fn build(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    let fault = ctx.host::<Resources>().and_then(|r| r.flags.fault);
    Ok(fault.map(|fault| {
        Box::new(Inject {
            fault,
            rank: ctx.rank,
        }) as Box<dyn Hook>
    }))
}

impl Hook for Inject {
    fn priority(&self) -> i32 {
        i32::MAX
    }

    /// The loss of the fault's step is NaN, as a diverging step's would be.
    fn before_backward(&self, step: i64, loss: Tensor) -> Tensor {
        match self.fault.nan_step(self.rank) {
            Some(s) if s == step => loss * f64::NAN,
            _ => loss,
        }
    }

    fn on_step_end(&mut self, step: i64) -> Result<()> {
        self.fault.strike(self.rank, step);
        Ok(())
    }
}
