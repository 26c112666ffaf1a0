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
                let fused = model.fuse(t, &image, false)?;
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
