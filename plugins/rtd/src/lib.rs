//! VL-RTD, vision-language replaced token detection (`shared/method.md`;
//! ELECTRA's generator/discriminator, Clark et al. 2020, with the image in
//! the discriminator):
//!
//! 1. choose 15% of the non-special tokens and replace them by `[MASK]`;
//! 2. the generator (text encoder + MLM head, text alone) predicts them:
//!    `L_gen`, cross-entropy on the chosen positions;
//! 3. sample replacements from it without gradient (temperature
//!    configurable); a sample equal to the original counts as original;
//! 4. the discriminator (text encoder on the corrupted text, fusion with the
//!    image, per-token head) says which tokens were replaced: `L_disc`,
//!    binary cross-entropy over all non-pad tokens;
//! 5. `L_rtd = L_gen + lambda * L_disc` (default lambda 50 as in ELECTRA;
//!    the experiment presets use 1: at 50 the token loss dominated the
//!    encoders shared with ITC and ITM and VL-RTD fell far behind the
//!    baseline, see `bench/ABLATION.md`).
//!
//! By default the generator shares the text encoder with the discriminator
//! (`share_text_encoder = true`). With `false`, `[objectives.<name>.generator_text]`
//! configures its own text encoder (ELECTRA uses a narrower one) with its
//! own MLM head of the `[model.generator]` plugin.
//!
//! Registered as objective `rtd`. Loss keys: `gen` (`L_gen`) and the section
//! name (`lambda * L_disc`), so the two sum to `L_rtd`. Metrics:
//! `<name>_disc` (`L_disc`), `<name>_acc` (token accuracy),
//! `<name>_replaced` (share of real tokens replaced).

use serde::Deserialize;
use std::rc::Rc;
use tch::{Kind, Tensor};
use vlmatch_core::{
    Encoder, EncoderInput, Error, FillOptions, Forward, Generator, Modality, Objective,
    ObjectiveOutput, Result, SpecialTokens, TextBatch,
};
use vlmatch_layers::masking;
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(objective "rtd" => build);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtdConfig {
    #[serde(default = "ratio")]
    pub mask_ratio: f64,
    /// Sampling temperature of the generator.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Weight of the discriminator loss within `L_rtd`.
    #[serde(default = "lambda")]
    pub lambda: f64,
    /// Whether the generator reads the text with the model's text encoder.
    #[serde(default = "yes")]
    pub share_text_encoder: bool,
    /// The generator's own text encoder section (when not shared); parsed by
    /// that encoder plugin.
    #[serde(default)]
    pub generator_text: Option<serde::de::IgnoredAny>,
}

fn yes() -> bool {
    true
}

fn ratio() -> f64 {
    0.15
}
fn one() -> f64 {
    1.0
}
fn lambda() -> f64 {
    50.0
}

pub struct Rtd {
    name: String,
    cfg: RtdConfig,
    special: SpecialTokens,
    /// The generator's own text encoder and head, when not shared.
    own_generator: Option<(Rc<dyn Encoder>, Rc<dyn Generator>)>,
}

/// The corrupted ids and their labels, without gradient: `positions` of
/// `ids` replaced by draws from `gen_logits`.
pub fn corrupt_with_samples(
    ids: &Tensor,
    attention: &Tensor,
    positions: &Tensor,
    gen_logits: &Tensor,
    temperature: f64,
    generator: &dyn vlmatch_core::Generator,
    keys: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let sampled = generator.fill(
        &gen_logits.detach(),
        ids,
        positions,
        FillOptions {
            temperature,
            forbid_original: false,
        },
        keys,
    )?;
    let labels = masking::replaced_labels(ids, &sampled, attention);
    Ok((sampled, labels))
}

