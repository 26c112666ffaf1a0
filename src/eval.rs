//! Held-out evaluation.
//!
//! - ITC retrieval recall (image-to-text and text-to-image R@1/R@5). Every
//!   caption of an image is a correct text for it; a text query is correct
//!   when its own image ranks in the top k.
//! - Fine-grained matching (`shared/method.md`, Downstream): for each
//!   held-out caption, the same caption with one color or shape word swapped;
//!   the share of pairs where the image scores higher with the true caption,
//!   by ITM probability and by ITC similarity.

use crate::data::Dataset;
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{Encoded, EncoderInput, Result, VlModel};
use word_swap::WordSwap;

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

#[derive(Debug, Clone, Serialize)]
pub struct Matching {
    /// Caption pairs compared (captions with a color or shape word).
    pub pairs: usize,
    pub itm_acc: f64,
    pub itc_acc: f64,
}

/// The swaps the matching evaluation uses: colors and shapes.
pub fn color_shape_swapper() -> WordSwap {
    let groups = word_swap::default_groups().into_iter().take(2).collect();
    WordSwap::new(groups, None).expect("the default groups are disjoint")
}

/// Fine-grained matching accuracy on `ds`: true caption against the same
/// caption with one color or shape word swapped (a fixed, seeded choice, so
/// every model sees the same negatives).
pub fn matching(model: &VlModel, ds: &Dataset, inp: &EvalInputs<'_>) -> Result<Matching> {
    let swapper = color_shape_swapper();
    let mut rng = crate::rng::Rng::new(0x3A7C);
    let cases: Vec<(usize, String, String)> = ds
        .pairs
        .iter()
        .filter_map(|p| {
            let swap = swapper.swap(&p.caption, |n| rng.below(n))?;
            Some((p.image, p.caption.clone(), swap.text))
        })
        .collect();
    score_cases(model, ds, inp, &cases)
}

/// The matching accuracies of `(image, true caption, negative)` cases.
fn score_cases(
    model: &VlModel,
    ds: &Dataset,
    inp: &EvalInputs<'_>,
    cases: &[(usize, String, String)],
) -> Result<Matching> {
    let (mut itm_hits, mut itc_hits) = (0.0, 0.0);
    tch::no_grad(|| -> Result<()> {
        for chunk in cases.chunks(inp.batch_size.max(1)) {
            let images: Vec<usize> = chunk.iter().map(|c| c.0).collect();
            let image = image_states(model, ds, inp, &images)?;
            let pos: Vec<&str> = chunk.iter().map(|c| c.1.as_str()).collect();
            let neg: Vec<&str> = chunk.iter().map(|c| c.2.as_str()).collect();
            let (tp, tn) = (
                text_states(model, inp, &pos)?,
                text_states(model, inp, &neg)?,
            );
            let itm = |t: &Encoded| -> Result<Tensor> {
                let fused = model.fuse_cls(t, &image, false)?;
                Ok(model
                    .discriminator
                    .pair_logits(&fused)?
                    .softmax(1, Kind::Float)
                    .select(1, 1))
            };
            itm_hits += itm(&tp)?
                .gt_tensor(&itm(&tn)?)
                .to_kind(Kind::Float)
                .sum(Kind::Float)
                .double_value(&[]);
            let iv = model.contrastive.embed_image(&image);
            let sp =
                (&iv * model.contrastive.embed_text(&tp)).sum_dim_intlist(1, false, Kind::Float);
            let sn =
                (&iv * model.contrastive.embed_text(&tn)).sum_dim_intlist(1, false, Kind::Float);
            itc_hits += sp
                .gt_tensor(&sn)
                .to_kind(Kind::Float)
                .sum(Kind::Float)
                .double_value(&[]);
        }
        Ok(())
    })?;
    let n = cases.len().max(1) as f64;
    Ok(Matching {
        pairs: cases.len(),
        itm_acc: itm_hits / n,
        itc_acc: itc_hits / n,
    })
}

/// Retrieval and matching on one held-out set.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    pub step: i64,
    pub retrieval: Retrieval,
    pub matching: Matching,
}

pub fn held_out(model: &VlModel, ds: &Dataset, inp: &EvalInputs<'_>, step: i64) -> Result<HeldOut> {
    Ok(HeldOut {
        step,
        retrieval: retrieval(model, ds, inp)?,
        matching: matching(model, ds, inp)?,
    })
}

/// Retrieval by the papers' protocol (ALBEF, BLIP): ITC similarities for all
/// pairs, then each query's top `k` candidates re-ranked by the ITM score.
/// `tr_*` is text retrieval (image queries: a hit if any caption of the
/// image ranks within R), `ir_*` image retrieval (caption queries).
#[derive(Debug, Clone, Serialize)]
pub struct RerankedRetrieval {
    pub images: usize,
    pub captions: usize,
    pub k: usize,
    pub rerank: String,
    pub tr_r1: f64,
    pub tr_r5: f64,
    pub tr_r10: f64,
    pub ir_r1: f64,
    pub ir_r5: f64,
    pub ir_r10: f64,
    /// Sum of the six recalls, in percent.
    pub rsum: f64,
}

