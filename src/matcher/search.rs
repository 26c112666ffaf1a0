//! `vlmatch search`: text -> images and image -> texts over an index.
//!
//! Exact top-k by ITC: the queries' unit embeddings times every indexed
//! embedding, a block of keys at a time, each block's top k merged into the
//! running top k, so memory stays at one `[queries, block]` matrix however
//! large the index. With `rerank = r`, each query's top `r` by ITC are
//! ordered by the ITM match probability of the fused pair (ties keep the ITC
//! order), as `vlmatch eval --task retrieval` ranks its candidates.

use super::embed::Embedder;
use super::index::{ImageItem, Index, Items, TextItem};
use crate::data::{Dataset, ImageRef};
use serde::Serialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{Encoded, Error, Result, VlModel};

/// Key rows per block of the exact search.
pub const DEFAULT_BLOCK: usize = 65_536;

/// Each query's top `k` rows of `keys` by dot product, best first:
/// `(row, similarity)`. `queries [q, E]`, `keys [n, E]`, on one device.
pub fn top_k(
    queries: &Tensor,
    keys: &Tensor,
    k: usize,
    block: usize,
) -> Result<Vec<Vec<(usize, f32)>>> {
    let (nq, nk) = (queries.size()[0], keys.size()[0]);
    let k = k.min(nk as usize) as i64;
    if nq == 0 || k == 0 {
        return Ok(vec![Vec::new(); nq as usize]);
    }
    let block = (block.max(1) as i64).min(nk);
    let queries = queries.to_kind(Kind::Float);
    let (mut best_v, mut best_i): (Option<Tensor>, Option<Tensor>) = (None, None);
    let mut start = 0;
    while start < nk {
        let n = block.min(nk - start);
        let sims = queries.matmul(&keys.narrow(0, start, n).to_kind(Kind::Float).tr());
        let (v, i) = sims.topk(k.min(n), 1, true, true);
        let i = i + start;
        let (v, i) = match (best_v.take(), best_i.take()) {
            (Some(bv), Some(bi)) => {
                let v = Tensor::cat(&[bv, v], 1);
                let i = Tensor::cat(&[bi, i], 1);
                // Blocks smaller than k leave fewer than k so far.
                let (v, at) = v.topk(k.min(v.size()[1]), 1, true, true);
                (v, i.gather(1, &at, false))
            }
            _ => (v, i),
        };
        best_v = Some(v);
        best_i = Some(i);
        start += n;
    }
    let v = best_v.expect("one block at least").to_device(Device::Cpu);
    let i = best_i.expect("one block at least").to_device(Device::Cpu);
    let kk = v.size()[1] as usize;
    let v = Vec::<f32>::try_from(v.contiguous().view([-1]))?;
    let i = Vec::<i64>::try_from(i.contiguous().view([-1]))?;
    Ok(v.chunks(kk)
        .zip(i.chunks(kk))
        .map(|(v, i)| {
            i.iter()
                .map(|&r| r as usize)
                .zip(v.iter().copied())
                .collect()
        })
        .collect())
}

/// One result of a query.
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    pub rank: usize,
    /// The item's row in the index.
    pub row: usize,
    /// Image id (images) or caption id (texts).
    pub id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// A caption's image id, where its source gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<i64>,
    /// ITC similarity (dot product of unit embeddings).
    pub itc: f64,
    /// ITM match probability, when re-ranked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itm: Option<f64>,
}

/// One query's answer, one JSON line of `vlmatch search`.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// `text` or `image`.
    pub query_kind: &'static str,
    pub query: String,
    pub hits: Vec<Hit>,
}

fn image_hit(rank: usize, row: usize, it: &ImageItem, itc: f64) -> Hit {
    Hit {
        rank,
        row,
        id: it.id,
        path: Some(it.path.clone()),
        caption: None,
        image_id: None,
        itc,
        itm: None,
    }
}

fn text_hit(rank: usize, row: usize, it: &TextItem, itc: f64) -> Hit {
    Hit {
        rank,
        row,
        id: it.id as i64,
        path: None,
        caption: Some(it.caption.clone()),
        image_id: it.image_id,
        itc,
        itm: None,
    }
}

