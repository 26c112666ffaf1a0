//! `vlmatch eval`: evaluate a trained run on a task.

use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};

/// An evaluation data file and how to read it.
#[derive(Debug, Clone)]
pub struct DataArg {
    pub path: PathBuf,
    pub image_root: Option<PathBuf>,
    /// Karpathy split(s), comma-separated.
    pub split: Option<String>,
    /// Zero-shot candidate labels.
    pub labels: Option<PathBuf>,
}

/// Candidate labels: a JSON list of strings, or one label per line.
fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = vlmatch_registry::check::read_utf8(path)?;
    if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: Some(e.line()),
            message: format!("expected a JSON list of strings: {e}"),
        })
    } else {
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}

/// `vlmatch eval`: load a run's model and evaluate `task` on `data`; the
/// result is also written to `RUN_DIR/eval-TASK.json`.
///
/// Started by a launcher as several ranks, `retrieval` shares its ITM
/// re-ranking among them (every rank gets the result; rank 0 writes it);
/// the other tasks run on rank 0 alone and the other ranks return `null`.
pub fn eval_task(
    run_dir: &Path,
    task: &str,
    data: &DataArg,
    sets: &[String],
    progress: bool,
) -> Result<serde_json::Value> {
    let launch = vlmatch_dist::LaunchEnv::from_env()
        .map_err(|e| Error::Config(format!("launcher environment: {e}")))?
        .filter(|l| l.world_size > 1);
    let Some(launch) = launch else {
        return eval_on(run_dir, task, data, sets, progress, None);
    };
    if task != "retrieval" {
        if launch.rank > 0 {
            return Ok(serde_json::Value::Null);
        }
        tracing::info!("--task {task} runs on rank 0 alone (only retrieval is shared)");
        return eval_on(run_dir, task, data, sets, progress, None);
    }
    let loaded = crate::run::run_config(run_dir, sets)?;
    let train = &loaded.config.train;
    let device = crate::setup::rank_device(&train.device, launch.local_rank)?;
    let timeout = std::time::Duration::from_secs(train.dist.timeout.max(1));
    let par = crate::parallel::Parallel::connect(&launch, device, timeout)?;
    let result = eval_on(
        run_dir,
        task,
        data,
        sets,
        progress && par.is_main(),
        Some((&par, device)),
    );
    match result {
        Ok(r) => {
            par.leave();
            Ok(r)
        }
        Err(e) if crate::parallel::Parallel::is_communication(&e) => Err(par.explain(e)),
        Err(e) => Err(e),
    }
}

