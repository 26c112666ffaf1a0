//! ITM, image-text matching (ALBEF; FG-ITM in `shared/method.md` when a
//! NegGen sampler is configured too): a 2-way classification of fused
//! `[CLS]` states, label 1 for the batch's positive pairs and 0 for every
//! negative that the configured samplers return, except generated texts
//! identical to a caption of the image's positives
//! (`Batch::text_is_positive`), which get weight 0.
//!
//! Registered as objective `itm`. Keys: `samplers = ["name", ...]`, each a
//! `[samplers.<name>]` section. Loss key: the section name; metrics:
//! `<name>_acc` and `<name>_acc_<source>` per source of pairs.

use serde::Deserialize;
use tch::{Kind, Tensor};
use vlmatch_core::{
    Encoded, EncoderInput, Error, Forward, NegativeSampler, Negatives, Objective, ObjectiveOutput,
    Result, SamplerInput,
};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(objective "itm" => build);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItmConfig {
    /// Names of `[samplers.*]` sections whose negatives the loss sees.
    pub samplers: Vec<String>,
}

pub struct Itm {
    name: String,
    samplers: Vec<(String, Box<dyn NegativeSampler>)>,
}

/// Pairs of one source: fused states, label, and a weight per pair (0 marks
/// a slot with no negative available, so no host sync is needed to drop it).
struct Group {
    source: String,
    fused: Encoded,
    label: i64,
    weight: Tensor,
}

impl Itm {
    /// The positive group and one group per sampler; the samplers' counters
    /// go to `stats`.
    fn groups(
        &self,
        fwd: &Forward<'_>,
        step: i64,
        stats: &mut Vec<(String, f64)>,
    ) -> Result<Vec<Group>> {
        let model = fwd.model;
        let image = fwd.image()?;
        let text = fwd.text()?;
        let b = fwd.batch.len();
        let device = image.hidden.device();
        let mut groups = vec![Group {
            source: "pos".into(),
            fused: fwd.fuse_positive_cls()?,
            label: 1,
            weight: Tensor::ones([b], (Kind::Float, device)),
        }];
        let input = SamplerInput { forward: fwd, step };
        for (source, sampler) in &self.samplers {
            let negatives = sampler.sample(&input)?;
            for (key, value) in sampler.stats() {
                stats.push((format!("{}_{source}_{key}", self.name), value));
            }
            match negatives {
                Negatives::InBatch {
                    text_for_image,
                    image_for_text,
                } => {
                    // Local image i with a negative text; local text j with a
                    // negative image; both drawn from the global batch. The
                    // images repeat (each local one is also a negative's), so
                    // they are fused by index into the candidate pool: each
                    // image's cross-attention keys and values once.
                    let t_idx = text_for_image.clamp_min(0);
                    let i_idx = image_for_text.clamp_min(0);
                    let pool = fwd.negative_texts()?;
                    let len = pool.hidden.size()[1];
                    let texts = pool.select(&t_idx).cat(&text.pad_to(len));
                    let image_index = Tensor::cat(&[fwd.own_candidates(), i_idx], 0);
                    let weight = Tensor::cat(&[text_for_image.ge(0), image_for_text.ge(0)], 0)
                        .to_kind(Kind::Float);
                    groups.push(Group {
                        source: source.clone(),
                        fused: model.fuse_cls_indexed(
                            &texts,
                            fwd.negative_images()?,
                            &image_index,
                            fwd.train,
                        )?,
                        label: 0,
                        weight,
                    });
                }
                Negatives::Texts { image_index, text } => {
                    let k = image_index.size()[0];
                    if k == 0 {
                        continue;
                    }
                    // A generated text identical to a caption of one of the
                    // image's positives is a match, not a negative: weight 0.
                    let weight = tch::no_grad(|| {
                        fwd.batch
                            .text_is_positive(&image_index, &text)
                            .logical_not()
                            .to_kind(Kind::Float)
                    });
                    let states = model.text.forward_t(EncoderInput::Text(&text), fwd.train)?;
                    groups.push(Group {
                        source: source.clone(),
                        fused: model.fuse_cls_indexed(&states, image, &image_index, fwd.train)?,
                        label: 0,
                        weight,
                    });
                }
            }
        }
        Ok(groups)
    }
}

impl Objective for Itm {
    fn caption_preps(&self) -> Vec<std::sync::Arc<dyn vlmatch_core::CaptionPrep>> {
        self.samplers
            .iter()
            .filter_map(|(_, s)| s.caption_prep())
            .collect()
    }

    fn forward(&self, fwd: &Forward<'_>, step: i64) -> Result<ObjectiveOutput> {
        let _span = tracing::trace_span!("itm").entered();
        let mut stats = Vec::new();
        let groups = self.groups(fwd, step, &mut stats)?;
        let disc = &fwd.model.discriminator;
        let mut logits = Vec::new();
        let mut labels = Vec::new();
        let mut weights = Vec::new();
        let mut metrics = Vec::new();
        for g in &groups {
            let l = disc.pair_logits(&g.fused)?;
            let label = Tensor::full([l.size()[0]], g.label, (Kind::Int64, l.device()));
            tch::no_grad(|| {
                let hit = l.argmax(1, false).eq_tensor(&label).to_kind(Kind::Float);
                let acc =
                    (hit * &g.weight).sum(Kind::Float) / g.weight.sum(Kind::Float).clamp_min(1.0);
                metrics.push((format!("{}_acc_{}", self.name, g.source), acc));
            });
            logits.push(l);
            labels.push(label);
            weights.push(g.weight.shallow_clone());
        }
        let logits = Tensor::cat(&logits, 0);
        let labels = Tensor::cat(&labels, 0);
        let weights = Tensor::cat(&weights, 0);
        // Averaged over the weighted pairs of the global batch.
        let (sum, count) = itm_loss_parts(&logits, &labels, &weights);
        let loss = fwd.global_mean(&sum, &count)?;
        let total = weights.sum(Kind::Float).clamp_min(1.0);
        let acc = tch::no_grad(|| {
            (logits
                .argmax(1, false)
                .eq_tensor(&labels)
                .to_kind(Kind::Float)
                * &weights)
                .sum(Kind::Float)
                / &total
        });
        metrics.insert(0, (format!("{}_acc", self.name), acc));
        metrics.extend(stats.into_iter().map(|(k, v)| (k, Tensor::from(v as f32))));
        Ok(ObjectiveOutput {
            losses: vec![(self.name.clone(), loss)],
            metrics,
        })
    }
}

/// Cross-entropy of pair `logits` `[N, 2]` against `labels` `[N]`, averaged
/// over the pairs with weight 1 (weight 0 marks an empty negative slot).
pub fn itm_loss(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Tensor {
    let (sum, count) = itm_loss_parts(logits, labels, weights);
    sum / count.clamp_min(1.0)
}

/// [`itm_loss`] as `(weighted sum, sum of weights)`.
pub fn itm_loss_parts(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> (Tensor, Tensor) {
    let per_pair =
        logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::None, -100, 0.0);
    (
        (per_pair * weights).sum(Kind::Float),
        weights.sum(Kind::Float),
    )
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    let cfg: ItmConfig = ctx.params()?;
    if cfg.samplers.is_empty() {
        return Err(Error::Config(format!(
            "config key `{}.samplers`: list at least one negative sampler, e.g. [\"hard_negative\"]",
            ctx.key
        )));
    }
    let samplers = cfg
        .samplers
        .iter()
        .map(|name| Ok((name.clone(), ctx.negative_sampler(name)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Box::new(Itm {
        name: ctx.section_name().to_string(),
        samplers,
    }))
}