/// ITM match probability of pairs (row `r` of `text`, row `r` of `image`).
pub fn itm_probs(model: &VlModel, text: &Encoded, image: &Encoded) -> Result<Vec<f64>> {
    tch::no_grad(|| {
        let fused = model.fuse_cls(text, image, false)?;
        let p = model
            .discriminator
            .pair_logits(&fused)?
            .softmax(1, Kind::Float)
            .select(1, 1)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu);
        Ok(Vec::<f64>::try_from(p)?)
    })
}

/// The indexed images as a dataset to decode: the files their paths name,
/// or, for tar shards, the shards read again (checked to list the same
/// members).
pub fn index_images(index: &Index, data: &vlmatch_registry::config::DataConfig) -> Result<Dataset> {
    if index.manifest.source.kind == "shards" {
        let ds = super::embed::load_source(&index.manifest.source, data)?;
        let (items, _) = super::embed::items_of(&ds);
        if items != index.images {
            return Err(Error::Config(format!(
                "index {}: its shards `{}` no longer hold the images it lists; embed them again",
                index.dir.display(),
                index.manifest.source.data
            )));
        }
        return Ok(ds);
    }
    Ok(files_dataset(
        index.images.iter().map(|i| Path::new(&i.path)),
        "index",
    ))
}

/// A dataset of image files, without captions.
pub fn files_dataset<'a>(paths: impl Iterator<Item = &'a Path>, origin: &str) -> Dataset {
    let images: Vec<ImageRef> = paths
        .map(|p| ImageRef::File {
            path: p.to_path_buf(),
            origin: origin.to_string(),
            bytes: None,
        })
        .collect();
    Dataset {
        name: origin.to_string(),
        image_ids: (0..images.len() as i64).collect(),
        images,
        pairs: Vec::new(),
        skipped: 0,
        store: None,
    }
}

/// Stable re-ranking: hits by ITM probability, highest first; equal
/// probabilities keep their ITC order.
fn order_by_itm(hits: &mut [Hit]) {
    hits.sort_by(|a, b| {
        b.itm
            .unwrap_or(f64::NEG_INFINITY)
            .total_cmp(&a.itm.unwrap_or(f64::NEG_INFINITY))
    });
    for (r, h) in hits.iter_mut().enumerate() {
        h.rank = r;
    }
}

pub struct SearchOptions {
    pub k: usize,
    /// Re-rank each query's top `r` by ITC with ITM (then keep `k`).
    pub rerank: Option<usize>,
    pub block: usize,
    /// Rows per forward when embedding queries or re-ranking.
    pub batch: usize,
}

/// Text queries against the index's images.
pub fn texts_to_images(
    emb: &Embedder<'_>,
    index: &Index,
    images: Option<&Dataset>,
    queries: &[&str],
    opts: &SearchOptions,
) -> Result<Vec<Answer>> {
    let keys = index.embeddings(Items::Images)?.to_device(emb.model.device);
    let q = super::embed::embed_queries(emb, queries, opts.batch)?;
    let want = opts.rerank.unwrap_or(opts.k).max(opts.k);
    let top = top_k(&q, &keys, want, opts.block)?;
    let mut out = Vec::with_capacity(queries.len());
    for (n, (query, cands)) in queries.iter().zip(top).enumerate() {
        let mut hits: Vec<Hit> = cands
            .iter()
            .enumerate()
            .map(|(r, &(row, s))| image_hit(r, row, &index.images[row], f64::from(s)))
            .collect();
        if opts.rerank.is_some() {
            let ds = images.ok_or_else(|| {
                Error::Config("re-ranking needs the indexed images to decode".into())
            })?;
            let text = emb.text_states(&queries[n..n + 1])?;
            let mut probs = Vec::with_capacity(hits.len());
            let rows: Vec<usize> = hits.iter().map(|h| h.row).collect();
            for b in rows.chunks(opts.batch.max(1)) {
                let img = emb.image_states(ds, b)?;
                let idx = Tensor::zeros([b.len() as i64], (Kind::Int64, emb.model.device));
                probs.extend(itm_probs(emb.model, &text.select(&idx), &img)?);
            }
            for (h, p) in hits.iter_mut().zip(probs) {
                h.itm = Some(p);
            }
            order_by_itm(&mut hits);
        }
        hits.truncate(opts.k);
        out.push(Answer {
            query_kind: "text",
            query: query.to_string(),
            hits,
        });
    }
    Ok(out)
}

