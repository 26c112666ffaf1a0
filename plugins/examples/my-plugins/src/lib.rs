//! Example third-party plugins for vlmatch (see PLUGINS.md):
//!
//! - encoder `conv_stem`: a small convolutional image encoder (two strided
//!   convolutions, then the feature map as tokens behind a learned `[CLS]`);
//! - negative sampler `shuffled_words`: the caption with its words in
//!   reverse order, a negative with the right words in the wrong relation.

use serde::Deserialize;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{
    Encoded, Encoder, EncoderInput, Error, Modality, NegativeSampler, Negatives, Result,
    SamplerInput, TextCodec,
};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(encoder "conv_stem" => build_conv_stem);
vlmatch_registry::register!(negative_sampler "shuffled_words" => build_shuffled_words);

/// `[model.image]` keys for `plugin = "conv_stem"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvStemConfig {
    pub hidden_size: i64,
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
    let conv = |stride| nn::ConvConfig {
        stride,
        padding: 1,
        ..Default::default()
    };
    let p = &ctx.path;
    Ok(Rc::new(ConvStem {
        conv1: nn::conv2d(p / "conv1", 3, cfg.hidden_size, 3, conv(2)),
        conv2: nn::conv2d(p / "conv2", cfg.hidden_size, cfg.hidden_size, 3, conv(2)),
        cls: p.var(
            "cls_token",
            &[1, 1, cfg.hidden_size],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        ),
        hidden: cfg.hidden_size,
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