/// [`eval_task`] on one process, or as one rank of `par` (on `device`).
fn eval_on(
    run_dir: &Path,
    task: &str,
    data: &DataArg,
    sets: &[String],
    progress: bool,
    par: Option<(&crate::parallel::Parallel, tch::Device)>,
) -> Result<serde_json::Value> {
    let image_root = data.image_root.as_deref();
    let split = data.split.as_deref();
    let labels = data.labels.as_deref();
    let data = data.path.as_path();
    if data.as_os_str().is_empty() && task != "heldout" {
        return Err(Error::Config(format!(
            "--task {task} needs --data FILE (the evaluation data)"
        )));
    }
    if let Some(t) = crate::downstream::Task::parse(task) {
        let r = crate::downstream::evaluate(t, run_dir, data, image_root, split, sets)?;
        let mut result = serde_json::to_value(r).expect("serialisable");
        result["task"] = serde_json::json!(task);
        result["data"] = serde_json::json!(data.display().to_string());
        record_checkpoint(&mut result, &crate::downstream::fit::kept_weights(run_dir)?);
        return write_eval(run_dir, task, result);
    }
    if task == "vqa" {
        let r = crate::vqa::evaluate(run_dir, data, image_root, sets)?;
        let mut result = serde_json::to_value(r).expect("serialisable");
        result["task"] = serde_json::json!(task);
        result["data"] = serde_json::json!(data.display().to_string());
        record_checkpoint(&mut result, &crate::downstream::fit::kept_weights(run_dir)?);
        return write_eval(run_dir, task, result);
    }
    let crate::run::LoadedRun {
        loaded,
        tok,
        asm,
        state,
        checkpoint,
    } = crate::run::load_run_on(run_dir, sets, par.map(|(_, d)| d))?;
    let c = &loaded.config;
    let inp = crate::eval::EvalInputs::new(c, &tok);
    let collective = par.map(|(p, _)| p.collective());
    let bar = if progress {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut result = match task {
        "retrieval" => {
            let ds = crate::data::load_any_within(
                &data.display().to_string(),
                image_root,
                split,
                &c.data,
            )?;
            let r = crate::eval::retrieval_reranked_sharded(
                &asm.model,
                &ds,
                &inp,
                c.eval.k,
                c.eval.rerank,
                collective.as_deref(),
                &bar,
            )?;
            serde_json::to_value(r).expect("serialisable")
        }
        "matching" => {
            let (ds, negatives, entries) = crate::data::annotations::load_with_located(
                data,
                image_root,
                Some("negative"),
                split,
            )?;
            let kinds = crate::eval::kinds_of(data, &entries)?;
            let m = crate::eval::matching_triples(&asm.model, &ds, &negatives, &kinds, &inp)?;
            let mut v = serde_json::to_value(&m.matching).expect("serialisable");
            v["matching_by_kind"] =
                serde_json::to_value(&m.matching_by_kind).expect("serialisable");
            v
        }
        "heldout" => {
            let (_, heldout) = crate::setup::datasets(&loaded)?;
            let ds = heldout.ok_or_else(|| {
                Error::Config(
                    "--task heldout: the run's config has no held-out set (built-in data, or \
                     data.heldout_annotations)"
                        .into(),
                )
            })?;
            let r = crate::eval::held_out(&asm.model, &ds, &inp, state.step)?;
            serde_json::to_value(r).expect("serialisable")
        }
        "zeroshot" => {
            let labels = read_labels(labels.ok_or_else(|| {
                Error::Config("--task zeroshot needs --labels FILE (the candidate labels)".into())
            })?)?;
            let limits = crate::data::annotations::AnnotationLimits::from_config(&c.data);
            let (ds, _) = crate::data::annotations::load_entries(
                data,
                image_root,
                "label",
                c.data.on_error,
                limits,
            )?;
            let z = crate::eval::zeroshot(&asm.model, &ds, &labels, &inp, c.eval.k, c.eval.rerank)?;
            serde_json::to_value(z).expect("serialisable")
        }
        other => {
            return Err(Error::Config(format!(
                "--task `{other}`: expected `retrieval`, `matching`, `zeroshot`, `vqa`, \
                 `snli-ve`, `nlvr2` or `heldout`"
            )))
        }
    };
    bar.finish_and_clear();
    result["task"] = serde_json::json!(task);
    result["data"] = serde_json::json!(data.display().to_string());
    record_checkpoint(&mut result, &checkpoint);
    if par.is_some_and(|(p, _)| !p.is_main()) {
        // Rank 0 writes the result.
        return Ok(result);
    }
    write_eval(run_dir, task, result)
}

/// The checkpoint an evaluation used and its step, in its result.
fn record_checkpoint(result: &mut serde_json::Value, checkpoint: &Path) {
    result["checkpoint"] = serde_json::json!(checkpoint.display().to_string());
    result["step"] = serde_json::json!(crate::checkpoint::step_of(checkpoint));
}

/// Write RUN_DIR/eval-TASK.json and return the result.
fn write_eval(run_dir: &Path, task: &str, result: serde_json::Value) -> Result<serde_json::Value> {
    let out = run_dir.join(format!("eval-{task}.json"));
    crate::durable::write(
        &out,
        serde_json::to_string_pretty(&result).expect("serialisable"),
    )?;
    Ok(result)
}
