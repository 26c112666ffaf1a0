//! Fine-tuning a classification task (batches of items prepared ahead on a
//! thread, each rank its share of every global batch; cross-entropy;
//! validation every `eval_every` steps keeping the best weights) through
//! the shared loop ([`super::fit`]), and accuracy.

use super::fit::{self, FitSpec, Validation};
use super::{build, load_items, Classifier, Items, Split, Task};
use crate::data::loader::{epoch_order, make_batch, LoaderConfig};
use crate::step::Micro;
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use tch::{Kind, Tensor};
use vlmatch_core::{Batch, Error, Result};

pub struct FinetuneOptions {
    pub task: Task,
    /// The pretrained run directory.
    pub checkpoint: PathBuf,
    /// Training data: an ALBEF file or `builtin`.
    pub data: PathBuf,
    /// Validation (SNLI-VE val, NLVR2 dev) and test data; with `--data
    /// builtin` both default to the built-in splits. Without validation
    /// data the last step's weights are kept.
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub image_root: Option<PathBuf>,
    /// Default: CHECKPOINT/TASK.
    pub out: Option<PathBuf>,
    pub steps: i64,
    pub lr: f64,
    /// Items per batch; default the run's train.batch_size.
    pub batch_size: Option<usize>,
    /// Validate every this many steps (default: steps / 5) and at the end.
    pub eval_every: Option<i64>,
    /// Train and evaluate with blank images (the text-only baseline).
    pub blank_images: bool,
    pub sets: Vec<String>,
    pub progress: bool,
    /// Continue the fine-tuned run in `out` from its newest checkpoint.
    pub resume: bool,
    /// The fault tests' injected failure (`--fault`, hidden).
    pub fault: Option<crate::fault::Fault>,
}

/// What `downstream.json` records of a fine-tuned run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskFile {
    task: String,
    classes: Vec<String>,
    /// The most frequent training class (the majority baseline).
    majority_class: i64,
    blank_images: bool,
}

/// Accuracy of a fine-tuned model on a set of items.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accuracy {
    pub items: usize,
    pub accuracy: f64,
    /// Always answering the most frequent training class.
    pub majority_class: String,
    pub majority_accuracy: f64,
    /// Accuracy on the items of each true class.
    pub per_class: BTreeMap<String, f64>,
    /// Accuracy per statement kind, where the data names kinds (built-in).
    pub by_kind: BTreeMap<String, f64>,
    /// Items left out because an image did not decode (`data.on_error =
    /// "skip"`); the accuracies are over the others.
    pub skipped: usize,
}

/// What `finetune` did (also written as `finetune.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneReport {
    pub out: PathBuf,
    pub task: String,
    pub train_items: usize,
    /// (step, validation accuracy) at each validation.
    pub val_curve: Vec<(i64, f64)>,
    /// The step whose weights were kept (best on validation, else the last).
    pub best_step: i64,
    pub best_val: Option<f64>,
    pub test: Option<Accuracy>,
    pub final_loss: f64,
    pub blank_images: bool,
}

