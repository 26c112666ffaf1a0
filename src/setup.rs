//! From a loaded configuration to the pieces a run needs: device, precision,
//! tokenizer, datasets, and the assembled model.

use crate::data::loader::Source;
use crate::data::webdataset::Shards;
use crate::data::{annotations, Dataset};
use crate::tokenizer::{Codec, Tokenizer};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Kind};
use vlmatch_core::{Error, Result};
use vlmatch_registry::config::{DataSource, Precision, TrainDevice};
use vlmatch_registry::{assemble, Assembly, LoadedConfig, ModelEnv};

/// The device `train.device` names on one process.
pub fn device(choice: &TrainDevice) -> Result<Device> {
    Ok(match *choice {
        TrainDevice::Auto => Device::cuda_if_available(),
        TrainDevice::Cpu => Device::Cpu,
        TrainDevice::Cuda => Device::Cuda(0),
        TrainDevice::CudaIndex(n) => Device::Cuda(n),
    })
}

/// The device of a data-parallel rank for `train.device = name`: `auto`
/// and `cuda` give `cuda:LOCAL_RANK`, or `cuda:0` when the process sees a
/// single GPU (`CUDA_VISIBLE_DEVICES` already picked it); `auto` is the CPU
/// where there is no GPU. `cpu` and an explicit `cuda:N` are kept.
pub fn rank_device(choice: &TrainDevice, local_rank: usize) -> Result<Device> {
    let gpus = if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    };
    match choice {
        TrainDevice::Auto | TrainDevice::Cuda if gpus > 0 => {
            if gpus == 1 {
                Ok(Device::Cuda(0))
            } else if local_rank < gpus {
                Ok(Device::Cuda(local_rank))
            } else {
                Err(Error::Config(format!(
                    "config key `train.device`: local rank {local_rank} has no GPU of its own \
                     ({gpus} visible); start at most {gpus} ranks per machine, or set \
                     CUDA_VISIBLE_DEVICES per rank"
                )))
            }
        }
        TrainDevice::Auto => Ok(Device::Cpu),
        other => device(other),
    }
}

/// The compute dtype `train.precision` gives on `device`.
pub fn compute_kind(precision: Precision, device: Device) -> Kind {
    match (precision, device) {
        (Precision::Auto, Device::Cuda(_)) | (Precision::Bf16, _) => Kind::BFloat16,
        (Precision::Auto, _) | (Precision::Fp32, _) => Kind::Float,
    }
}

/// The run's tokenizer: `data.vocab` (a `vocab.txt`, a HuggingFace
/// `tokenizer.json`, or a directory holding either); with `builtin`, the
/// text checkpoint's (`model.text.init`: its `tokenizer.json`, else its
/// `vocab.txt`), else the built-in vocabulary.
pub fn tokenizer(cfg: &LoadedConfig) -> Result<Tokenizer> {
    let data = &cfg.config.data;
    let init: Option<std::path::PathBuf> = cfg.figment.extract_inner("model.text.init").ok();
    let mut tok = if data.vocab == "builtin" {
        // A text encoder initialised from a checkpoint brings its vocabulary.
        match init.filter(|d| d.join("tokenizer.json").is_file() || d.join("vocab.txt").is_file()) {
            Some(dir) => Tokenizer::from_path(&dir, data.lowercase)?,
            None => {
                let mut tok = Tokenizer::builtin();
                tok.max_caption_bytes = data.max_caption_bytes;
                return Ok(tok);
            }
        }
    } else {
        Tokenizer::from_path(Path::new(&data.vocab), data.lowercase)?
    };
    // Captions are cut to `data.max_caption_bytes` before tokenising.
    tok.max_caption_bytes = data.max_caption_bytes;
    tracing::info!(
        tokenizer = tok.origin(),
        vocab_size = tok.vocab_size(),
        "loaded the tokenizer"
    );
    Ok(tok)
}

/// First scene index of the held-out split: far from the training scenes.
const HELDOUT_FIRST_SCENE: u64 = 1 << 40;

/// The training and (optional) held-out datasets.
pub fn datasets(cfg: &LoadedConfig) -> Result<(Dataset, Option<Dataset>)> {
    let data = &cfg.config.data;
    match data.source {
        DataSource::Synthetic => {
            let s = &data.synthetic;
            let train = Dataset::synthetic(
                "synthetic-train",
                s.seed,
                0,
                s.train_scenes,
                s.captions_per_scene,
            );
            let heldout = (s.heldout_scenes > 0).then(|| {
                Dataset::synthetic(
                    "synthetic-heldout",
                    s.seed,
                    HELDOUT_FIRST_SCENE,
                    s.heldout_scenes,
                    s.captions_per_scene,
                )
            });
            Ok((train, heldout))
        }
        DataSource::Annotations => {
            let path = data.annotations.as_ref().ok_or_else(|| {
                Error::Config(
                    "config key `data.annotations`: required when data.source = \"annotations\""
                        .into(),
                )
            })?;
            let root = data.image_root.as_deref();
            let train = annotations::load_checked_within(
                path,
                root,
                data.split.as_deref(),
                data.on_error,
                annotations::AnnotationLimits::from_config(data),
            )?;
            Ok((train, heldout(cfg)?))
        }
        DataSource::Webdataset => Err(Error::Config(
            "config key `data.source`: \"webdataset\" shards are streamed for training; this \
             command needs an in-memory dataset (data.source = \"annotations\")"
                .into(),
        )),
    }
}

