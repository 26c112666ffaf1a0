//! Classification tasks fine-tuned on a pretrained run, as ALBEF does them:
//! SNLI-VE (image premise, text hypothesis: entailment, neutral or
//! contradiction) and NLVR2 (two images, one sentence: true or false).
//!
//! Both put ALBEF's head, `Linear(D, D) -> ReLU -> Linear(D, classes)`
//! (parameters `cls_head.0.*`, `cls_head.2.*`), on the fused `[CLS]` and
//! train the whole model with cross-entropy.
//!
//! NLVR2 uses ALBEF's doubled fusion: the run is assembled with
//! `model.fusion.images = 2` (the fusion plugin builds two layers per
//! layer, the first cross-attending to the left image, the second to the
//! right), both layers of pair `k` start from pretrained fusion layer `k`
//! ([`pretrained_source`]), and both images go through the image encoder
//! in one pass.
//!
//! Data: ALBEF's JSON files ([`formats`]) or `builtin` ([`builtin`]):
//! training items from the run's training scenes, validation and test
//! items from the first and second half of its held-out scenes.
//!
//! A fine-tuned run directory holds `config.toml`, `downstream.json` (the
//! task, its classes, the training majority class), the best checkpoint on
//! the validation set, and `finetune.json` (validation curve, best step,
//! test accuracy); `vlmatch eval --task snli-ve|nlvr2 --checkpoint DIR`
//! reloads it.

pub mod builtin;
mod finetune;
pub mod fit;
pub mod formats;
mod task;
pub mod vqa;

pub use finetune::{evaluate, finetune, Accuracy, FinetuneOptions, FinetuneReport};
pub use task::{Items, Split, Task};

use crate::data::{Dataset, Pair};
use crate::rng::mix;
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Batch, Encoded, EncoderInput, Error, Forward, Head, Result};
use vlmatch_registry::{Assembly, LoadedConfig};

