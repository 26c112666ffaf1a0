//! Retrieval by the papers' protocol (ALBEF, BLIP): ITC similarities for
//! all pairs, then each query's top `k` candidates re-ranked by the ITM
//! score, with each candidate pair fused once.
//!
//! Image-to-text and text-to-image top-k lists overlap (a caption in an
//! image's list often has that image in its own), and the naive loop fuses
//! every query's candidates separately. Here the candidate lists of every
//! query come first (ITC only); their union, as sorted `(image, caption)`
//! pairs, is scored once, in fixed-size batches grouped by image, where the
//! fusion computes each image's cross-attention keys and values once
//! ([`vlmatch_core::Encoder::forward_cls_indexed`]); then each query ranks
//! its candidates by their scores. Memory stays bounded by one batch of
//! fused pairs and the pairs' scores.

use super::{image_states, rank_of_first_hit, EvalInputs};
use crate::data::Dataset;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{readback, Collective, Encoded, EncoderInput, Result, VlModel};
use vlmatch_registry::config::Rerank;

/// Candidate pairs fused per batch.
pub const RERANK_BATCH: usize = 256;

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
    /// Distinct candidate pairs fused (over all ranks).
    pub fused_pairs: usize,
    /// What the naive protocol fuses: every query's candidates on their own.
    pub naive_pairs: usize,
    /// Wall time of the ranking (ITC candidates, fusion, recalls), seconds.
    pub seconds: f64,
    /// Fused pairs per second of that time.
    pub pairs_per_s: f64,
}

pub fn retrieval_reranked(
    model: &VlModel,
    ds: &Dataset,
    inp: &EvalInputs<'_>,
    k: usize,
    rerank: Rerank,
    progress: &indicatif::ProgressBar,
) -> Result<RerankedRetrieval> {
    retrieval_reranked_sharded(model, ds, inp, k, rerank, None, progress)
}

/// [`retrieval_reranked`] with the fusion of the candidate pairs, the
/// costly part, shared among the ranks of `shard`
/// ([`reranked_recalls_sharded`]); every rank gets the recalls one process
/// computes.
pub fn retrieval_reranked_sharded(
    model: &VlModel,
    ds: &Dataset,
    inp: &EvalInputs<'_>,
    k: usize,
    rerank: Rerank,
    shard: Option<&dyn Collective>,
    progress: &indicatif::ProgressBar,
) -> Result<RerankedRetrieval> {
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
        let owner: Vec<usize> = ds.pairs.iter().map(|p| p.image).collect();
        rerank_encoded(model, &images, &text, &owner, k, rerank, shard, progress)
    })
}

/// The protocol on encoded images (`[ni, N, W]`) and captions (`[nt, L, D]`,
/// one padding length): their ITC embeddings, then
/// [`reranked_recalls_sharded`] with the fused ITM score.
#[allow(clippy::too_many_arguments)]
pub fn rerank_encoded(
    model: &VlModel,
    images: &Encoded,
    text: &Encoded,
    owner: &[usize],
    k: usize,
    rerank: Rerank,
    shard: Option<&dyn Collective>,
    progress: &indicatif::ProgressBar,
) -> Result<RerankedRetrieval> {
    tch::no_grad(|| {
        let image_embeds = model.contrastive.embed_image(images);
        let text_embeds = model.contrastive.embed_text(text);
        // Tokens per caption (a mask's ones are its first positions).
        let text_lens: Vec<i64> =
            readback::to_vec(&text.mask.sum_dim_intlist(1, false, Kind::Int64))?;
        // ITM probability of pairs (image i, text j), plus ITC if asked.
        // Each distinct image of a batch goes through the fusion's
        // cross-attention once, and the batch's captions, of about one
        // length, lose the padding none of them needs.
        let score = |img: &Tensor, txt: &Tensor, itc: &Tensor| -> Result<Vec<f64>> {
            let (distinct, index, _) = img.unique_dim(0, true, true, false);
            let rows: Vec<i64> = readback::to_vec(txt)?;
            let len = rows
                .iter()
                .map(|&j| text_lens[j as usize])
                .max()
                .unwrap_or(1)
                .max(1);
            let texts = text.select(txt);
            let texts = Encoded {
                hidden: texts.hidden.narrow(1, 0, len),
                mask: texts.mask.narrow(1, 0, len),
            };
            let fused = model.fuse_cls_indexed(&texts, &images.select(&distinct), &index, false)?;
            let p = model
                .discriminator
                .pair_logits(&fused)?
                .softmax(1, Kind::Float)
                .select(1, 1);
            let s = if rerank == Rerank::ItmItc { p + itc } else { p };
            Ok(Vec::<f64>::try_from(
                s.to_kind(Kind::Double).to_device(Device::Cpu),
            )?)
        };
        reranked_recalls_sharded(
            &image_embeds,
            &text_embeds,
            owner,
            k,
            rerank,
            score,
            Some(&text_lens),
            shard,
            progress,
        )
    })
}