impl Objective for Rtd {
    fn forward(&self, fwd: &Forward<'_>, _step: i64) -> Result<ObjectiveOutput> {
        let _span = tracing::trace_span!("rtd").entered();
        let (gen_encoder, generator) = match &self.own_generator {
            Some((e, g)) => (e, g),
            None => (&fwd.model.text, fwd.generator(&self.name)?),
        };
        let text = &fwd.batch.text;
        let (choose_keys, fill_keys) = (fwd.random_keys(), fwd.random_keys());
        let positions = tch::no_grad(|| {
            masking::choose_positions(
                &text.ids,
                &text.mask,
                self.special,
                self.cfg.mask_ratio,
                &choose_keys,
            )
        });
        let masked = TextBatch::new(
            text.ids.masked_fill(&positions, self.special.mask),
            text.mask.shallow_clone(),
        );
        let gen_states = gen_encoder.forward_t(EncoderInput::Text(&masked), fwd.train)?;
        let gen_logits = generator.logits(&gen_states, fwd.train)?;
        // Both losses average over the global batch's tokens.
        let (sum, count) = masking::masked_lm_loss_parts(&gen_logits, &text.ids, &positions);
        let l_gen = fwd.global_mean(&sum, &count)?;

        let (corrupted, labels) = corrupt_with_samples(
            &text.ids,
            &text.mask,
            &positions,
            &gen_logits,
            self.cfg.temperature,
            generator.as_ref(),
            &fill_keys,
        )?;
        let corrupted = TextBatch::new(corrupted, text.mask.shallow_clone());
        let states = fwd
            .model
            .text
            .forward_t(EncoderInput::Text(&corrupted), fwd.train)?;
        let fused = fwd.model.fuse(&states, fwd.image()?, fwd.train)?;
        let logits = fwd.model.discriminator.token_logits(&fused)?;
        let (sum, count) = masking::token_bce_loss_parts(&logits, &labels, &text.mask);
        let l_disc = fwd.global_mean(&sum, &count)?;

        let metrics = tch::no_grad(|| {
            let real = text.mask.to_kind(Kind::Float);
            let n = real.sum(Kind::Float).clamp_min(1.0);
            let hit = logits
                .gt(0.0)
                .to_kind(Kind::Float)
                .eq_tensor(&labels)
                .to_kind(Kind::Float);
            vec![
                (format!("{}_disc", self.name), l_disc.detach()),
                (
                    format!("{}_acc", self.name),
                    (hit * &real).sum(Kind::Float) / &n,
                ),
                (
                    format!("{}_replaced", self.name),
                    (&labels * &real).sum(Kind::Float) / &n,
                ),
            ]
        });
        Ok(ObjectiveOutput {
            losses: vec![
                ("gen".into(), l_gen),
                (self.name.clone(), l_disc * self.cfg.lambda),
            ],
            metrics,
        })
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    let cfg: RtdConfig = ctx.params()?;
    {
        use vlmatch_registry::check;
        let k = |field: &str| format!("{}.{field}", ctx.key);
        check::probability(&k("mask_ratio"), cfg.mask_ratio)?;
        check::positive_f64(&k("temperature"), cfg.temperature)?;
        check::non_negative_f64(&k("lambda"), cfg.lambda)?;
    }
    let own_generator = match (cfg.share_text_encoder, &cfg.generator_text) {
        (true, None) => None,
        (true, Some(_)) => {
            return Err(Error::Config(format!(
                "config key `{}.generator_text`: only used with share_text_encoder = false",
                ctx.key
            )))
        }
        (false, None) => {
            return Err(Error::Config(format!(
                "config key `{}`: share_text_encoder = false needs a `[{}.generator_text]` encoder section \
                 (e.g. plugin = \"bert\" with a smaller hidden_size)",
                ctx.key, ctx.key
            )))
        }
        (false, Some(_)) => {
            let encoder = ctx.encoder(
                &format!("{}.generator_text", ctx.key),
                Modality::Text,
                &ctx.path / "generator_text",
            )?;
            let head = ctx.generator(encoder.clone(), &ctx.path / "generator_head")?;
            Some((encoder, head))
        }
    };
    Ok(Box::new(Rtd {
        name: ctx.section_name().to_string(),
        cfg,
        special: ctx.env.special,
        own_generator,
    }))
}
