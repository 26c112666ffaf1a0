//! Held-out evaluation.
//!
//! - ITC retrieval recall (image-to-text and text-to-image R@1/R@5). Every
//!   caption of an image is a correct text for it; a text query is correct
//!   when its own image ranks in the top k.
//! - Fine-grained matching (`shared/method.md`, Downstream,
//!   [`matching`]): on built-in data the fine-grained suite's cases (color,
//!   size, shape, binding, relation, count, absent), elsewhere each held-out
//!   caption against itself with one color or shape word swapped; the share
//!   of pairs where the image scores higher with the true caption, by ITM
//!   probability and by ITC similarity, overall and per kind.

use crate::data::Dataset;
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{Encoded, EncoderInput, Result, VlModel};
use vlmatch_registry::config::Rerank;

mod matching;
mod rerank;
pub use matching::{
    color_shape_swapper, kinds_of, matching, matching_cases, matching_triples, score_cases,
    Matching, MatchingByKind, MatchingCase, MatchingCases,
};
pub use rerank::{
    rerank_encoded, reranked_recalls, reranked_recalls_sharded, retrieval_reranked,
    retrieval_reranked_sharded, RerankedRetrieval,
};

#[derive(Debug, Clone, Serialize)]
pub struct Retrieval {
    pub images: usize,
    pub captions: usize,
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    /// R@1 of a random ranking (image-to-text: captions per image / captions;
    /// text-to-image: 1 / images).
    pub t2i_chance: f64,
}

pub struct EvalInputs<'a> {
    pub image_size: usize,
    pub max_len: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub batch_size: usize,
    pub tokenizer: &'a Tokenizer,
}

impl<'a> EvalInputs<'a> {
    /// The data and eval settings of `cfg`.
    pub fn new(cfg: &vlmatch_registry::Config, tokenizer: &'a Tokenizer) -> Self {
        EvalInputs {
            image_size: cfg.data.image_size as usize,
            max_len: cfg.data.max_len as usize,
            mean: cfg.data.mean,
            std: cfg.data.std,
            batch_size: cfg.eval.batch_size,
            tokenizer,
        }
    }
}

/// `E_v` states of images `indices` of `ds`, in eval mode.
fn image_states(
    model: &VlModel,
    ds: &Dataset,
    inp: &EvalInputs<'_>,
    indices: &[usize],
) -> Result<Encoded> {
    let s = inp.image_size as i64;
    let mut pixels = Vec::with_capacity(indices.len() * 3 * inp.image_size * inp.image_size);
    for &i in indices {
        pixels.extend(ds.load_image(i, inp.image_size, inp.mean, inp.std)?);
    }
    let images = Tensor::from_slice(&pixels)
        .view([indices.len() as i64, 3, s, s])
        .to_device(model.device);
    model.image.forward_t(EncoderInput::Image(&images), false)
}

/// `E_t` states of `texts`, in eval mode.
fn text_states(model: &VlModel, inp: &EvalInputs<'_>, texts: &[&str]) -> Result<Encoded> {
    let text = inp.tokenizer.text_batch(texts, inp.max_len, model.device);
    model.text.forward_t(EncoderInput::Text(&text), false)
}

/// Unit-norm ITC embeddings of every image and every caption.
fn embeddings(model: &VlModel, ds: &Dataset, inp: &EvalInputs<'_>) -> Result<(Tensor, Tensor)> {
    let mut image_embeds = Vec::new();
    let all: Vec<usize> = (0..ds.images.len()).collect();
    for chunk in all.chunks(inp.batch_size.max(1)) {
        image_embeds.push(
            model
                .contrastive
                .embed_image(&image_states(model, ds, inp, chunk)?),
        );
    }
    let mut text_embeds = Vec::new();
    for chunk in ds.pairs.chunks(inp.batch_size.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|p| p.caption.as_str()).collect();
        text_embeds.push(
            model
                .contrastive
                .embed_text(&text_states(model, inp, &texts)?),
        );
    }
    Ok((Tensor::cat(&image_embeds, 0), Tensor::cat(&text_embeds, 0)))
}

pub fn retrieval(model: &VlModel, ds: &Dataset, inp: &EvalInputs<'_>) -> Result<Retrieval> {
    tch::no_grad(|| {
        let (img, txt) = embeddings(model, ds, inp)?;
        let sims = img.matmul(&txt.tr()).to_device(Device::Cpu);
        let owner: Vec<i64> = ds.pairs.iter().map(|p| p.image as i64).collect();
        let owner = Tensor::from_slice(&owner);
        let ni = ds.images.len() as i64;
        let nt = ds.pairs.len() as i64;
        let k = 5.min(nt).min(ni);
        // Image to text: does a caption of image i rank within the top k?
        let (_, top_t) = sims.topk(k, 1, true, true);
        let hit_t = owner
            .index_select(0, &top_t.flatten(0, 1))
            .view([ni, k])
            .eq_tensor(&Tensor::arange(ni, (Kind::Int64, Device::Cpu)).unsqueeze(1));
        // Text to image: does caption j's own image rank within the top k?
        let (_, top_i) = sims.tr().topk(k, 1, true, true);
        let hit_i = top_i.eq_tensor(&owner.unsqueeze(1));
        let recall = |hits: &Tensor, upto: i64| {
            hits.narrow(1, 0, upto)
                .any_dim(1, false)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        };
        Ok(Retrieval {
            images: ni as usize,
            captions: nt as usize,
            i2t_r1: recall(&hit_t, 1),
            i2t_r5: recall(&hit_t, k),
            t2i_r1: recall(&hit_i, 1),
            t2i_r5: recall(&hit_i, k),
            t2i_chance: 1.0 / ni as f64,
        })
    })
}

