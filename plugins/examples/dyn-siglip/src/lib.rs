//! Two plugins written once with the SDK, for static or dynamic linking:
//!
//! - encoder `conv_stem`: an image stem with the parameter names of
//!   HuggingFace's `CLIPVisionEmbeddings` (`embeddings.patch_embedding`,
//!   `embeddings.class_embedding`, `embeddings.position_embedding`) and a
//!   `post_layernorm`: patches by a strided convolution, a class token,
//!   learnt positions, layer norm. No transformer layers: small on purpose.
//!   Its checkpoint layout ([`StemLayout`]) exports it and starts it from
//!   an export, through the library boundary.
//! - objective `sigmoid_pairs`: SigLIP's pairwise sigmoid loss (Zhai et al.
//!   2023), `-1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b))` over the global
//!   batch, `z_ij = 1` for positives (the batch's positive relation) and
//!   `-1` otherwise; `t = exp(logit_scale)` and `b = logit_bias` learnt.
//! - objective `pair_match`: a small matching loss that reads what the
//!   host's forward offers besides embeddings: the cached image and text
//!   states, the fusion encoder and the discriminator, keyed random draws,
//!   the positive relation and the global mean. Each image is fused with
//!   its caption and with a caption drawn at random from the batch; the
//!   pair logits are trained to say which match (a drawn positive counts as
//!   a match).
//! - negative sampler `next_caption`: for each pair, the next candidate of
//!   the in-batch candidates (ITM's), unless it is a positive.
//! - generator `tied_decoder`: a masked-LM head without a transform: layer
//!   norm, then the text encoder's word embeddings (tied: the decoder
//!   trains the host's embedding matrix) plus a bias.
//! - discriminator `mlp_heads`: ITM's pair head as dense + tanh + 2-way
//!   linear on the fused `[CLS]` (a pooler, as BERT's), and a per-token
//!   linear RTD head.
//! - hook `loss_ema` (on with a `[hooks.loss_ema]` section): an average of
//!   the loss over micro-batches, kept across a resume (a tensor and a
//!   step counter in the hook's state), logged as `loss_ema` and
//!   `loss_ema_steps`; the loss is multiplied by `scale` before it is
//!   back-propagated; after the objectives it reads the host's ITC
//!   embeddings through the forward cache and logs the micro-batch's mean
//!   similarity of its own pairs (`pair_similarity`). A hook in a library
//!   does not see the model at build time.

use std::rc::Rc;
use vlmatch_plugin_sdk::core::hook::priority;
use vlmatch_plugin_sdk::core::readback;
use vlmatch_plugin_sdk::core::{
    Discriminator, Encoded, Encoder, EncoderInput, Error, Forward, Generator, Hook, HookState,
    Modality, NegativeSampler, Negatives, Objective, ObjectiveOutput, Result, RunStart,
    SamplerInput,
};
use vlmatch_plugin_sdk::registry::hooks::HookContext;
use vlmatch_plugin_sdk::registry::weights::{
    CheckpointLayout, ExportContext, ExportFiles, LoadContext,
};
use vlmatch_plugin_sdk::tch::{self as tch, nn, nn::Module, Kind, Tensor};
use vlmatch_plugin_sdk::{export, register, BuildContext};

register!(encoder "conv_stem" => build_stem, layout = &CONV_STEM_LAYOUT);
register!(objective "sigmoid_pairs" => build_pairs);
register!(objective "pair_match" => build_match);
register!(negative_sampler "next_caption" => build_next);
register!(generator "tied_decoder" => build_decoder);
register!(discriminator "mlp_heads" => build_heads);
register!(hook "loss_ema" => build_ema);
export!();

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StemConfig {
    hidden_size: i64,
    patch_size: i64,
    /// A directory `vlmatch export` wrote for this stem (its layout).
    #[serde(default)]
    #[allow(dead_code)]
    init: Option<String>,
}

/// The stem's checkpoint layout: its own `model_type`, the parameters
/// under their own names, and `config.json` with its two sizes. So a
/// trained stem exports (`vlmatch export`) and another run starts from
/// the export (`model.image.init`).
pub struct StemLayout;

pub static CONV_STEM_LAYOUT: StemLayout = StemLayout;

impl CheckpointLayout for StemLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["vlmatch_conv_stem"]
    }
    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        (name.starts_with("embeddings.") || name.starts_with("post_layernorm."))
            .then(|| name.to_string())
    }
    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        let size = |k: &str| {
            ctx.section[k].as_i64().ok_or_else(|| {
                Error::Config(format!("config key `{}.{k}`: expected an integer", ctx.key))
            })
        };
        let config = format!(
            r#"{{"model_type": "vlmatch_conv_stem", "hidden_size": {}, "patch_size": {}, "image_size": {}}}"#,
            size("hidden_size")?,
            size("patch_size")?,
            ctx.image_size
        );
        Ok(Some(ExportFiles {
            config: config
                .parse()
                .map_err(|e| Error::Config(format!("stem config: {e}")))?,
            tensors: ctx.tensors_prefixed(""),
            files: Vec::new(),
        }))
    }
}