/// Rank `rank`'s share (`per_rank` items) of each global batch of
/// `per_rank * world` items of `items`, in an order fixed by `seed` and the
/// epoch, from global batch `start` to `end`, prepared ahead on a thread.
fn item_batches(
    items: Arc<Items>,
    tok: Arc<Tokenizer>,
    cfg: LoaderConfig,
    (per_rank, rank, world): (usize, usize, usize),
    seed: u64,
    (start, end): (i64, i64),
) -> Receiver<Result<Batch>> {
    let (tx, rx) = sync_channel(cfg.prefetch.max(1));
    std::thread::spawn(move || {
        let global = per_rank * world;
        let per_epoch = (items.len() / global).max(1);
        let mut order = Vec::new();
        let mut epoch = usize::MAX;
        for g in start.max(0) as usize..end.max(0) as usize {
            let (e, k) = (g / per_epoch, g % per_epoch);
            if e != epoch {
                order = epoch_order(items.len(), Some(seed), e as u64);
                epoch = e;
            }
            let at = |i: usize| i.min(order.len());
            let chosen = &order[at(k * global)..at((k + 1) * global)];
            let cut = |i: usize| i.min(chosen.len());
            let mine = &chosen[cut(rank * per_rank)..cut((rank + 1) * per_rank)];
            let batch = make_batch(&items.ds, &tok, &cfg, &items.pairs_of(mine));
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    });
    rx
}

fn majority(labels: &[i64], classes: usize) -> i64 {
    let mut counts = vec![0usize; classes];
    for &l in labels {
        counts[l as usize] += 1;
    }
    // The first of the most frequent classes.
    let best = counts.iter().copied().max().unwrap_or(0);
    counts.iter().position(|&c| c == best).unwrap_or(0) as i64
}

/// `vlmatch finetune --task snli-ve|nlvr2`: on one process, or as one rank
/// of a data-parallel run when a launcher started several.
pub fn finetune(opts: &FinetuneOptions) -> Result<FinetuneReport> {
    let pre = crate::run::run_config(&opts.checkpoint, &opts.task.sets(&opts.sets))?;
    let (device, mut par) = crate::parallel::join_launched(&pre.config.train)?;
    let result = finetune_on(opts, device, par.as_mut());
    crate::parallel::finish(result, par)
}

fn finetune_on(
    opts: &FinetuneOptions,
    device: tch::Device,
    par: Option<&mut crate::parallel::Parallel>,
) -> Result<FinetuneReport> {
    let task = opts.task;
    let (rank, world) = par.as_ref().map_or((0, 1), |p| (p.rank, p.world));
    let main = rank == 0;
    let ckpt = crate::checkpoint::newest_intact(&opts.checkpoint)?;
    // The head's initial draw is the run's seed's.
    fit::seed_initialisation(&crate::run::run_config(
        &opts.checkpoint,
        &task.sets(&opts.sets),
    )?);
    let m = build(
        task,
        &opts.checkpoint,
        &opts.sets,
        &ckpt,
        false,
        opts.blank_images,
        Some(device),
    )?;
    let c = m.loaded.config.clone();
    let builtin = opts.data == Path::new("builtin");
    let other = |given: &Option<PathBuf>| match given {
        Some(p) => Some(p.clone()),
        None => builtin.then(|| PathBuf::from("builtin")),
    };
    let root = opts.image_root.as_deref();
    let train = Arc::new(load_items(task, &opts.data, root, &c, Split::Train)?);
    let val = match other(&opts.val) {
        Some(p) => Some(load_items(task, &p, root, &c, Split::Val)?),
        None => None,
    };
    let test = match other(&opts.test) {
        Some(p) => Some(load_items(task, &p, root, &c, Split::Test)?),
        None => None,
    };
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| opts.checkpoint.join(task.name()));
    let info = TaskFile {
        task: task.name().into(),
        classes: task.classes().iter().map(|s| s.to_string()).collect(),
        majority_class: majority(&train.labels, task.classes().len()),
        blank_images: opts.blank_images,
    };
    if main {
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let cfg_path = out.join("config.toml");
        crate::durable::write(&cfg_path, m.loaded.to_toml())?;
        let info_path = out.join("downstream.json");
        crate::durable::write(
            &info_path,
            serde_json::to_string_pretty(&info).expect("serialisable"),
        )?;
    }
    let per_rank = opts
        .batch_size
        .unwrap_or(c.train.batch_size)
        .min(train.len() / world)
        .max(1);
    let loader_cfg = LoaderConfig::new(&c.data, per_rank * task.images(), None);
    let labels = Tensor::from_slice(&train.labels);
    let every = opts.eval_every.unwrap_or(opts.steps / 5).max(1);
    let mut batches: Option<Receiver<Result<Batch>>> = None;
    let micro = |g: i64| -> Result<Micro> {
        let rx = batches.get_or_insert_with(|| {
            item_batches(
                train.clone(),
                m.tok.clone(),
                loader_cfg.clone(),
                (per_rank, rank, world),
                c.train.seed,
                (g, opts.steps * c.train.accum_steps as i64),
            )
        });
        let batch = rx.recv().map_err(|_| {
            Error::Config("the data loader stopped after an earlier error".into())
        })??;
        let batch = batch.to_device(device);
        let slots = train.slot_items(&batch.pairs);
        let rows: Vec<i64> = (0..slots.len() as i64)
            .filter(|&j| slots[j as usize].is_some())
            .collect();
        let items: Vec<i64> = slots.into_iter().flatten().map(|i| i as i64).collect();
        let target = labels
            .index_select(0, &Tensor::from_slice(&items))
            .to_device(device);
        let logits = m
            .logits(&batch, true)?
            .index_select(0, &Tensor::from_slice(&rows).to_device(device));
        Ok(Micro {
            total: logits.cross_entropy_for_logits(&target),
            values: Vec::new(),
            losses: Vec::new(),
            surrogate: None,
        })
    };
    let mut validate = |_step: i64| -> Result<f64> {
        match &val {
            Some(v) => Ok(accuracy(&m, v, info.majority_class)?.accuracy),
            None => Ok(f64::NAN),
        }
    };
    let spec = FitSpec {
        task: task.name(),
        out: &out,
        train: &c.train,
        steps: opts.steps,
        lr: opts.lr,
        batch_size: per_rank,
        resume: opts.resume,
        progress: opts.progress,
        device,
        fault: opts.fault,
    };
    let validation = val.is_some().then_some(Validation {
        every,
        run: &mut validate,
    });
    let fitted = fit::fit(&spec, &m.asm.vs, par, micro, validation)?;
    let best_step = fitted.best.map_or(opts.steps, |(s, _)| s);
    let test = match &test {
        Some(t) => Some(accuracy(&m, t, info.majority_class)?),
        None => None,
    };
    let report = FinetuneReport {
        out: out.clone(),
        task: task.name().into(),
        train_items: train.len(),
        val_curve: fitted.curve,
        best_step,
        best_val: fitted.best.map(|(_, a)| a),
        test,
        final_loss: fitted.last_loss,
        blank_images: opts.blank_images,
    };
    if main {
        let path = out.join("finetune.json");
        crate::durable::write(
            &path,
            serde_json::to_string_pretty(&report).expect("serialisable"),
        )?;
        tracing::info!(out = %out.display(), best_step, "fine-tuned");
    }
    Ok(report)
}

