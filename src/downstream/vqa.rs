//! VQA fine-tuning and evaluation on a pretrained run.
//!
//! A classifier over an answer vocabulary on the fused `[CLS]` of (image,
//! question), METER-style: `Linear(D, 2D) -> GELU -> LayerNorm ->
//! Linear(2D, answers)`, trained with binary cross-entropy on soft answer
//! scores (VQA v2: an answer given by `n` of the annotators scores
//! `min(1, n / 3)`). Accuracy is the score of the predicted answer.
//!
//! Data: JSON or JSON lines `{"image", "question", "answer"}` where `answer`
//! is a string, a list of annotator answers, or an object of answer scores;
//! or `builtin`, questions about the built-in scenes (colors, shapes, sizes,
//! counts, backgrounds; training questions from the training scenes,
//! evaluation questions from the held-out ones).
//!
//! A fine-tuned run directory holds `config.toml` (the pretrained run's),
//! `answers.json` (the answer vocabulary) and checkpoints with the head
//! (`vqa_head.*`), so `vlmatch eval --task vqa --checkpoint DIR` reloads it.

use super::fit::{fit, kept_weights, FitSpec};
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::synthetic::{Scene, BACKGROUNDS, COLORS, SHAPES, SIZES};
use crate::data::{annotations, Dataset};
use crate::step::Micro;
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;
use vlmatch_core::{Error, Forward, Head, Result};
use vlmatch_registry::config::OnError;
use vlmatch_registry::{Assembly, LoadedConfig};

/// Questions: `ds.pairs[i]` holds question `i` (as its caption) and its
/// image; `answers[i]` its answer scores; `kinds[i]` a question type if
/// known (built-in data).
pub struct VqaSet {
    pub ds: std::sync::Arc<Dataset>,
    pub answers: Vec<BTreeMap<String, f64>>,
    pub kinds: Vec<Option<String>>,
}

const COUNT_WORDS: [&str; 3] = ["one", "two", "three"];

/// Up to three questions about a scene, with their answers and types, each
/// chosen so that the answer is unique (e.g. "what color is the circle?"
/// only when the scene has one circle).
pub fn scene_questions(scene: &Scene, seed: u64) -> Vec<(String, String, &'static str)> {
    let objs = &scene.objects;
    let unique = |f: &dyn Fn(&crate::data::synthetic::Object) -> usize, v: usize| {
        objs.iter().filter(|o| f(o) == v).count() == 1
    };
    let mut candidates: Vec<(String, String, &'static str)> = Vec::new();
    for o in objs {
        if unique(&|x| x.shape, o.shape) {
            candidates.push((
                format!("what color is the {}?", SHAPES[o.shape]),
                COLORS[o.color].0.into(),
                "color",
            ));
        }
        if unique(&|x| x.color, o.color) {
            candidates.push((
                format!("what shape is the {} one?", COLORS[o.color].0),
                SHAPES[o.shape].into(),
                "shape",
            ));
            candidates.push((
                format!(
                    "is the {} {} small or large?",
                    COLORS[o.color].0, SHAPES[o.shape]
                ),
                SIZES[o.size].into(),
                "size",
            ));
        }
    }
    let mut rng = crate::rng::Rng::new(seed);
    rng.shuffle(&mut candidates);
    let mut out: Vec<_> = candidates.into_iter().take(2).collect();
    if rng.below(2) == 0 {
        out.push((
            "how many shapes are there?".into(),
            COUNT_WORDS[objs.len() - 1].into(),
            "count",
        ));
    } else {
        out.push((
            "what color is the background?".into(),
            BACKGROUNDS[scene.background].0.into(),
            "background",
        ));
    }
    out
}

/// Questions about the built-in scenes `first..first + scenes`.
fn builtin(seed: u64, first: u64, scenes: usize) -> VqaSet {
    let mut ds = Dataset::synthetic("builtin VQA", seed, first, scenes, 1);
    ds.pairs.clear();
    let (mut answers, mut kinds) = (Vec::new(), Vec::new());
    for (i, image) in ds.images.clone().iter().enumerate() {
        let crate::data::ImageRef::Scene(scene) = image else {
            unreachable!("synthetic images are scenes")
        };
        let qseed = crate::rng::mix(&[seed, first + i as u64, 0x0A5C]);
        for (q, a, kind) in scene_questions(scene, qseed) {
            ds.pairs.push(crate::data::Pair {
                image: i,
                caption: q,
            });
            answers.push(BTreeMap::from([(a, 1.0)]));
            kinds.push(Some(kind.to_string()));
        }
    }
    VqaSet {
        ds: std::sync::Arc::new(ds),
        answers,
        kinds,
    }
}

fn bad(path: &Path, line: Option<usize>, message: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        message,
    }
}

