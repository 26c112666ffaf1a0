//! The `heldout` hook: the held-out evaluation (ITC retrieval and
//! fine-grained matching, [`crate::eval::held_out`]) every `eval.every`
//! steps into `eval.jsonl`, and after the last step into
//! `eval-heldout.json` (`eval.at_end`). On when the data has a held-out
//! split and either is asked for (or `[hooks.heldout]`).

use super::Resources;
use crate::data::Dataset;
use crate::eval::{self, EvalInputs};
use crate::tokenizer::Tokenizer;
use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use vlmatch_core::{Error, Evaluation, Hook, Result, RunStart, VlModel};
use vlmatch_registry::hooks::HookContext;
use vlmatch_registry::Config;

vlmatch_registry::register!(hook "heldout" => build);

struct HeldOutHook {
    config: Config,
    data: Arc<Dataset>,
    tokenizer: Arc<Tokenizer>,
    every: i64,
    at_end: bool,
    /// `eval.jsonl`, appended every `every` steps.
    jsonl: PathBuf,
    /// `eval-heldout.json`, written after the last step.
    last: PathBuf,
    main: bool,
    summary: Rc<RefCell<Option<eval::HeldOut>>>,
}

fn build(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    let Some(res) = ctx.host::<Resources>() else {
        return Ok(None);
    };
    let Some(data) = res.heldout.clone() else {
        return Ok(None);
    };
    let e = &ctx.loaded.config.eval;
    if !ctx.enabled(e.every > 0 || e.at_end) {
        return Ok(None);
    }
    Ok(Some(Box::new(HeldOutHook {
        config: ctx.loaded.config.clone(),
        data,
        tokenizer: res.tokenizer.clone(),
        every: e.every,
        at_end: e.at_end,
        jsonl: ctx.run_dir.join("eval.jsonl"),
        last: ctx.run_dir.join("eval-heldout.json"),
        main: ctx.rank == 0,
        summary: res.final_heldout.clone(),
    })))
}

impl Hook for HeldOutHook {
    /// A fresh run starts `eval.jsonl` anew; a resumed one drops what a
    /// killed run evaluated after its checkpoint.
    fn on_start(&mut self, start: RunStart) -> Result<()> {
        if !self.main {
            return Ok(());
        }
        if start.resumed {
            crate::train::truncate_metrics(&self.jsonl, start.step)
        } else {
            let _ = std::fs::remove_file(&self.jsonl);
            Ok(())
        }
    }

    fn evaluates_at(&self, step: i64) -> bool {
        self.every > 0 && step % self.every == 0
    }

    fn evaluate(&mut self, model: &VlModel, step: i64, at_end: bool) -> Result<Option<Evaluation>> {
        let periodic = self.evaluates_at(step);
        if at_end && !self.at_end {
            return Ok(None);
        }
        let inputs = EvalInputs::new(&self.config, &self.tokenizer);
        let r = eval::held_out(model, &self.data, &inputs, step)?;
        let scalars = crate::tracking::flatten(&serde_json::json!(r));
        if at_end {
            let text = serde_json::to_string_pretty(&r).expect("serialisable");
            crate::durable::write(&self.last, text)?;
            *self.summary.borrow_mut() = Some(r);
            // The periodic evaluation of this step has been recorded already.
            return Ok((!periodic).then(|| ("heldout".to_string(), scalars)));
        }
        let line = serde_json::to_string(&r).expect("serialisable");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.jsonl)
            .map_err(|e| Error::io(&self.jsonl, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&self.jsonl, e))?;
        Ok(Some(("heldout".to_string(), scalars)))
    }
}