/// Accuracy of `m` on `items`; `majority`: the training majority class.
fn accuracy(m: &Classifier, items: &Items, majority: i64) -> Result<Accuracy> {
    let c = &m.loaded.config;
    let k = items.per_item;
    let cfg = LoaderConfig::new(&c.data, c.eval.batch_size.max(1) * k, None);
    let all = items.pairs_of(&(0..items.len()).collect::<Vec<_>>());
    let mut predicted: Vec<Option<i64>> = vec![None; items.len()];
    tch::no_grad(|| -> Result<()> {
        for batch in crate::data::loader::batches(&items.ds, &m.tok, &cfg, &all) {
            let batch = batch?.to_device(m.asm.model.device);
            let best = m.logits(&batch, false)?.argmax(1, false);
            let best = Vec::<i64>::try_from(best.to_device(tch::Device::Cpu).to_kind(Kind::Int64))?;
            for (item, p) in items.slot_items(&batch.pairs).into_iter().zip(best) {
                if let Some(i) = item {
                    predicted[i].get_or_insert(p);
                }
            }
        }
        Ok(())
    })?;
    let classes = m.task.classes();
    let scored: Vec<usize> = (0..items.len())
        .filter(|&i| predicted[i].is_some())
        .collect();
    let share = |of: &[usize], hit: &dyn Fn(usize) -> bool| {
        of.iter().filter(|&&i| hit(i)).count() as f64 / of.len().max(1) as f64
    };
    let right = |i: usize| predicted[i] == Some(items.labels[i]);
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut kinds: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for &i in &scored {
        groups
            .entry(classes[items.labels[i] as usize].to_string())
            .or_default()
            .push(i);
        if let Some(kind) = &items.kinds[i] {
            kinds.entry(kind.clone()).or_default().push(i);
        }
    }
    Ok(Accuracy {
        items: items.len(),
        accuracy: share(&scored, &right),
        majority_class: classes[majority as usize].to_string(),
        majority_accuracy: share(&scored, &|i| items.labels[i] == majority),
        per_class: groups
            .iter()
            .map(|(c, of)| (c.clone(), share(of, &right)))
            .collect(),
        by_kind: kinds
            .iter()
            .map(|(c, of)| (c.clone(), share(of, &right)))
            .collect(),
        skipped: items.len() - scored.len(),
    })
}

/// `vlmatch eval --task snli-ve|nlvr2` on a run fine-tuned for `task`:
/// `data` an ALBEF file or `builtin` (`split`: `val`/`dev`, `test` (the
/// default) or `train` of the built-in items).
pub fn evaluate(
    task: Task,
    run_dir: &Path,
    data: &Path,
    image_root: Option<&Path>,
    split: Option<&str>,
    sets: &[String],
) -> Result<Accuracy> {
    let info_path = run_dir.join("downstream.json");
    let text = std::fs::read_to_string(&info_path).map_err(|e| {
        Error::Config(format!(
            "{}: {e}; is {} a run fine-tuned with `vlmatch finetune --task {}`?",
            info_path.display(),
            run_dir.display(),
            task.name()
        ))
    })?;
    let info: TaskFile = serde_json::from_str(&text).map_err(|e| Error::Data {
        path: info_path.clone(),
        line: Some(e.line()),
        message: format!(
            "expected {{\"task\", \"classes\", \"majority_class\", \"blank_images\"}}: {e}"
        ),
    })?;
    if info.majority_class < 0 || info.majority_class as usize >= task.classes().len() {
        return Err(Error::Data {
            path: info_path,
            line: None,
            message: format!(
                "`majority_class` {} is not a class index of {} (0..{})",
                info.majority_class,
                task.name(),
                task.classes().len()
            ),
        });
    }
    if info.task != task.name() {
        return Err(Error::Config(format!(
            "{} was fine-tuned for `{}`, not `{}`",
            run_dir.display(),
            info.task,
            task.name()
        )));
    }
    let split = match split {
        None => Split::Test,
        Some(s) => Split::parse(s).ok_or_else(|| {
            Error::Config(format!(
                "--split `{s}`: the built-in {} splits are `train`, `{}` and `test`",
                task.name(),
                task.val_name()
            ))
        })?,
    };
    let weights = fit::kept_weights(run_dir)?;
    let m = build(task, run_dir, sets, &weights, true, info.blank_images, None)?;
    let items = load_items(task, data, image_root, &m.loaded.config, split)?;
    accuracy(&m, &items, info.majority_class)
}