/// The held-out set `data.heldout_annotations` names: an annotation file, or
/// tar shards (a `.tar` path or a brace pattern).
fn heldout(cfg: &LoadedConfig) -> Result<Option<Dataset>> {
    let data = &cfg.config.data;
    let Some(p) = &data.heldout_annotations else {
        return Ok(None);
    };
    let text = p.to_str().ok_or_else(|| {
        Error::Config(format!(
            "config key `data.heldout_annotations`: not UTF-8: {}",
            p.display()
        ))
    })?;
    crate::data::load_any_within(
        text,
        data.image_root.as_deref(),
        data.heldout_split.as_deref(),
        data,
    )
    .map(Some)
}

/// What training reads: an in-memory dataset, or for `webdataset` the
/// resolved shards; and the held-out set, if any.
pub fn train_source(cfg: &LoadedConfig) -> Result<(Source, Option<Dataset>)> {
    let data = &cfg.config.data;
    if let Some(train) = indexed_train(data)? {
        return Ok((Source::Pairs(Arc::new(train)), heldout(cfg)?));
    }
    if data.source != DataSource::Webdataset {
        let (train, heldout) = datasets(cfg)?;
        return Ok((Source::Pairs(Arc::new(train)), heldout));
    }
    let pattern = data.shards.as_deref().ok_or_else(|| {
        Error::Config("config key `data.shards`: required when data.source = \"webdataset\"".into())
    })?;
    let shards = Shards::resolve(pattern, "config key `data.shards`", data.shuffle_buffer)?
        .with_limits(crate::data::webdataset::MemberLimits::from_config(data));
    Ok((Source::Shards(shards), heldout(cfg)?))
}

/// The training annotation file read through its index
/// (`crate::data::index`), unless `data.index = "off"`, a Karpathy split
/// is asked for, or the file is in Karpathy format (then `None`: it is
/// loaded whole, as [`datasets`] does).
fn indexed_train(data: &vlmatch_registry::config::DataConfig) -> Result<Option<Dataset>> {
    use vlmatch_registry::config::AnnotationIndexMode;
    let (DataSource::Annotations, AnnotationIndexMode::Auto, None, Some(path)) =
        (data.source, data.index, &data.split, &data.annotations)
    else {
        return Ok(None);
    };
    crate::data::index::open_dataset(
        path,
        data.image_root.as_deref(),
        data.on_error,
        annotations::AnnotationLimits::from_config(data),
    )
}

/// libtorch intra-op threads: `train.threads`, or every core when 0.
pub fn threads(train: &vlmatch_registry::config::TrainConfig) -> usize {
    if train.threads > 0 {
        train.threads
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// [`threads`] for one of several ranks on a machine: with `train.threads
/// = 0` the cores are shared among the machine's ranks (`LOCAL_WORLD_SIZE`,
/// which torchrun sets; else `SLURM_NTASKS_PER_NODE`).
pub fn rank_threads(train: &vlmatch_registry::config::TrainConfig) -> usize {
    if train.threads > 0 {
        return train.threads;
    }
    let local: usize = ["LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"]
        .iter()
        // Slurm may write `8(x4)`: 8 tasks on each of 4 nodes.
        .find_map(|v| {
            let text = std::env::var(v).ok()?;
            let digits: String = text
                .trim()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .filter(|n| *n > 0)
        .unwrap_or(1);
    (threads(train) / local).max(1)
}

/// Assemble the model for `cfg` on its device.
pub fn model(cfg: &LoadedConfig, tok: &Arc<Tokenizer>) -> Result<(Assembly, ModelEnv)> {
    model_on(cfg, tok, device(&cfg.config.train.device)?)
}

/// Assemble the model for `cfg` on `device` (a data-parallel rank's,
/// [`rank_device`]).
pub fn model_on(
    cfg: &LoadedConfig,
    tok: &Arc<Tokenizer>,
    device: Device,
) -> Result<(Assembly, ModelEnv)> {
    let registry = crate::libraries::registry(cfg)?;
    let env = model_env(cfg, tok, device)?;
    let assembly = assemble(&registry, cfg, &env)?;
    Ok((assembly, env))
}

/// What plugins of `cfg` are built with on `device`: the vocabulary, sizes,
/// compute precision and the host's masked-LM loader.
pub fn model_env(cfg: &LoadedConfig, tok: &Arc<Tokenizer>, device: Device) -> Result<ModelEnv> {
    let train = &cfg.config.train;
    // Every command that decodes images builds a model first.
    crate::data::loader::set_max_image_pixels(cfg.config.data.max_image_pixels);
    if let Device::Cuda(n) = device {
        if !tch::Cuda::is_available() || n >= tch::Cuda::device_count() as usize {
            return Err(Error::Config(format!(
                "config key `train.device`: CUDA device {n} is not available (devices: {}); use `auto` or `cpu`",
                tch::Cuda::device_count()
            )));
        }
    }
    Ok(ModelEnv {
        vocab_size: tok.vocab_size(),
        special: tok.special,
        text: Rc::new(Codec {
            tokenizer: tok.clone(),
            max_len: cfg.config.data.max_len as usize,
        }),
        image_size: cfg.config.data.image_size,
        max_text_len: cfg.config.data.max_len,
        device,
        compute: compute_kind(train.precision, device),
        masked_lm: Some(crate::pretrained::load_masked_lm),
        checkpointer: Some(vlmatch_dist::checkpoint::checkpoint),
    })
}