/// The retrieval protocol on given scores, apart from any model so that a
/// hand-checked example can test it. ITC similarities are
/// `image_embeds [ni, E] . text_embeds [nt, E]`; `owner[j]` is caption
/// `j`'s image. Each query's top `k` candidates by ITC are re-ranked by
/// `score(image indices, text indices, their ITC similarities)` (higher is
/// better; ties keep the ITC order), called on batches of distinct pairs
/// sorted by image. Image-to-text counts a hit when any caption of the
/// image ranks within R; text-to-image when its own image does.
pub fn reranked_recalls(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    owner: &[usize],
    k: usize,
    rerank: Rerank,
    score: impl FnMut(&Tensor, &Tensor, &Tensor) -> Result<Vec<f64>>,
    progress: &indicatif::ProgressBar,
) -> Result<RerankedRetrieval> {
    reranked_recalls_sharded(
        image_embeds,
        text_embeds,
        owner,
        k,
        rerank,
        score,
        None,
        None,
        progress,
    )
}

/// Each query's top `kk` columns of `queries [nq, E] . keys [nk, E]`, in
/// ITC order, computed in blocks of rows; `[nq * min(kk, nk)]` flattened.
fn top_candidates(queries: &Tensor, keys: &Tensor, kk: usize) -> Result<(Vec<i64>, usize)> {
    let (nq, nk) = (queries.size()[0], keys.size()[0]);
    let kk = kk.min(nk as usize).max(1);
    // Rows per block: a block's similarity matrix stays near 16M entries.
    let block = ((1 << 24) / nk.max(1)).clamp(1, nq.max(1));
    let mut out = Vec::with_capacity(nq as usize * kk);
    let mut start = 0;
    while start < nq {
        let n = block.min(nq - start);
        let sims = queries.narrow(0, start, n).matmul(&keys.tr());
        let (_, idx) = sims.topk(kk as i64, 1, true, true);
        out.extend(Vec::<i64>::try_from(idx.to_device(Device::Cpu).view([-1]))?);
        start += n;
    }
    Ok((out, kk))
}