/// The convolutional image stem.
pub struct ConvStem {
    patch: nn::Conv2D,
    class: Tensor,
    positions: nn::Embedding,
    norm: nn::LayerNorm,
    hidden_size: i64,
}

fn build_stem(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let c: StemConfig = ctx.params()?;
    let size = ctx.env.image_size;
    if c.hidden_size <= 0 || c.patch_size <= 0 || size % c.patch_size != 0 {
        return Err(Error::Config(format!(
            "config key `{}`: hidden_size and patch_size must be positive and patch_size must divide data.image_size ({size}); got {} and {}",
            ctx.key, c.hidden_size, c.patch_size
        )));
    }
    let p = &ctx.path / "embeddings";
    let conv = nn::ConvConfig {
        stride: c.patch_size,
        bias: false,
        ..Default::default()
    };
    let patches = (size / c.patch_size) * (size / c.patch_size);
    let init = nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    Ok(Rc::new(ConvStem {
        patch: nn::conv2d(&p / "patch_embedding", 3, c.hidden_size, c.patch_size, conv),
        class: p.var("class_embedding", &[c.hidden_size], init),
        positions: nn::embedding(
            &p / "position_embedding",
            patches + 1,
            c.hidden_size,
            nn::EmbeddingConfig {
                ws_init: init,
                ..Default::default()
            },
        ),
        norm: nn::layer_norm(
            &ctx.path / "post_layernorm",
            vec![c.hidden_size],
            Default::default(),
        ),
        hidden_size: c.hidden_size,
    }))
}