/// The built-in items of `task` in `split` of the run's scenes.
pub fn builtin_items(task: Task, cfg: &vlmatch_registry::Config, split: Split) -> Items {
    let s = &cfg.data.synthetic;
    let half = s.heldout_scenes / 2;
    let (first, scenes) = match split {
        Split::Train => (0, s.train_scenes),
        Split::Val => (s.train_scenes as u64, half),
        Split::Test => ((s.train_scenes + half) as u64, s.heldout_scenes - half),
    };
    let name = format!("builtin {} ({split:?})", task.name());
    let mut ds = Dataset::synthetic(&name, s.seed, first, scenes, 1);
    ds.pairs.clear();
    let scene = |i: usize| match &ds.images[i] {
        crate::data::ImageRef::Scene(scene) => scene.clone(),
        _ => unreachable!("synthetic images are scenes"),
    };
    let (mut pairs, mut labels, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..scenes {
        let seed = mix(&[s.seed, first + i as u64, 0x005E_EDD0]);
        // Each scene is the left image of two pairs, with right images
        // drawn from the other scenes of the split.
        let groups = match task {
            Task::SnliVe => vec![(vec![i], builtin::snli_ve_statements(&scene(i), seed))],
            Task::Nlvr2 if scenes >= 2 => {
                let mut rng = crate::rng::Rng::new(seed);
                (0..2u64)
                    .map(|n| {
                        let right = (i + 1 + rng.below(scenes - 1)) % scenes;
                        let st =
                            builtin::nlvr2_statements(&scene(i), &scene(right), mix(&[seed, n]));
                        (vec![i, right], st)
                    })
                    .collect()
            }
            Task::Nlvr2 => vec![],
        };
        for (images, statements) in groups {
            for (sentence, label, kind) in statements {
                for &image in &images {
                    pairs.push(Pair {
                        image,
                        caption: sentence.clone(),
                    });
                }
                labels.push(label);
                kinds.push(Some(kind.to_string()));
            }
        }
    }
    ds.pairs = pairs;
    Items {
        ds: Arc::new(ds),
        per_item: task.images(),
        labels,
        kinds,
    }
}

/// `builtin` (the `split` of the run's scenes) or an ALBEF file.
pub fn load_items(
    task: Task,
    data: &Path,
    image_root: Option<&Path>,
    cfg: &vlmatch_registry::Config,
    split: Split,
) -> Result<Items> {
    if data == Path::new("builtin") {
        let items = builtin_items(task, cfg, split);
        if items.is_empty() {
            return Err(Error::Config(format!(
                "the built-in {} {split:?} split is empty; raise data.synthetic.train_scenes \
                 or data.synthetic.heldout_scenes",
                task.name()
            )));
        }
        return Ok(items);
    }
    formats::load(task, data, image_root, cfg.data.on_error)
}

/// The head every classification task puts on the fused `[CLS]`: ALBEF's
/// (`albef_classifier` of the `heads` plugin crate), at `cls_head`.
pub const CLASSIFIER_HEAD: &str = "albef_classifier";

/// Build head `name` of the registry at `path` for `outputs` classes.
pub(crate) fn head(
    loaded: &LoadedConfig,
    name: &str,
    path: nn::Path<'_>,
    (width, outputs, compute): (i64, i64, Kind),
) -> Result<Box<dyn Head>> {
    let registry = crate::libraries::registry(loaded)?;
    registry.head(
        name,
        &vlmatch_registry::HeadSpec {
            path,
            width,
            outputs,
            compute,
        },
    )
}

/// The pretrained parameter a fine-tuning parameter starts from: itself,
/// except that NLVR2's fusion layers `2k` and `2k + 1` both start from
/// pretrained fusion layer `k` (ALBEF's `NLVR.py` loading).
pub fn pretrained_source(task: Task, name: &str) -> String {
    if task == Task::Nlvr2 {
        if let Some(rest) = name.strip_prefix("fusion.layer.") {
            if let Some((n, tail)) = rest.split_once('.') {
                if let Ok(n) = n.parse::<usize>() {
                    return format!("fusion.layer.{}.{tail}", n / 2);
                }
            }
        }
    }
    name.to_string()
}

/// A model with its task head.
pub struct Classifier {
    pub task: Task,
    pub loaded: LoadedConfig,
    pub tok: Arc<Tokenizer>,
    pub asm: Assembly,
    pub head: Box<dyn Head>,
    /// Replace every image by a blank one (the text-only baseline).
    pub blank_images: bool,
}

impl Classifier {
    /// Class logits `[B, classes]` of a batch of `B * images` rows (each
    /// item's images in consecutive rows, all with the item's text).
    pub fn logits(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let model = &self.asm.model;
        let mut batch = batch.shallow_clone();
        if self.blank_images {
            // Zero after normalisation: every pixel the mean colour.
            batch.images = batch.images.zeros_like();
        }
        let fused = match self.task.images() {
            1 => {
                let fwd = Forward::new(model, &batch, train);
                model.fuse_cls(fwd.text()?, fwd.image()?, train)?
            }
            _ => {
                let d = model.device;
                let n = batch.len();
                let even = Tensor::arange_start_step(0, n, 2, (Kind::Int64, d));
                let odd = &even + 1;
                // Both images of every item through the encoder in one pass.
                let images = model
                    .image
                    .forward_t(EncoderInput::Image(&batch.images), train)?;
                let (left, right): (Encoded, Encoded) = (images.select(&even), images.select(&odd));
                let text = model
                    .text
                    .forward_t(EncoderInput::Text(&batch.text.select(&even)), train)?;
                model.fusion.forward_cls(
                    EncoderInput::FusedPair {
                        text: &text,
                        images: [&left, &right],
                    },
                    train,
                )?
            }
        };
        Ok(self.head.forward(&fused.cls()))
    }
}

/// The classifier for `task` on the pretrained run `run_dir` (its newest
/// checkpoint), before any fine-tuning.
pub fn from_pretrained(task: Task, run_dir: &Path, sets: &[String]) -> Result<Classifier> {
    let weights = crate::checkpoint::newest_intact(run_dir)?;
    build(task, run_dir, sets, &weights, false, false, None)
}

/// Assemble `run_dir`'s model for `task` (with `sets`), load `weights`
/// (a pretrained checkpoint without a head, mapped by
/// [`pretrained_source`]; or a fine-tuned one with its head), and add the
/// head.
fn build(
    task: Task,
    run_dir: &Path,
    sets: &[String],
    weights: &Path,
    fine_tuned: bool,
    blank_images: bool,
    device: Option<tch::Device>,
) -> Result<Classifier> {
    let loaded = crate::run::run_config(run_dir, &task.sets(sets))?;
    let tok = Arc::new(crate::setup::tokenizer(&loaded)?);
    let device = match device {
        Some(d) => d,
        None => crate::setup::device(&loaded.config.train.device)?,
    };
    let (asm, env) = crate::setup::model_on(&loaded, &tok, device).map_err(|e| match task {
        Task::Nlvr2 => Error::Config(format!(
            "{e} (NLVR2 assembles the run with model.fusion.images = 2, ALBEF's doubled \
             fusion, which the fusion plugin must support: `cross_attention` does)"
        )),
        _ => e,
    })?;
    if !fine_tuned {
        load_pretrained(task, weights, &asm.vs)?;
    }
    let width = asm.model.fusion.hidden_size();
    let head = head(
        &loaded,
        CLASSIFIER_HEAD,
        asm.vs.root() / "cls_head",
        (width, task.classes().len() as i64, env.compute),
    )?;
    if fine_tuned {
        crate::checkpoint::load(weights, &asm.vs)?;
    }
    Ok(Classifier {
        task,
        loaded,
        tok,
        asm,
        head,
        blank_images,
    })
}

/// Fill every variable of `vs` from the pretrained checkpoint `path`, each
/// from its [`pretrained_source`].
fn load_pretrained(task: Task, path: &Path, vs: &nn::VarStore) -> Result<()> {
    let bad = |message: String| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message,
    };
    crate::checkpoint::verify(path).map_err(bad)?;
    let tensors =
        Tensor::read_safetensors(path).map_err(|e| bad(format!("cannot read checkpoint: {e}")))?;
    let model: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v)))
        .collect();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let source = pretrained_source(task, &name);
            let t = model.get(&source).ok_or_else(|| {
                bad(format!(
                    "the pretrained checkpoint lacks `{source}` (for `{name}`); was it \
                     trained with another model config?"
                ))
            })?;
            if t.size() != var.size() {
                return Err(bad(format!(
                    "`{source}` has shape {:?} in the checkpoint but `{name}` {:?} in the model",
                    t.size(),
                    var.size()
                )));
            }
            var.copy_(t);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(per_item: usize, n: usize) -> Items {
        Items {
            ds: Arc::new(Dataset::synthetic("t", 1, 0, 1, 1)),
            per_item,
            labels: vec![0; n],
            kinds: vec![None; n],
        }
    }

    #[test]
    fn slots_hold_whole_items_or_none() {
        let two = items(2, 4);
        assert_eq!(two.pairs_of(&[2, 0]), [4, 5, 0, 1]);
        // Slot 1's right image was replaced by another pair's
        // (`data.on_error = "skip"`), slot 2's left image likewise.
        assert_eq!(
            two.slot_items(&[6, 7, 2, 4, 4, 5]),
            [Some(3), None, Some(2)]
        );
        assert_eq!(two.slot_items(&[1, 2]), [None]);
        let one = items(1, 4);
        assert_eq!(one.slot_items(&[3, 3, 0]), [Some(3), Some(3), Some(0)]);
    }

    #[test]
    fn nlvr2_fusion_layers_start_from_their_pair_s_pretrained_layer() {
        for (layer, from) in [(0, 0), (1, 0), (2, 1), (3, 1), (11, 5)] {
            let name = format!("fusion.layer.{layer}.crossattention.self.query.weight");
            assert_eq!(
                pretrained_source(Task::Nlvr2, &name),
                format!("fusion.layer.{from}.crossattention.self.query.weight")
            );
            assert_eq!(pretrained_source(Task::SnliVe, &name), name);
        }
        for other in [
            "text_encoder.encoder.layer.3.output.dense.weight",
            "fusion.x",
        ] {
            assert_eq!(pretrained_source(Task::Nlvr2, other), other);
        }
    }
}