/// Image queries (rows of `queries`) against the index's captions.
pub fn images_to_texts(
    emb: &Embedder<'_>,
    index: &Index,
    queries: &Dataset,
    opts: &SearchOptions,
) -> Result<Vec<Answer>> {
    let keys = index.embeddings(Items::Texts)?.to_device(emb.model.device);
    let all: Vec<usize> = (0..queries.images.len()).collect();
    let mut parts = Vec::new();
    for b in all.chunks(opts.batch.max(1)) {
        parts.push(emb.images(queries, b)?);
    }
    let q = Tensor::cat(&parts, 0);
    let want = opts.rerank.unwrap_or(opts.k).max(opts.k);
    let top = top_k(&q, &keys, want, opts.block)?;
    let mut out = Vec::with_capacity(all.len());
    for (n, cands) in top.into_iter().enumerate() {
        let mut hits: Vec<Hit> = cands
            .iter()
            .enumerate()
            .map(|(r, &(row, s))| text_hit(r, row, &index.texts[row], f64::from(s)))
            .collect();
        if opts.rerank.is_some() {
            let img = emb.image_states(queries, &[n])?;
            let mut probs = Vec::with_capacity(hits.len());
            let rows: Vec<usize> = hits.iter().map(|h| h.row).collect();
            for b in rows.chunks(opts.batch.max(1)) {
                let t: Vec<&str> = b.iter().map(|&r| index.texts[r].caption.as_str()).collect();
                let text = emb.text_states(&t)?;
                let idx = Tensor::zeros([b.len() as i64], (Kind::Int64, emb.model.device));
                probs.extend(itm_probs(emb.model, &text, &img.select(&idx))?);
            }
            for (h, p) in hits.iter_mut().zip(probs) {
                h.itm = Some(p);
            }
            order_by_itm(&mut hits);
        }
        hits.truncate(opts.k);
        let query = match &queries.images[n] {
            ImageRef::File { path, .. } => path.display().to_string(),
            ImageRef::Scene(_) => format!("scene {n}"),
        };
        out.push(Answer {
            query_kind: "image",
            query,
            hits,
        });
    }
    Ok(out)
}

/// Queries per second of the exact search over `items` random unit vectors
/// of width `dim` (CPU, f32), `queries` queries at a time, top `k`: the
/// median of `repeats` timings after one warm-up.
pub fn bench_exact(
    items: usize,
    dim: usize,
    queries: usize,
    k: usize,
    block: usize,
    repeats: usize,
) -> Result<f64> {
    let unit = |n: usize| {
        let t = Tensor::randn([n as i64, dim as i64], (Kind::Float, Device::Cpu));
        &t / t.norm_scalaropt_dim(2, [1], true)
    };
    let keys = unit(items);
    let q = unit(queries);
    top_k(&q, &keys, k, block)?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let t = std::time::Instant::now();
        let r = top_k(&q, &keys, k, block)?;
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(r.len(), queries);
    }
    times.sort_by(f64::total_cmp);
    Ok(queries as f64 / times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// The blocked top-k equals sorting every similarity, for any
        /// block size.
        #[test]
        fn blocked_top_k_equals_a_full_sort(
            nq in 1usize..6, nk in 1usize..40, k in 1usize..12, block in 1usize..50, seed in 0i64..1000,
        ) {
            tch::manual_seed(seed);
            let q = Tensor::randn([nq as i64, 5], (Kind::Float, Device::Cpu));
            let keys = Tensor::randn([nk as i64, 5], (Kind::Float, Device::Cpu));
            let got = top_k(&q, &keys, k, block).unwrap();
            let sims = Vec::<f32>::try_from(q.matmul(&keys.tr()).contiguous().view([-1])).unwrap();
            for (a, row) in got.iter().enumerate() {
                let mut all: Vec<(usize, f32)> = (0..nk).map(|j| (j, sims[a * nk + j])).collect();
                all.sort_by(|x, y| y.1.total_cmp(&x.1));
                all.truncate(k.min(nk));
                let ids: Vec<usize> = row.iter().map(|h| h.0).collect();
                let want: Vec<usize> = all.iter().map(|h| h.0).collect();
                proptest::prop_assert_eq!(ids, want);
            }
        }
    }
}