/// Retrieval and matching on one held-out set.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    pub step: i64,
    pub retrieval: Retrieval,
    /// Over every held-out case ([`matching_cases`]).
    pub matching: Matching,
    /// `matching` over the cases of each kind of mismatch, for the kinds
    /// with cases.
    pub matching_by_kind: std::collections::BTreeMap<String, Matching>,
    /// On built-in data, for every kind, the held-out scenes the
    /// fine-grained suite made no case of that kind for (absent otherwise).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub matching_skipped_scenes: std::collections::BTreeMap<String, usize>,
}

pub fn held_out(model: &VlModel, ds: &Dataset, inp: &EvalInputs<'_>, step: i64) -> Result<HeldOut> {
    let retrieval = retrieval(model, ds, inp)?;
    let (m, skipped) = matching(model, ds, inp)?;
    Ok(HeldOut {
        step,
        retrieval,
        matching: m.matching,
        matching_by_kind: m.matching_by_kind,
        matching_skipped_scenes: skipped,
    })
}

/// The rank of the first candidate satisfying `hit` once `cands` are sorted
/// by `scores`, highest first (a stable sort: ties keep the given order);
/// `usize::MAX` if none does.
pub(crate) fn rank_of_first_hit(cands: &[i64], scores: &[f64], hit: impl Fn(i64) -> bool) -> usize {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
        .iter()
        .position(|&o| hit(cands[o]))
        .unwrap_or(usize::MAX)
}

/// Zero-shot classification: each image against every candidate label.
#[derive(Debug, Clone, Serialize)]
pub struct ZeroShot {
    pub images: usize,
    pub labels: usize,
    /// Candidates re-ranked by ITM per image (the top `k` by ITC).
    pub k: usize,
    pub rerank: String,
    pub itc_top1: f64,
    pub itc_top5: f64,
    pub itm_top1: f64,
    pub itm_top5: f64,
}

/// Zero-shot accuracy: `ds.pairs[i]` is an image and its true label (the
/// pair's caption, which must be one of `labels`). Top-1/top-5 by ITC
/// similarity with every label, and after re-ranking each image's top `k`
/// labels by ITM (or ITM + ITC, `rerank`).
pub fn zeroshot(
    model: &VlModel,
    ds: &Dataset,
    labels: &[String],
    inp: &EvalInputs<'_>,
    k: usize,
    rerank: Rerank,
) -> Result<ZeroShot> {
    if labels.is_empty() {
        return Err(vlmatch_core::Error::Config(
            "--labels: no candidate labels".into(),
        ));
    }
    let index: std::collections::HashMap<&str, i64> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as i64))
        .collect();
    let truth: Vec<i64> = ds
        .pairs
        .iter()
        .map(|p| {
            index.get(p.caption.as_str()).copied().ok_or_else(|| {
                vlmatch_core::Error::Config(format!(
                    "label {:?} of {} is not among the --labels candidates",
                    p.caption, ds.name
                ))
            })
        })
        .collect::<Result<_>>()?;
    let kk = k.clamp(1, labels.len());
    let (mut itc1, mut itc5, mut itm1, mut itm5) = (0usize, 0usize, 0usize, 0usize);
    tch::no_grad(|| -> Result<()> {
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let states = text_states(model, inp, &refs)?;
        let label_embeds = model.contrastive.embed_text(&states);
        for (chunk, truth) in ds
            .pairs
            .chunks(inp.batch_size.max(1))
            .zip(truth.chunks(inp.batch_size.max(1)))
        {
            let images: Vec<usize> = chunk.iter().map(|p| p.image).collect();
            let image = image_states(model, ds, inp, &images)?;
            let sims = model
                .contrastive
                .embed_image(&image)
                .matmul(&label_embeds.tr());
            let order = Vec::<Vec<i64>>::try_from(sims.argsort(1, true).to_device(Device::Cpu))?;
            for (b, &t) in truth.iter().enumerate() {
                let rank = order[b].iter().position(|&l| l == t).unwrap_or(usize::MAX);
                itc1 += usize::from(rank < 1);
                itc5 += usize::from(rank < 5);
                // Re-rank the top k by ITM.
                let top: Vec<i64> = order[b][..kk].to_vec();
                let idx = Tensor::from_slice(&top).to_device(model.device);
                let img = Encoded {
                    hidden: image
                        .hidden
                        .get(b as i64)
                        .unsqueeze(0)
                        .expand([kk as i64, -1, -1], false),
                    mask: image
                        .mask
                        .get(b as i64)
                        .unsqueeze(0)
                        .expand([kk as i64, -1], false),
                };
                let p = model
                    .discriminator
                    .pair_logits(&model.fuse_cls(&states.select(&idx), &img, false)?)?
                    .softmax(1, Kind::Float)
                    .select(1, 1);
                let s = if rerank == Rerank::ItmItc {
                    p + sims.get(b as i64).index_select(0, &idx)
                } else {
                    p
                };
                let s = Vec::<f64>::try_from(s.to_kind(Kind::Double).to_device(Device::Cpu))?;
                let rank = rank_of_first_hit(&top, &s, |l| l == t);
                itm1 += usize::from(rank < 1);
                itm5 += usize::from(rank < 5);
            }
        }
        Ok(())
    })?;
    let n = ds.pairs.len().max(1) as f64;
    Ok(ZeroShot {
        images: ds.pairs.len(),
        labels: labels.len(),
        k: kk,
        rerank: rerank.as_str().to_string(),
        itc_top1: itc1 as f64 / n,
        itc_top5: itc5 as f64 / n,
        itm_top1: itm1 as f64 / n,
        itm_top5: itm5 as f64 / n,
    })
}