/// Soft scores of one `answer` value (see the module docs).
fn answer_scores(v: &Value) -> Option<BTreeMap<String, f64>> {
    let norm = |s: &str| s.trim().to_lowercase();
    match v {
        Value::String(s) => Some(BTreeMap::from([(norm(s), 1.0)])),
        Value::Array(list) => {
            let mut counts: BTreeMap<String, f64> = BTreeMap::new();
            for a in list {
                let s = a
                    .as_str()
                    .or_else(|| a.get("answer").and_then(Value::as_str))?;
                *counts.entry(norm(s)).or_default() += 1.0;
            }
            Some(
                counts
                    .into_iter()
                    .map(|(a, n)| (a, (n / 3.0).min(1.0)))
                    .collect(),
            )
        }
        Value::Object(map) => map
            .iter()
            .map(|(a, s)| Some((norm(a), s.as_f64()?)))
            .collect(),
        _ => None,
    }
}

/// A VQA file (see the module docs), images resolved against `image_root`
/// (default: the file's directory).
fn from_file(
    path: &Path,
    image_root: Option<&Path>,
    on_error: OnError,
    limits: annotations::AnnotationLimits,
) -> Result<VqaSet> {
    let (ds, entries) = annotations::load_entries(path, image_root, "question", on_error, limits)?;
    let mut answers = Vec::with_capacity(entries.len());
    let mut kinds = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let scores = e
            .get("answer")
            .or_else(|| e.get("answers"))
            .and_then(answer_scores)
            .ok_or_else(|| {
                bad(
                    path,
                    None,
                    format!(
                        "question {i} ({:?}): `answer` must be a string, a list of answers, \
                         or an object of answer scores",
                        ds.pairs[i].caption
                    ),
                )
            })?;
        answers.push(scores);
        kinds.push(
            e.get("question_type")
                .and_then(Value::as_str)
                .map(String::from),
        );
    }
    Ok(VqaSet {
        ds: std::sync::Arc::new(ds),
        answers,
        kinds,
    })
}

/// `builtin` (train or held-out scenes of the run's config) or a file.
pub fn load(
    data: &Path,
    image_root: Option<&Path>,
    cfg: &vlmatch_registry::Config,
    train: bool,
) -> Result<VqaSet> {
    if data == Path::new("builtin") {
        let s = &cfg.data.synthetic;
        return Ok(if train {
            builtin(s.seed, 0, s.train_scenes)
        } else {
            builtin(s.seed, s.train_scenes as u64, s.heldout_scenes)
        });
    }
    from_file(
        data,
        image_root,
        cfg.data.on_error,
        annotations::AnnotationLimits::from_config(&cfg.data),
    )
}

/// VQA's head (`meter_vqa` of the `heads` plugin crate), at `vqa_head`.
pub const VQA_HEAD: &str = "meter_vqa";

/// A model with its VQA head.
pub struct VqaModel {
    pub loaded: LoadedConfig,
    pub tok: Arc<Tokenizer>,
    pub asm: Assembly,
    pub head: Box<dyn Head>,
    pub answers: Vec<String>,
}

impl VqaModel {
    /// Answer logits for a batch.
    fn logits(&self, batch: &vlmatch_core::Batch, train: bool) -> Result<Tensor> {
        let fwd = Forward::new(&self.asm.model, batch, train);
        let fused = self.asm.model.fuse_cls(fwd.text()?, fwd.image()?, train)?;
        Ok(self.head.forward(&fused.cls()))
    }
}