impl Encoder for ConvStem {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn hidden_size(&self) -> i64 {
        self.hidden_size
    }
    fn forward_t(&self, input: EncoderInput<'_>, _train: bool) -> Result<Encoded> {
        let EncoderInput::Image(images) = input else {
            return Err(Error::plugin("conv_stem", "takes images"));
        };
        let x = images.apply(&self.patch).flatten(2, 3).transpose(1, 2);
        let b = x.size()[0];
        let class = self.class.view([1, 1, -1]).expand([b, 1, -1], false);
        let x = Tensor::cat(&[class, x], 1);
        let n = x.size()[1];
        let positions = Tensor::arange(n, (Kind::Int64, x.device()));
        let x = x + self.positions.forward(&positions).unsqueeze(0);
        Ok(Encoded::all_valid(x.apply(&self.norm)))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PairsConfig {
    #[serde(default = "ten")]
    init_scale: f64,
    #[serde(default = "minus_ten")]
    init_bias: f64,
}

fn ten() -> f64 {
    10.0
}

fn minus_ten() -> f64 {
    -10.0
}

/// SigLIP-style sigmoid loss over every image-text pair of the global batch.
pub struct SigmoidPairs {
    logit_scale: Tensor,
    logit_bias: Tensor,
    name: String,
}

fn build_pairs(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    let c: PairsConfig = ctx.params()?;
    if c.init_scale <= 0.0 || !c.init_bias.is_finite() {
        return Err(Error::Config(format!(
            "config key `{}.init_scale`: expected a positive scale and a finite bias, got {} and {}",
            ctx.key, c.init_scale, c.init_bias
        )));
    }
    Ok(Box::new(SigmoidPairs {
        logit_scale: ctx
            .path
            .var("logit_scale", &[], nn::Init::Const(c.init_scale.ln())),
        logit_bias: ctx
            .path
            .var("logit_bias", &[], nn::Init::Const(c.init_bias)),
        name: ctx.section_name().to_string(),
    }))
}

impl Objective for SigmoidPairs {
    fn forward(&self, forward: &Forward<'_>, _step: i64) -> Result<ObjectiveOutput> {
        let (images, texts) = forward.embeds()?;
        let all_texts = match forward.collective() {
            Some(c) => c.all_gather_with_grad(texts)?,
            None => texts.shallow_clone(),
        };
        let positives = forward.positives()?.to_kind(Kind::Float);
        let logits = images.matmul(&all_texts.tr()) * self.logit_scale.exp() + &self.logit_bias;
        let signs = positives * 2.0 - 1.0;
        let rows = images.size()[0] as f64;
        let loss = -(signs * logits).log_sigmoid().sum(Kind::Float) / rows;
        Ok(ObjectiveOutput {
            losses: vec![(self.name.clone(), loss)],
            metrics: vec![(
                format!("{}_scale", self.name),
                self.logit_scale.exp().detach(),
            )],
        })
    }
    fn contrastive(&self) -> bool {
        true
    }
}

/// See the crate's documentation.
pub struct PairMatch {
    name: String,
}

fn build_match(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoKeys {}
    let _: NoKeys = ctx.params()?;
    Ok(Box::new(PairMatch {
        name: ctx.section_name().to_string(),
    }))
}

impl Objective for PairMatch {
    fn forward(&self, forward: &Forward<'_>, _step: i64) -> Result<ObjectiveOutput> {
        let (image, text) = (forward.image()?, forward.text()?);
        let b = forward.batch.len();
        let device = image.hidden.device();
        // Caption `(i + 1 + k) % b` for image `i`, `k` below `b - 1` drawn
        // from the row's keyed uniform.
        let u = vlmatch_plugin_sdk::core::random::uniform(&forward.random_keys(), 1).view([b]);
        let offset = (u * (b - 1).max(1) as f64)
            .floor()
            .to_kind(Kind::Int64)
            .clamp(0, (b - 2).max(0))
            + 1;
        let drawn = (Tensor::arange(b, (Kind::Int64, device)) + offset).remainder(b);
        let drawn_text = text.select(&drawn);
        let model = forward.model;
        let fused = [
            model.fuse_cls(text, image, forward.train)?,
            model.fuse_cls(&drawn_text, image, forward.train)?,
        ];
        let logits = Tensor::cat(
            &[
                model.discriminator.pair_logits(&fused[0])?,
                model.discriminator.pair_logits(&fused[1])?,
            ],
            0,
        );
        let drawn_positive = forward
            .positives()?
            .gather(1, &drawn.unsqueeze(1), false)
            .view([b])
            .to_kind(Kind::Int64);
        let labels = Tensor::cat(
            &[Tensor::ones([b], (Kind::Int64, device)), drawn_positive],
            0,
        );
        let sum = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            &labels,
            None,
            tch::Reduction::Sum,
            -100,
            0.0,
        );
        let count = Tensor::from(2 * b).to_kind(Kind::Float).to_device(device);
        Ok(ObjectiveOutput {
            losses: vec![(self.name.clone(), forward.global_mean(&sum, &count)?)],
            metrics: Vec::new(),
        })
    }
}

/// See the crate's documentation.
pub struct NextCaption;

fn build_next(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoKeys {}
    let _: NoKeys = ctx.params()?;
    Ok(Box::new(NextCaption))
}

impl NegativeSampler for NextCaption {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let f = input.forward;
        let candidates = f.negative_texts()?.hidden.size()[0];
        tch::no_grad(|| {
            // The candidates are the global batch, or this rank's pairs.
            let positives = if candidates == f.batch.len() {
                f.batch.positives()
            } else {
                f.positives()?
            };
            let next = (f.own_candidates() + 1).remainder(candidates);
            let is_positive = positives
                .gather(1, &next.unsqueeze(1), false)
                .squeeze_dim(1);
            let next = next.masked_fill(&is_positive, -1);
            Ok(Negatives::InBatch {
                text_for_image: next.shallow_clone(),
                image_for_text: next,
            })
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

/// See the crate's documentation.
pub struct TiedDecoder {
    norm: nn::LayerNorm,
    embeddings: Tensor,
    bias: Tensor,
}

fn build_decoder(ctx: &BuildContext<'_>) -> Result<Rc<dyn Generator>> {
    let _: NoKeys = ctx.params()?;
    let tied = ctx
        .text_encoder
        .as_ref()
        .and_then(|t| t.word_embeddings())
        .ok_or_else(|| {
            Error::Config(format!(
                "config key `{}`: tied_decoder needs a text encoder with word embeddings",
                ctx.key
            ))
        })?;
    let (vocab, width) = tied.size2()?;
    Ok(Rc::new(TiedDecoder {
        norm: nn::layer_norm(&ctx.path / "norm", vec![width], Default::default()),
        embeddings: tied,
        bias: ctx.path.zeros("bias", &[vocab]),
    }))
}

impl Generator for TiedDecoder {
    fn logits(&self, states: &Encoded, _train: bool) -> Result<Tensor> {
        let h = states.hidden.to_kind(Kind::Float).apply(&self.norm);
        Ok(h.matmul(&self.embeddings.tr()) + &self.bias)
    }
}

/// See the crate's documentation.
pub struct MlpHeads {
    pooler: nn::Linear,
    pair: nn::Linear,
    token: nn::Linear,
}

fn build_heads(ctx: &BuildContext<'_>) -> Result<Rc<dyn Discriminator>> {
    let _: NoKeys = ctx.params()?;
    let w = ctx.width("fusion")?;
    let p = &ctx.path;
    Ok(Rc::new(MlpHeads {
        pooler: nn::linear(p / "pooler", w, w, Default::default()),
        pair: nn::linear(p / "pair", w, 2, Default::default()),
        token: nn::linear(p / "token", w, 1, Default::default()),
    }))
}

impl Discriminator for MlpHeads {
    fn token_logits(&self, fused: &Encoded) -> Result<Tensor> {
        let h = fused.hidden.to_kind(Kind::Float);
        Ok(h.apply(&self.token).squeeze_dim(-1))
    }
    fn pair_logits(&self, fused: &Encoded) -> Result<Tensor> {
        let cls = fused.cls().to_kind(Kind::Float);
        Ok(cls.apply(&self.pooler).tanh().apply(&self.pair))
    }
}

/// `[hooks.loss_ema]`: the hook's keys.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EmaConfig {
    /// The average's decay per micro-batch.
    decay: f64,
    /// A factor on the loss before it is back-propagated.
    scale: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.9,
            scale: 1.0,
        }
    }
}

/// See the crate's documentation.
pub struct LossEma {
    decay: f64,
    scale: f64,
    /// The average (a CPU scalar; saved and restored with the run).
    /// Reading the loss synchronises a GPU each micro-batch.
    ema: Tensor,
    /// Optimizer steps taken (saved and restored with the run; counted
    /// after each optimizer step, so a checkpoint of step N holds N).
    steps: std::cell::Cell<i64>,
    /// The last micro-batch's mean ITC similarity of its own pairs.
    pair_similarity: std::cell::RefCell<Option<Tensor>>,
}

fn build_ema(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    if !ctx.enabled(false) {
        return Ok(None);
    }
    let c: EmaConfig = ctx.params()?;
    if !(0.0..1.0).contains(&c.decay) || !c.scale.is_finite() {
        return Err(Error::Config(format!(
            "config key `hooks.{}`: expected 0 <= decay < 1 and a finite scale, got {} and {}",
            ctx.name, c.decay, c.scale
        )));
    }
    Ok(Some(Box::new(LossEma {
        decay: c.decay,
        scale: c.scale,
        ema: Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
        steps: Default::default(),
        pair_similarity: Default::default(),
    })))
}

impl Hook for LossEma {
    fn priority(&self) -> i32 {
        priority::LOGGING
    }
    fn state(&self) -> HookState {
        HookState {
            tensors: vec![("ema".into(), self.ema.shallow_clone())],
            counters: vec![("steps".into(), self.steps.get())],
        }
    }
    fn set_counters(&mut self, counters: &[(String, i64)]) -> Result<()> {
        for (name, value) in counters {
            match name.as_str() {
                "steps" if *value >= 0 => self.steps.set(*value),
                _ => {
                    return Err(Error::Config(format!(
                        "loss_ema: counter `{name}` = {value} is not one of its own"
                    )))
                }
            }
        }
        Ok(())
    }
    fn on_start(&mut self, start: RunStart) -> Result<()> {
        // The counter restored with the checkpoint says where the run is.
        if self.steps.get() != start.step {
            return Err(Error::Config(format!(
                "loss_ema: restored at {} steps, but the run starts at step {}",
                self.steps.get(),
                start.step
            )));
        }
        Ok(())
    }
    fn after_objectives(&self, forward: &Forward<'_>) {
        // The host's ITC embeddings, read through the forward cache.
        if let Ok((images, texts)) = forward.embeds() {
            let s = (images * texts).sum_dim_intlist(1, false, Kind::Float);
            *self.pair_similarity.borrow_mut() = Some(s.mean(Kind::Float).detach());
        }
    }
    fn before_backward(&self, _step: i64, loss: Tensor) -> Tensor {
        // One counted read-back per micro-batch: an example, not for speed.
        let value = readback::to_vec::<f32>(&loss.detach().to_kind(Kind::Float));
        if let Some(v) = value.ok().and_then(|v| v.first().copied()) {
            let next = &self.ema * self.decay + f64::from(v) * (1.0 - self.decay);
            let mut ema = self.ema.shallow_clone();
            tch::no_grad(|| ema.copy_(&next));
        }
        loss * self.scale
    }
    fn on_log(&mut self, _step: i64, line: &mut Vec<(String, f64)>) {
        let ema = readback::to_vec::<f32>(&self.ema).ok();
        let ema = ema
            .and_then(|v| v.first().copied())
            .map_or(f64::NAN, f64::from);
        line.push(("loss_ema".into(), ema));
        line.push(("loss_ema_steps".into(), self.steps.get() as f64));
        if let Some(s) = self.pair_similarity.borrow().as_ref() {
            let s = readback::to_vec::<f32>(s)
                .ok()
                .and_then(|v| v.first().copied());
            line.push(("pair_similarity".into(), s.map_or(f64::NAN, f64::from)));
        }
    }
    fn after_optimizer_step(&self, _applied: &Tensor) {
        self.steps.set(self.steps.get() + 1);
    }
}