pub fn retrieval_reranked(
    model: &VlModel,
    ds: &Dataset,
    inp: &EvalInputs<'_>,
    k: usize,
    rerank: &str,
    progress: &indicatif::ProgressBar,
) -> Result<RerankedRetrieval> {
    if rerank != "itm" && rerank != "itm+itc" {
        return Err(vlmatch_core::Error::Config(format!(
            "config key `eval.rerank`: expected \"itm\" or \"itm+itc\", got \"{rerank}\""
        )));
    }
    tch::no_grad(|| {
        let bs = inp.batch_size.max(1);
        let all: Vec<usize> = (0..ds.images.len()).collect();
        let mut image_hidden = Vec::new();
        for chunk in all.chunks(bs) {
            image_hidden.push(image_states(model, ds, inp, chunk)?.hidden);
        }
        let images = Encoded {
            hidden: Tensor::cat(&image_hidden, 0),
            mask: Tensor::ones(
                [ds.images.len() as i64, image_hidden[0].size()[1]],
                (Kind::Int64, model.device),
            ),
        };
        // One padding length for all captions, so their states concatenate.
        let texts: Vec<&str> = ds.pairs.iter().map(|p| p.caption.as_str()).collect();
        let all_text = inp.tokenizer.text_batch(&texts, inp.max_len, model.device);
        let mut text_hidden = Vec::new();
        for start in (0..texts.len()).step_by(bs) {
            let n = bs.min(texts.len() - start) as i64;
            let part = vlmatch_core::TextBatch::new(
                all_text.ids.narrow(0, start as i64, n),
                all_text.mask.narrow(0, start as i64, n),
            );
            text_hidden.push(
                model
                    .text
                    .forward_t(EncoderInput::Text(&part), false)?
                    .hidden,
            );
        }
        let text = Encoded {
            hidden: Tensor::cat(&text_hidden, 0),
            mask: all_text.mask.shallow_clone(),
        };
        let sims = model
            .contrastive
            .embed_image(&images)
            .matmul(&model.contrastive.embed_text(&text).tr());
        let owner: Vec<usize> = ds.pairs.iter().map(|p| p.image).collect();
        let (ni, nt) = (ds.images.len(), ds.pairs.len());
        progress.set_length((ni + nt) as u64);

        // Score pairs (image i, text j) for the candidates of one query.
        let score = |img: &Tensor, txt: &Tensor, itc: &Tensor| -> Result<Vec<f64>> {
            let fused = model.fuse_cls(&text.select(txt), &images.select(img), false)?;
            let p = model
                .discriminator
                .pair_logits(&fused)?
                .softmax(1, Kind::Float)
                .select(1, 1);
            let s = if rerank == "itm+itc" { p + itc } else { p };
            Ok(Vec::<f64>::try_from(
                s.to_kind(Kind::Double).to_device(Device::Cpu),
            )?)
        };
        let rank_of_first_hit =
            |cands: &[i64], scores: &[f64], hit: &dyn Fn(i64) -> bool| -> usize {
                let mut order: Vec<usize> = (0..cands.len()).collect();
                order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
                order
                    .iter()
                    .position(|&o| hit(cands[o]))
                    .unwrap_or(usize::MAX)
            };
        let kk = k.max(1);
        let mut tr_ranks = Vec::with_capacity(ni);
        for i in 0..ni {
            let row = sims.get(i as i64);
            let (top, idx) = row.topk(kk.min(nt) as i64, 0, true, true);
            let img = Tensor::full([idx.size()[0]], i as i64, (Kind::Int64, model.device));
            let scores = score(&img, &idx, &top)?;
            let cands = Vec::<i64>::try_from(idx.to_device(Device::Cpu))?;
            tr_ranks.push(rank_of_first_hit(&cands, &scores, &|j| {
                owner[j as usize] == i
            }));
            progress.inc(1);
        }
        let sims_t = sims.tr();
        let mut ir_ranks = Vec::with_capacity(nt);
        for (j, &target) in owner.iter().enumerate() {
            let row = sims_t.get(j as i64);
            let (top, idx) = row.topk(kk.min(ni) as i64, 0, true, true);
            let txt = Tensor::full([idx.size()[0]], j as i64, (Kind::Int64, model.device));
            let scores = score(&idx, &txt, &top)?;
            let cands = Vec::<i64>::try_from(idx.to_device(Device::Cpu))?;
            ir_ranks.push(rank_of_first_hit(&cands, &scores, &|i| {
                i as usize == target
            }));
            progress.inc(1);
        }
        let recall = |ranks: &[usize], r: usize| {
            ranks.iter().filter(|&&x| x < r).count() as f64 / ranks.len().max(1) as f64
        };
        let out = RerankedRetrieval {
            images: ni,
            captions: nt,
            k: kk,
            rerank: rerank.to_string(),
            tr_r1: recall(&tr_ranks, 1),
            tr_r5: recall(&tr_ranks, 5),
            tr_r10: recall(&tr_ranks, 10),
            ir_r1: recall(&ir_ranks, 1),
            ir_r5: recall(&ir_ranks, 5),
            ir_r10: recall(&ir_ranks, 10),
            rsum: 0.0,
        };
        let rsum =
            100.0 * (out.tr_r1 + out.tr_r5 + out.tr_r10 + out.ir_r1 + out.ir_r5 + out.ir_r10);
        Ok(RerankedRetrieval { rsum, ..out })
    })
}

/// Matching accuracy on explicit triples: for each `(image, caption,
/// negative)`, whether the image scores higher with `caption`, by ITM and ITC.
pub fn matching_triples(
    model: &VlModel,
    ds: &Dataset,
    negatives: &[String],
    inp: &EvalInputs<'_>,
) -> Result<Matching> {
    let cases: Vec<(usize, String, String)> = ds
        .pairs
        .iter()
        .zip(negatives)
        .map(|(p, n)| (p.image, p.caption.clone(), n.clone()))
        .collect();
    score_cases(model, ds, inp, &cases)
}