/// Build the run's model plus a head for `answers`; load `weights` (a
/// checkpoint path) after the head exists when `with_head`, before it
/// otherwise (a pretrained run has no head yet).
fn build(
    run_dir: &Path,
    sets: &[String],
    answers: Vec<String>,
    with_head: bool,
    device: Option<tch::Device>,
) -> Result<VqaModel> {
    let loaded = crate::run::run_config(run_dir, sets)?;
    let tok = Arc::new(crate::setup::tokenizer(&loaded)?);
    let device = match device {
        Some(d) => d,
        None => crate::setup::device(&loaded.config.train.device)?,
    };
    let (asm, env) = crate::setup::model_on(&loaded, &tok, device)?;
    // A fine-tuned run's kept weights (with the head); a pretrained run's
    // newest checkpoint (without).
    let ckpt = if with_head {
        kept_weights(run_dir)?
    } else {
        crate::checkpoint::newest_intact(run_dir)?
    };
    if !with_head {
        crate::checkpoint::load(&ckpt, &asm.vs)?;
    }
    let width = asm.model.fusion.hidden_size();
    let head = super::head(
        &loaded,
        VQA_HEAD,
        asm.vs.root() / "vqa_head",
        (width, answers.len() as i64, env.compute),
    )?;
    if with_head {
        crate::checkpoint::load(&ckpt, &asm.vs)?;
    }
    Ok(VqaModel {
        loaded,
        tok,
        asm,
        head,
        answers,
    })
}

pub struct FinetuneOptions {
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    pub image_root: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub steps: i64,
    pub lr: f64,
    pub batch_size: Option<usize>,
    pub sets: Vec<String>,
    pub progress: bool,
    /// Continue the fine-tuned run in `out` from its newest checkpoint.
    pub resume: bool,
    /// The fault tests' injected failure (`--fault`, hidden).
    pub fault: Option<crate::fault::Fault>,
}

/// The answer vocabulary: training answers by frequency (ties by name).
fn vocabulary(set: &VqaSet) -> Vec<String> {
    let mut freq: HashMap<&str, f64> = HashMap::new();
    for a in &set.answers {
        for (ans, s) in a {
            *freq.entry(ans.as_str()).or_default() += s;
        }
    }
    let mut v: Vec<(&str, f64)> = freq.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    v.into_iter().map(|(a, _)| a.to_string()).collect()
}

/// `vlmatch finetune --task vqa`: train the head and the whole model on the
/// training questions, on one process or as one rank of several; returns
/// the fine-tuned run directory.
pub fn finetune(opts: &FinetuneOptions) -> Result<PathBuf> {
    let pre = crate::run::run_config(&opts.checkpoint, &opts.sets)?;
    let (device, mut par) = crate::parallel::join_launched(&pre.config.train)?;
    let result = finetune_on(opts, &pre, device, par.as_mut());
    crate::parallel::finish(result, par)
}

fn finetune_on(
    opts: &FinetuneOptions,
    pre: &LoadedConfig,
    device: tch::Device,
    par: Option<&mut crate::parallel::Parallel>,
) -> Result<PathBuf> {
    let (rank, world) = par.as_ref().map_or((0, 1), |p| (p.rank, p.world));
    let set = load(&opts.data, opts.image_root.as_deref(), &pre.config, true)?;
    let answers = vocabulary(&set);
    if answers.is_empty() {
        return Err(bad(&opts.data, None, "no answers to learn".into()));
    }
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| opts.checkpoint.join("vqa"));
    // The head's initial draw is the run's seed's.
    super::fit::seed_initialisation(pre);
    let m = build(
        &opts.checkpoint,
        &opts.sets,
        answers.clone(),
        false,
        Some(device),
    )?;
    let c = &m.loaded.config;
    let index: HashMap<&str, usize> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| (a.as_str(), i))
        .collect();
    let n = answers.len();
    let mut targets = vec![0f32; set.answers.len() * n];
    for (q, a) in set.answers.iter().enumerate() {
        for (ans, s) in a {
            if let Some(&k) = index.get(ans.as_str()) {
                targets[q * n + k] = *s as f32;
            }
        }
    }
    let targets = Tensor::from_slice(&targets).view([set.answers.len() as i64, n as i64]);
    let bs = opts
        .batch_size
        .unwrap_or(c.train.batch_size)
        .min(set.ds.len() / world)
        .max(1);
    if rank == 0 {
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let cfg_path = out.join("config.toml");
        crate::durable::write(&cfg_path, m.loaded.to_toml())?;
        let ans_path = out.join("answers.json");
        crate::durable::write(
            &ans_path,
            serde_json::to_string_pretty(&answers).expect("json"),
        )?;
    }
    // The training loader, from the global batch the run starts at: each
    // rank's share of every batch prepared ahead on its threads; each row's
    // target is its pair's (a replaced pair's under on_error = skip).
    let mut loader: Option<Loader> = None;
    let micro = |g: i64| -> Result<Micro> {
        let l = match &mut loader {
            Some(l) => l,
            None => loader.insert(Loader::new(
                set.ds.clone(),
                m.tok.clone(),
                LoaderConfig::new(&c.data, bs, Some(c.train.seed)).shard(rank, world),
                g as u64,
            )?),
        };
        let batch = l.next_batch()?.to_device(device);
        let rows: Vec<i64> = batch.pairs.iter().map(|&i| i as i64).collect();
        let t = targets
            .index_select(0, &Tensor::from_slice(&rows))
            .to_device(device);
        let logits = m.logits(&batch, true)?;
        let total =
            logits.binary_cross_entropy_with_logits::<Tensor>(&t, None, None, tch::Reduction::Sum)
                / bs as f64;
        Ok(Micro {
            total,
            values: Vec::new(),
            losses: Vec::new(),
            surrogate: None,
        })
    };
    // The last step's weights are kept (VQA has no validation set here).
    let spec = FitSpec {
        task: "vqa",
        out: &out,
        train: &c.train,
        steps: opts.steps,
        lr: opts.lr,
        batch_size: bs,
        resume: opts.resume,
        progress: opts.progress,
        device,
        fault: opts.fault,
    };
    let fitted = fit(&spec, &m.asm.vs, par, micro, None)?;
    tracing::info!(out = %out.display(), loss = fitted.last_loss, answers = n, "fine-tuned");
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct VqaResult {
    pub questions: usize,
    pub answers: usize,
    /// Mean score of the predicted answer.
    pub accuracy: f64,
    /// The same for always answering the most frequent training answer.
    pub majority_answer: String,
    pub majority_accuracy: f64,
    /// Accuracy per question type, where the data names types.
    pub by_type: BTreeMap<String, f64>,
    /// Questions left out because their image did not decode
    /// (`data.on_error = "skip"`); the accuracies are over the others.
    pub skipped: usize,
}

