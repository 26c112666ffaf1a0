//! Example third-party plugins for vlmatch (see PLUGINS.md):
//!
//! - encoder `conv_stem`: a small convolutional image encoder (two strided
//!   convolutions, then the feature map as tokens behind a learned `[CLS]`),
//!   with its own HuggingFace-style weight map ([`ConvStemLayout`]): it starts
//!   from, and exports to, a hub-layout directory whose `config.json` says
//!   `"model_type": "conv_stem"` and whose tensors are named `stem.conv1.*`,
//!   `stem.conv2.*` and `embeddings.cls_token`;
//! - negative sampler `shuffled_words`: the caption with its words in
//!   reverse order, a negative with the right words in the wrong relation.

use serde::Deserialize;
use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{
    Encoded, Encoder, EncoderInput, Error, Modality, NegativeSampler, Negatives, Result,
    SamplerInput, TextCodec,
};
use vlmatch_registry::weights::{CheckpointLayout, ExportContext, ExportFiles, LoadContext};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(encoder "conv_stem" => build_conv_stem, layout = &ConvStemLayout);
vlmatch_registry::register!(negative_sampler "shuffled_words" => build_shuffled_words);

/// `[model.image]` keys for `plugin = "conv_stem"`. With `init = "DIR"`
/// (a `conv_stem` checkpoint), `hidden_size` comes from `DIR/config.json`
/// and the host loads `DIR/model.safetensors` through [`ConvStemLayout`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvStemConfig {
    #[serde(default)]
    pub hidden_size: Option<i64>,
    #[serde(default)]
    pub init: Option<PathBuf>,
    #[serde(default)]
    pub allow_partial_init: bool,
}

impl ConvStemConfig {
    /// The width: the section's, else the checkpoint's `config.json`'s.
    pub fn hidden_size(&self, key: &str) -> Result<i64> {
        let from_init = match &self.init {
            None => None,
            Some(dir) => {
                vlmatch_registry::weights::check_model_type(
                    key,
                    "conv_stem",
                    Some(dir),
                    ConvStemLayout.model_types(),
                )?;
                let file = dir.join("config.json");
                let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::Data {
                        path: file.clone(),
                        line: Some(e.line()),
                        message: format!("invalid config.json: {e}"),
                    })?;
                json["hidden_size"].as_i64()
            }
        };
        match (self.hidden_size, from_init) {
            (Some(a), Some(b)) if a != b => Err(vlmatch_registry::check::invalid(
                &format!("{key}.hidden_size"),
                format!("{a} contradicts the checkpoint's hidden_size {b}"),
            )),
            (Some(w), _) | (None, Some(w)) => {
                vlmatch_registry::check::positive(&format!("{key}.hidden_size"), w)?;
                Ok(w)
            }
            (None, None) => Err(vlmatch_registry::check::invalid(
                &format!("{key}.hidden_size"),
                "must be set (or come from `init`'s config.json)",
            )),
        }
    }
}

/// `conv_stem`'s weight map: its checkpoints (as its authors would publish
/// them) name the convolutions `stem.conv1`, `stem.conv2` and the class
/// token `embeddings.cls_token`; vlmatch's parameters are `conv1`, `conv2`
/// and `cls_token`. Registered with the encoder, so vlmatch loads
/// `model.image.init` and `vlmatch export` writes the image encoder without
/// knowing this crate.
pub struct ConvStemLayout;

/// `(checkpoint prefix, parameter prefix)`.
const RENAMES: [(&str, &str); 3] = [
    ("stem.conv1.", "conv1."),
    ("stem.conv2.", "conv2."),
    ("embeddings.cls_token", "cls_token"),
];

impl CheckpointLayout for ConvStemLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["conv_stem"]
    }

    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        RENAMES
            .iter()
            .find_map(|(theirs, ours)| Some(format!("{ours}{}", name.strip_prefix(theirs)?)))
    }

    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        let cfg: ConvStemConfig = ctx.params()?;
        let tensors = ctx
            .tensors
            .iter()
            .filter_map(|(name, t)| {
                let theirs = RENAMES.iter().find_map(|(theirs, ours)| {
                    Some(format!("{theirs}{}", name.strip_prefix(ours)?))
                })?;
                Some((theirs, t.shallow_clone()))
            })
            .collect();
        Ok(Some(ExportFiles {
            config: serde_json::json!({
                "model_type": "conv_stem",
                "hidden_size": cfg.hidden_size(ctx.key)?,
                "image_size": ctx.image_size,
            }),
            tensors,
            files: vec![],
        }))
    }
}

pub struct ConvStem {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    cls: Tensor,
    hidden: i64,
}

impl Encoder for ConvStem {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn hidden_size(&self) -> i64 {
        self.hidden
    }
    fn forward_t(&self, input: EncoderInput<'_>, _train: bool) -> Result<Encoded> {
        let EncoderInput::Image(images) = input else {
            return Err(Error::plugin("conv_stem", "an image encoder takes images"));
        };
        let b = images.size()[0];
        let maps = images.apply(&self.conv1).relu().apply(&self.conv2).relu();
        let tokens = maps.flatten(2, 3).transpose(1, 2);
        let hidden = Tensor::cat(&[self.cls.expand([b, 1, self.hidden], false), tokens], 1);
        let mask = Tensor::ones([b, hidden.size()[1]], (Kind::Int64, hidden.device()));
        Ok(Encoded { hidden, mask })
    }
}

fn build_conv_stem(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let cfg: ConvStemConfig = ctx.params()?;
    let hidden = cfg.hidden_size(&ctx.key)?;
    let conv = |stride| nn::ConvConfig {
        stride,
        padding: 1,
        ..Default::default()
    };
    let p = &ctx.path;
    Ok(Rc::new(ConvStem {
        conv1: nn::conv2d(p / "conv1", 3, hidden, 3, conv(2)),
        conv2: nn::conv2d(p / "conv2", hidden, hidden, 3, conv(2)),
        cls: p.var(
            "cls_token",
            &[1, 1, hidden],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        ),
        hidden,
    }))
}

/// `[samplers.<name>]` for `plugin = "shuffled_words"` has no keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShuffledWordsConfig {}

pub struct ShuffledWords {
    codec: Rc<dyn TextCodec>,
}

/// The caption's words in reverse order, or `None` if that changes nothing.
pub fn reversed(caption: &str) -> Option<String> {
    let words: Vec<&str> = caption.split_whitespace().rev().collect();
    let out = words.join(" ");
    (out != caption.split_whitespace().collect::<Vec<_>>().join(" ")).then_some(out)
}

impl NegativeSampler for ShuffledWords {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let batch = input.forward.batch;
        let device = batch.text.ids.device();
        let (index, texts): (Vec<i64>, Vec<String>) = batch
            .captions
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i as i64, reversed(c)?)))
            .unzip();
        Ok(Negatives::from_texts(
            self.codec.as_ref(),
            &index,
            &texts,
            device,
        ))
    }
}

fn build_shuffled_words(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let _: ShuffledWordsConfig = ctx.params()?;
    Ok(Box::new(ShuffledWords {
        codec: ctx.env.text.clone(),
    }))
}
