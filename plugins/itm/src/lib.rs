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

/// A group before fusion: its texts and, per pair, the row of the image
/// pool ([`Forward::negative_images`]) it is fused with.
struct Pairs {
    source: String,
    texts: Encoded,
    image_index: Tensor,
    label: i64,
    weight: Tensor,
}

impl Itm {
    /// The positive group and one group per sampler; the samplers' counters
    /// go to `stats`. Every group's images are rows of one pool (the batch's
    /// images, or the global batch's), so all pairs are fused in one call by
    /// index: each image's cross-attention keys and values once per layer,
    /// however many groups and pairs use it.
    fn groups(
        &self,
        fwd: &Forward<'_>,
        step: i64,
        stats: &mut Vec<(String, f64)>,
    ) -> Result<Vec<Group>> {
        let model = fwd.model;
        let text = fwd.text()?;
        let b = fwd.batch.len();
        let pool = fwd.negative_images()?;
        // Local image i is pool row own[i].
        let own = fwd.own_candidates();
        let device = pool.hidden.device();
        let mut pairs = vec![Pairs {
            source: "pos".into(),
            texts: text.shallow_clone(),
            image_index: own.shallow_clone(),
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
                    // negative image; both drawn from the global batch.
                    let t_idx = text_for_image.clamp_min(0);
                    let i_idx = image_for_text.clamp_min(0);
                    let candidates = fwd.negative_texts()?;
                    let len = candidates.hidden.size()[1].max(text.hidden.size()[1]);
                    let texts = candidates.select(&t_idx).pad_to(len).cat(&text.pad_to(len));
                    let weight = Tensor::cat(&[text_for_image.ge(0), image_for_text.ge(0)], 0)
                        .to_kind(Kind::Float);
                    pairs.push(Pairs {
                        source: source.clone(),
                        texts,
                        image_index: Tensor::cat(&[&own, &i_idx], 0),
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
                    pairs.push(Pairs {
                        source: source.clone(),
                        texts: states,
                        image_index: own.index_select(0, &image_index),
                        label: 0,
                        weight,
                    });
                }
            }
        }
        // One fusion call over every group's pairs, padded to the longest text.
        let len = pairs
            .iter()
            .map(|p| p.texts.hidden.size()[1])
            .max()
            .unwrap_or(0);
        let texts: Vec<Encoded> = pairs.iter().map(|p| p.texts.pad_to(len)).collect();
        let texts = Encoded {
            hidden: Tensor::cat(&texts.iter().map(|t| &t.hidden).collect::<Vec<_>>(), 0),
            mask: Tensor::cat(&texts.iter().map(|t| &t.mask).collect::<Vec<_>>(), 0),
        };
        let index = Tensor::cat(&pairs.iter().map(|p| &p.image_index).collect::<Vec<_>>(), 0);
        let fused = model.fuse_cls_indexed(&texts, pool, &index, fwd.train)?;
        let mut start = 0;
        Ok(pairs
            .into_iter()
            .map(|p| {
                let n = p.image_index.size()[0];
                let group = Group {
                    source: p.source,
                    fused: Encoded {
                        hidden: fused.hidden.narrow(0, start, n),
                        mask: fused.mask.narrow(0, start, n),
                    },
                    label: p.label,
                    weight: p.weight,
                };
                start += n;
                group
            })
            .collect())
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