/// `vlmatch eval --task vqa` on a fine-tuned run directory.
pub fn evaluate(
    run_dir: &Path,
    data: &Path,
    image_root: Option<&Path>,
    sets: &[String],
) -> Result<VqaResult> {
    let ans_path = run_dir.join("answers.json");
    let text = std::fs::read_to_string(&ans_path).map_err(|e| {
        bad(
            &ans_path,
            None,
            format!("{e}; is this a run fine-tuned with `vlmatch finetune --task vqa`?"),
        )
    })?;
    let answers: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| bad(&ans_path, Some(e.line()), format!("not a JSON list: {e}")))?;
    let m = build(run_dir, sets, answers, true, None)?;
    let c = &m.loaded.config;
    let set = load(data, image_root, c, false)?;
    let loader = LoaderConfig::new(&c.data, c.eval.batch_size, None);
    let all: Vec<usize> = (0..set.ds.len()).collect();
    // The predicted answer of each question, by the pair a row holds: under
    // on_error = skip a row whose image failed holds another question.
    let mut predicted: Vec<Option<i64>> = vec![None; all.len()];
    tch::no_grad(|| -> Result<()> {
        for batch in crate::data::loader::batches(&set.ds, &m.tok, &loader, &all) {
            let batch = batch?.to_device(m.asm.model.device);
            let best = m.logits(&batch, false)?.argmax(1, false);
            let best = Vec::<i64>::try_from(best.to_device(tch::Device::Cpu))?;
            for (&q, k) in batch.pairs.iter().zip(best) {
                predicted[q].get_or_insert(k);
            }
        }
        Ok(())
    })?;
    let score = |q: usize, a: &str| set.answers[q].get(a).copied().unwrap_or(0.0);
    let majority = m.answers[0].clone();
    let answered: Vec<usize> = (0..all.len()).filter(|&q| predicted[q].is_some()).collect();
    let n = answered.len().max(1) as f64;
    let acc: Vec<f64> = (0..all.len())
        .map(|q| predicted[q].map_or(0.0, |k| score(q, &m.answers[k as usize])))
        .collect();
    let mut by: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for &q in &answered {
        if let Some(kind) = &set.kinds[q] {
            let e = by.entry(kind.clone()).or_default();
            e.0 += acc[q];
            e.1 += 1.0;
        }
    }
    Ok(VqaResult {
        questions: set.answers.len(),
        answers: m.answers.len(),
        skipped: all.len() - answered.len(),
        accuracy: answered.iter().map(|&q| acc[q]).sum::<f64>() / n,
        majority_accuracy: answered.iter().map(|&q| score(q, &majority)).sum::<f64>() / n,
        majority_answer: majority,
        by_type: by.into_iter().map(|(k, (s, c))| (k, s / c)).collect(),
    })
}