/// [`reranked_recalls`] with the distinct candidate pairs split into
/// contiguous blocks, one per rank of `shard`: each rank fuses its block and
/// the scores are gathered, so every rank computes the recalls one process
/// would (a pair's score does not depend on which rank computes it).
/// With `text_lens` (tokens per caption) the pairs are scored in order of
/// caption length, then image, so that a batch's captions need about the
/// same padding; without, in order of image.
#[allow(clippy::too_many_arguments)]
pub fn reranked_recalls_sharded(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    owner: &[usize],
    k: usize,
    rerank: Rerank,
    mut score: impl FnMut(&Tensor, &Tensor, &Tensor) -> Result<Vec<f64>>,
    text_lens: Option<&[i64]>,
    shard: Option<&dyn Collective>,
    progress: &indicatif::ProgressBar,
) -> Result<RerankedRetrieval> {
    let started = Instant::now();
    let (ni, nt) = (image_embeds.size()[0] as usize, owner.len());
    let device = image_embeds.device();
    let (rank, world) = shard.map_or((0, 1), |c| (c.rank(), c.world_size()));
    let kk = k.max(1);
    // Every query's candidates, in ITC order: captions for each image, then
    // images for each caption.
    let (tr_cands, kt) = top_candidates(image_embeds, text_embeds, kk)?;
    let (ir_cands, ki) = top_candidates(text_embeds, image_embeds, kk)?;
    let code = |i: usize, j: usize| (i * nt + j) as u64;
    let mut pairs: Vec<u64> = Vec::with_capacity(tr_cands.len() + ir_cands.len());
    for (q, c) in tr_cands.chunks(kt).enumerate() {
        pairs.extend(c.iter().map(|&j| code(q, j as usize)));
    }
    for (q, c) in ir_cands.chunks(ki).enumerate() {
        pairs.extend(c.iter().map(|&i| code(i as usize, q)));
    }
    let naive_pairs = pairs.len();
    pairs.sort_unstable();
    pairs.dedup();
    // The order pairs are scored in: `order[s]` is the position in `pairs`
    // of the s-th pair scored.
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    if let Some(lens) = text_lens {
        order.sort_by_key(|&p| (lens[(pairs[p] % nt as u64) as usize], pairs[p]));
    }
    // This rank's block of the distinct pairs.
    let per = pairs.len().div_ceil(world);
    let mine = &order[(rank * per).min(order.len())..((rank + 1) * per).min(order.len())];
    progress.set_length(mine.len() as u64);
    let mut scores: Vec<f64> = Vec::with_capacity(per);
    for batch in mine.chunks(RERANK_BATCH) {
        let img: Vec<i64> = batch
            .iter()
            .map(|&p| (pairs[p] / nt as u64) as i64)
            .collect();
        let txt: Vec<i64> = batch
            .iter()
            .map(|&p| (pairs[p] % nt as u64) as i64)
            .collect();
        let img = Tensor::from_slice(&img).to_device(device);
        let txt = Tensor::from_slice(&txt).to_device(device);
        let itc = (image_embeds.index_select(0, &img) * text_embeds.index_select(0, &txt))
            .sum_dim_intlist(1, false, Kind::Float);
        scores.extend(score(&img, &txt, &itc)?);
        progress.inc(batch.len() as u64);
    }
    let in_order: Vec<f64> = match shard {
        None => scores,
        Some(c) => {
            // Equal shapes on every rank: pad the last block.
            scores.resize(per, f64::NAN);
            let block = Tensor::from_slice(&scores).to_device(device);
            let mut all = Vec::<f64>::try_from(c.all_gather(&block)?.to_device(Device::Cpu))?;
            all.truncate(pairs.len());
            all
        }
    };
    // Back from scoring order to the order of `pairs`.
    let mut scores = vec![f64::NAN; pairs.len()];
    for (s, &p) in order.iter().enumerate() {
        scores[p] = in_order[s];
    }
    let score_of = |i: usize, j: usize| {
        let at = pairs
            .binary_search(&code(i, j))
            .expect("every candidate pair was scored");
        scores[at]
    };
    let rank_within = |r: usize| if r == usize::MAX { -1 } else { r as i64 };
    let tr_ranks: Vec<i64> = tr_cands
        .chunks(kt)
        .enumerate()
        .map(|(i, c)| {
            let s: Vec<f64> = c.iter().map(|&j| score_of(i, j as usize)).collect();
            rank_within(rank_of_first_hit(c, &s, |j| owner[j as usize] == i))
        })
        .collect();
    let ir_ranks: Vec<i64> = ir_cands
        .chunks(ki)
        .enumerate()
        .map(|(j, c)| {
            let s: Vec<f64> = c.iter().map(|&i| score_of(i as usize, j)).collect();
            rank_within(rank_of_first_hit(c, &s, |i| i as usize == owner[j]))
        })
        .collect();
    let recall = |ranks: &[i64], r: i64| {
        ranks.iter().filter(|&&x| x >= 0 && x < r).count() as f64 / ranks.len().max(1) as f64
    };
    let seconds = started.elapsed().as_secs_f64();
    let out = RerankedRetrieval {
        images: ni,
        captions: nt,
        k: kk,
        rerank: rerank.as_str().to_string(),
        tr_r1: recall(&tr_ranks, 1),
        tr_r5: recall(&tr_ranks, 5),
        tr_r10: recall(&tr_ranks, 10),
        ir_r1: recall(&ir_ranks, 1),
        ir_r5: recall(&ir_ranks, 5),
        ir_r10: recall(&ir_ranks, 10),
        rsum: 0.0,
        fused_pairs: pairs.len(),
        naive_pairs,
        seconds,
        pairs_per_s: pairs.len() as f64 / seconds.max(1e-9),
    };
    let rsum = 100.0 * (out.tr_r1 + out.tr_r5 + out.tr_r10 + out.ir_r1 + out.ir_r5 + out.ir_r10);
    Ok(RerankedRetrieval { rsum, ..out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Four images, two captions each (caption j belongs to image j / 2),
    /// with ITC similarities S and ITM scores M chosen by hand; ranks worked
    /// out on paper:
    ///
    /// image queries, k = 2 (top two captions by S, re-ranked by M):
    ///   img0: {c2 .9, c0 .6} -> M .8, .4 -> own c0 second    rank 1
    ///   img1: {c0 .7, c2 .6} -> M .2, .9 -> own c2 first     rank 0
    ///   img2: {c1 .45, c6 .4} -> neither is its own           miss
    ///   img3: {c7 .95, c6 .3} -> M .5, .6 -> own c6 first    rank 0
    ///   => tr R@1 2/4, R@5 3/4, R@10 3/4
    /// caption queries, k = 2 (top two images by S, re-ranked by M):
    ///   c0: {i1, i0} -> M .2, .4 -> rank 0    c1: {i0, i2} -> .3, .6 -> rank 1
    ///   c2: {i0, i1} -> .8, .9 -> rank 0      c3: {i1, i0} -> .7, .1 -> rank 0
    ///   c4: {i2, i0} -> .1, .5 -> rank 1      c5: {i3, i2} -> .9, .3 -> rank 1
    ///   c6: {i2, i3} -> .2, .6 -> rank 0      c7: {i3, i2} -> .5, .1 -> rank 0
    ///   => ir R@1 5/8, R@5 8/8, R@10 8/8; rsum 462.5
    #[test]
    fn reranked_recalls_match_a_hand_checked_example() {
        let s: [[f32; 8]; 4] = [
            [0.6, 0.5, 0.9, 0.2, 0.05, 0.03, 0.01, 0.03],
            [0.7, 0.1, 0.6, 0.5, 0.02, 0.02, 0.02, 0.04],
            [0.0, 0.45, 0.0, 0.0, 0.2, 0.1, 0.4, 0.05],
            [0.0, 0.0, 0.0, 0.0, 0.01, 0.15, 0.3, 0.95],
        ];
        let mut m = [[0.0f64; 8]; 4];
        for (i, j, v) in [
            (0, 0, 0.4),
            (0, 1, 0.3),
            (0, 2, 0.8),
            (0, 3, 0.1),
            (0, 4, 0.5),
            (1, 0, 0.2),
            (1, 2, 0.9),
            (1, 3, 0.7),
            (2, 1, 0.6),
            (2, 4, 0.1),
            (2, 5, 0.3),
            (2, 6, 0.2),
            (2, 7, 0.1),
            (3, 5, 0.9),
            (3, 6, 0.6),
            (3, 7, 0.5),
        ] {
            m[i][j] = v;
        }
        // Images are the unit vectors, captions the columns of S.
        let image_embeds = Tensor::eye(4, (Kind::Float, Device::Cpu));
        let flat: Vec<f32> = s.iter().flatten().copied().collect();
        let text_embeds = Tensor::from_slice(&flat).view([4, 8]).tr().contiguous();
        let owner: Vec<usize> = (0..8).map(|j| j / 2).collect();
        let score = |img: &Tensor, txt: &Tensor, _itc: &Tensor| -> Result<Vec<f64>> {
            let (i, t) = (Vec::<i64>::try_from(img)?, Vec::<i64>::try_from(txt)?);
            Ok(i.iter()
                .zip(&t)
                .map(|(&i, &j)| m[i as usize][j as usize])
                .collect())
        };
        let bar = indicatif::ProgressBar::hidden();
        let rerank = |k: usize| {
            let (i, t) = (&image_embeds, &text_embeds);
            reranked_recalls(i, t, &owner, k, Rerank::Itm, score, &bar).unwrap()
        };
        // Over `shard`'s ranks, each keeping the 2 best.
        let sharded = |shard: &Gather| {
            let (i, t) = (&image_embeds, &text_embeds);
            let shard: Option<&dyn Collective> = Some(shard);
            reranked_recalls_sharded(i, t, &owner, 2, Rerank::Itm, score, None, shard, &bar)
                .unwrap()
        };
        let r = rerank(2);
        let got = [r.tr_r1, r.tr_r5, r.tr_r10, r.ir_r1, r.ir_r5, r.ir_r10];
        assert_eq!(got, [0.5, 0.75, 0.75, 0.625, 1.0, 1.0]);
        assert!((r.rsum - 462.5).abs() < 1e-9, "{}", r.rsum);
        // k = 1 leaves ITC's first choice alone: of the images only img3
        // (c7) hits; of the captions c1 (i0), c3 (i1), c4 (i2), c7 (i3).
        let r1 = rerank(1);
        assert_eq!(
            [r1.tr_r1, r1.tr_r10, r1.ir_r1, r1.ir_r10],
            [0.25, 0.25, 0.5, 0.5]
        );

        // Split over 3 ranks (blocks of 4, 4 and 4 of the 12 queries), each
        // rank's gather stood in for by the blocks the others computed: the
        // recalls of one process.
        let blocks: Vec<Tensor> = (0..3)
            .map(|rank| {
                let fake = Gather {
                    rank,
                    blocks: RefCell::new(None),
                };
                sharded(&fake);
                fake.blocks.into_inner().unwrap()
            })
            .collect();
        let all = Gather {
            rank: 1,
            blocks: RefCell::new(Some(Tensor::cat(&blocks, 0))),
        };
        let r2 = sharded(&all);
        assert_eq!(recalls(&r2), recalls(&r));
        // 12 queries x 2 candidates, of which 8 pairs are in both an image's
        // and a caption's list: 16 distinct pairs fused.
        assert_eq!((r.naive_pairs, r.fused_pairs), (24, 16));
    }

    fn recalls(r: &RerankedRetrieval) -> [f64; 7] {
        [
            r.tr_r1, r.tr_r5, r.tr_r10, r.ir_r1, r.ir_r5, r.ir_r10, r.rsum,
        ]
    }

    /// The protocol as ALBEF's loop runs it: per query, its top k by ITC,
    /// each candidate scored on its own, the first hit's rank.
    fn naive(
        image_embeds: &Tensor,
        text_embeds: &Tensor,
        owner: &[usize],
        k: usize,
        m: &[Vec<f64>],
    ) -> [f64; 6] {
        let (ni, nt) = (image_embeds.size()[0] as usize, owner.len());
        let first = |sims: Tensor, kk: usize, s: &dyn Fn(i64) -> f64, hit: &dyn Fn(i64) -> bool| {
            let (_, idx) = sims.topk(kk as i64, 0, true, true);
            let c = Vec::<i64>::try_from(idx).unwrap();
            let scores: Vec<f64> = c.iter().map(|&x| s(x)).collect();
            let r = rank_of_first_hit(&c, &scores, hit);
            if r == usize::MAX {
                -1
            } else {
                r as i64
            }
        };
        let tr: Vec<i64> = (0..ni)
            .map(|i| {
                let sims = text_embeds.matmul(&image_embeds.get(i as i64));
                first(sims, k.min(nt), &|j| m[i][j as usize], &|j| {
                    owner[j as usize] == i
                })
            })
            .collect();
        let ir: Vec<i64> = (0..nt)
            .map(|j| {
                let sims = image_embeds.matmul(&text_embeds.get(j as i64));
                first(sims, k.min(ni), &|i| m[i as usize][j], &|i| {
                    i as usize == owner[j]
                })
            })
            .collect();
        let recall = |ranks: &[i64], r: i64| {
            ranks.iter().filter(|&&x| x >= 0 && x < r).count() as f64 / ranks.len() as f64
        };
        [
            recall(&tr, 1),
            recall(&tr, 5),
            recall(&tr, 10),
            recall(&ir, 1),
            recall(&ir, 5),
            recall(&ir, 10),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Fusing the union of the candidate lists once gives the recalls
        /// of the per-query loop, for any embeddings, scores and k.
        #[test]
        fn fusing_the_union_once_ranks_as_the_per_query_loop(
            ni in 1usize..12,
            per_image in 1usize..4,
            k in 1usize..20,
            seed in 0i64..10_000,
        ) {
            tch::manual_seed(seed);
            let nt = ni * per_image;
            let unit = |t: Tensor| &t / t.norm_scalaropt_dim(2, [1], true);
            let image_embeds = unit(Tensor::randn([ni as i64, 8], (Kind::Float, Device::Cpu)));
            let text_embeds = unit(Tensor::randn([nt as i64, 8], (Kind::Float, Device::Cpu)));
            let owner: Vec<usize> = (0..nt).map(|j| j / per_image).collect();
            // Scores with ties (multiples of 0.25), as a saturated ITM gives.
            let m: Vec<Vec<f64>> = (0..ni)
                .map(|_| {
                    Vec::<f64>::try_from(
                        (Tensor::rand([nt as i64], (Kind::Double, Device::Cpu)) * 4.0).floor() / 4.0,
                    )
                    .unwrap()
                })
                .collect();
            let score = |img: &Tensor, txt: &Tensor, _itc: &Tensor| -> Result<Vec<f64>> {
                let (i, t) = (Vec::<i64>::try_from(img)?, Vec::<i64>::try_from(txt)?);
                Ok(i.iter().zip(&t).map(|(&i, &j)| m[i as usize][j as usize]).collect())
            };
            let bar = indicatif::ProgressBar::hidden();
            let r = reranked_recalls(&image_embeds, &text_embeds, &owner, k, Rerank::Itm, score, &bar).unwrap();
            let want = naive(&image_embeds, &text_embeds, &owner, k, &m);
            proptest::prop_assert_eq!(&recalls(&r)[..6], &want[..]);
            // Scoring in order of caption length changes nothing either.
            let lens: Vec<i64> = (0..nt as i64).map(|j| (j * 7 + seed) % 5).collect();
            let by_len = reranked_recalls_sharded(
                &image_embeds, &text_embeds, &owner, k, Rerank::Itm, score, Some(&lens), None, &bar,
            )
            .unwrap();
            proptest::prop_assert_eq!(&recalls(&by_len)[..6], &want[..]);
            proptest::prop_assert!(r.fused_pairs <= r.naive_pairs);
        }
    }

    /// A stand-in for a process group of 3: records this rank's block, or
    /// hands out every rank's blocks when it has them.
    struct Gather {
        rank: usize,
        blocks: RefCell<Option<Tensor>>,
    }

    impl Collective for Gather {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            3
        }
        fn all_gather_with_grad(&self, t: &Tensor) -> Result<Tensor> {
            self.all_gather(t)
        }
        fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
            let mut b = self.blocks.borrow_mut();
            Ok(match &*b {
                Some(all) => all.shallow_clone(),
                None => {
                    *b = Some(t.copy());
                    Tensor::cat(&[t, t, t], 0)
                }
            })
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            Ok(t * 3)
        }
    }
}
