//! Fine-grained matching (`shared/method.md`, Downstream): for each
//! `(image, caption, negative)` case, whether the image scores higher with
//! the caption than with the negative, by ITM probability and by ITC
//! similarity, overall and per kind of mismatch.
//!
//! The held-out cases: on built-in data the fine-grained suite
//! ([`crate::data::finegrained`]) over the held-out scenes; on other
//! held-out sets each caption with one color or shape word swapped.

use super::{image_states, text_states, EvalInputs};
use crate::data::finegrained::{self, Kind};
use crate::data::{annotations::Located, Dataset, ImageRef};
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind as DType, Tensor};
use vlmatch_core::{Encoded, Result, VlModel};

#[derive(Debug, Clone, Serialize)]
pub struct Matching {
    /// Caption pairs compared.
    pub pairs: usize,
    pub itm_acc: f64,
    pub itc_acc: f64,
    /// Token-level localisation (VL-RTD): of the negatives that differ from
    /// their caption in single words at the same positions, the share whose
    /// word with the highest replaced-probability is one of the changed
    /// words, and that share for a random pick (mean changed / words).
    pub rtd_top1: f64,
    pub rtd_chance: f64,
    pub rtd_pairs: usize,
}

/// [`Matching`] overall and per kind of mismatch.
#[derive(Debug, Clone, Serialize)]
pub struct MatchingByKind {
    pub matching: Matching,
    /// `matching` over the cases of each kind, for the kinds with cases.
    pub matching_by_kind: BTreeMap<String, Matching>,
}

/// One case: an image of the dataset, a caption true of it, a negative,
/// and the kind of mismatch when it is known.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchingCase {
    pub image: usize,
    pub caption: String,
    pub negative: String,
    pub kind: Option<Kind>,
}

/// The held-out cases of a dataset ([`matching_cases`]).
#[derive(Debug, Clone)]
pub struct MatchingCases {
    pub cases: Vec<MatchingCase>,
    /// With the fine-grained suite, for every kind, the scenes it made no
    /// case of that kind for; empty otherwise.
    pub skipped_scenes: BTreeMap<String, usize>,
}

/// Word indices where `negative` differs from `caption`, when both have the
/// same number of words (else `None`).
fn changed_words(
    tok: &Tokenizer,
    caption: &str,
    negative: &str,
    max_len: usize,
) -> Option<(Vec<usize>, Vec<std::ops::Range<usize>>)> {
    let (_, a) = tok.encode_words(caption, max_len);
    let (_, b) = tok.encode_words(negative, max_len);
    if a.len() != b.len() || b.is_empty() {
        return None;
    }
    let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i].0 != b[i].0).collect();
    (!changed.is_empty()).then(|| (changed, b.into_iter().map(|(_, r)| r).collect()))
}

/// The swaps the matching evaluation uses on held-out sets other than the
/// built-in data: `word_swap` within its first two default groups, colors
/// and shapes.
pub fn color_shape_swapper() -> Result<Box<dyn vlmatch_core::NegativeSampler>> {
    let groups = crate::samplers::word_swap_default_groups()?;
    crate::samplers::word_swap(Some(&groups[..2.min(groups.len())]))
}

/// The cases [`matching`] scores, by a fixed, seeded choice (so every model,
/// and `vlmatch preview --split heldout` for an outside reference, sees the
/// same). On built-in data (every image a scene) the fine-grained suite:
/// for each scene, one case per kind it can make, the image id being the
/// scene's index. Otherwise every pair with a color or shape word, against
/// the caption with one such word swapped (kind `color` or `shape`).
pub fn matching_cases(ds: &Dataset) -> Result<MatchingCases> {
    let scenes: Option<Vec<&crate::data::synthetic::Scene>> = ds
        .images
        .iter()
        .map(|i| match i {
            ImageRef::Scene(s) => Some(s),
            ImageRef::File { .. } => None,
        })
        .collect();
    if let Some(scenes) = scenes {
        let mut cases = Vec::new();
        let mut skipped: BTreeMap<String, usize> =
            Kind::ALL.iter().map(|k| (k.as_str().into(), 0)).collect();
        for (image, scene) in scenes.into_iter().enumerate() {
            for kind in Kind::ALL {
                match finegrained::case(scene, ds.image_ids[image] as u64, kind) {
                    Some(c) => cases.push(MatchingCase {
                        image,
                        caption: c.caption.text(),
                        negative: c.negative.text(),
                        kind: Some(kind),
                    }),
                    None => *skipped.get_mut(kind.as_str()).expect("every kind") += 1,
                }
            }
        }
        return Ok(MatchingCases {
            cases,
            skipped_scenes: skipped,
        });
    }
    let sampler = color_shape_swapper()?;
    let swapper = crate::samplers::swapper(sampler.as_ref());
    let groups = swapper.groups();
    let mut rng = crate::rng::Rng::new(0x3A7C);
    let cases = ds
        .pairs
        .iter()
        .filter_map(|p| {
            let text = swapper.swap_word(&p.caption, &mut |n| rng.below(n))?;
            // The group of the word swapped: colors, then shapes.
            let swapped = p
                .caption
                .split(' ')
                .zip(text.split(' '))
                .find(|(a, b)| a != b)
                .map(|(a, _)| {
                    a.trim_matches(|c: char| !c.is_alphanumeric())
                        .to_lowercase()
                });
            let kind = swapped.and_then(|w| {
                let group = groups.iter().position(|g| g.contains(&w))?;
                [Kind::Color, Kind::Shape].get(group).copied()
            });
            Some(MatchingCase {
                image: p.image,
                caption: p.caption.clone(),
                negative: text,
                kind,
            })
        })
        .collect();
    Ok(MatchingCases {
        cases,
        skipped_scenes: BTreeMap::new(),
    })
}

/// Fine-grained matching accuracy on `ds`'s held-out cases
/// ([`matching_cases`]), overall and per kind, with the suite's skipped
/// scenes per kind.
pub fn matching(
    model: &VlModel,
    ds: &Dataset,
    inp: &EvalInputs<'_>,
) -> Result<(MatchingByKind, BTreeMap<String, usize>)> {
    let cases = matching_cases(ds)?;
    Ok((
        score_cases(model, ds, inp, &cases.cases)?,
        cases.skipped_scenes,
    ))
}

/// What one case scored.
struct Outcome {
    itm: bool,
    itc: bool,
    /// Whether the most suspicious word is a changed one, and the chance of
    /// that for a random word; for negatives that differ in single words.
    rtd: Option<(bool, f64)>,
}

fn summary<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> Matching {
    let (mut pairs, mut itm, mut itc) = (0usize, 0usize, 0usize);
    let (mut rtd_hits, mut rtd_chance, mut rtd_pairs) = (0usize, 0.0, 0usize);
    for o in outcomes {
        pairs += 1;
        itm += usize::from(o.itm);
        itc += usize::from(o.itc);
        if let Some((hit, chance)) = o.rtd {
            rtd_hits += usize::from(hit);
            rtd_chance += chance;
            rtd_pairs += 1;
        }
    }
    let n = pairs.max(1) as f64;
    let m = rtd_pairs.max(1) as f64;
    Matching {
        pairs,
        itm_acc: itm as f64 / n,
        itc_acc: itc as f64 / n,
        rtd_top1: rtd_hits as f64 / m,
        rtd_chance: rtd_chance / m,
        rtd_pairs,
    }
}

/// The matching accuracies of `cases`, overall and per kind.
pub fn score_cases(
    model: &VlModel,
    ds: &Dataset,
    inp: &EvalInputs<'_>,
    cases: &[MatchingCase],
) -> Result<MatchingByKind> {
    let mut outcomes = Vec::with_capacity(cases.len());
    let rows = |t: Tensor| Vec::<f64>::try_from(t.to_kind(DType::Double).to_device(Device::Cpu));
    tch::no_grad(|| -> Result<()> {
        for chunk in cases.chunks(inp.batch_size.max(1)) {
            let images: Vec<usize> = chunk.iter().map(|c| c.image).collect();
            let image = image_states(model, ds, inp, &images)?;
            let pos: Vec<&str> = chunk.iter().map(|c| c.caption.as_str()).collect();
            let neg: Vec<&str> = chunk.iter().map(|c| c.negative.as_str()).collect();
            let (tp, tn) = (
                text_states(model, inp, &pos)?,
                text_states(model, inp, &neg)?,
            );
            // The negatives are fused in full once: ITM reads their [CLS],
            // the RTD localisation every token.
            let fused_neg = model.fuse(&tn, &image, false)?;
            let itm = |fused: &Encoded| -> Result<Tensor> {
                Ok(model
                    .discriminator
                    .pair_logits(fused)?
                    .softmax(1, DType::Float)
                    .select(1, 1))
            };
            let itm_hits =
                rows(itm(&model.fuse_cls(&tp, &image, false)?)?.gt_tensor(&itm(&fused_neg)?))?;
            let iv = model.contrastive.embed_image(&image);
            let sp =
                (&iv * model.contrastive.embed_text(&tp)).sum_dim_intlist(1, false, DType::Float);
            let sn =
                (&iv * model.contrastive.embed_text(&tn)).sum_dim_intlist(1, false, DType::Float);
            let itc_hits = rows(sp.gt_tensor(&sn))?;
            let token_p = model
                .discriminator
                .token_logits(&fused_neg)?
                .to_kind(DType::Double)
                .to_device(Device::Cpu);
            for (b, c) in chunk.iter().enumerate() {
                let rtd = match changed_words(inp.tokenizer, &c.caption, &c.negative, inp.max_len) {
                    None => None,
                    Some((changed, spans)) => {
                        let row = Vec::<f64>::try_from(token_p.get(b as i64))?;
                        let word_p = crate::explain::word_max(&row, &spans);
                        let top = (0..word_p.len())
                            .max_by(|&x, &y| word_p[x].total_cmp(&word_p[y]))
                            .expect("non-empty");
                        Some((
                            changed.contains(&top),
                            changed.len() as f64 / word_p.len() as f64,
                        ))
                    }
                };
                outcomes.push(Outcome {
                    itm: itm_hits[b] > 0.5,
                    itc: itc_hits[b] > 0.5,
                    rtd,
                });
            }
        }
        Ok(())
    })?;
    let mut matching_by_kind = BTreeMap::new();
    for kind in Kind::ALL {
        let of_kind = || {
            cases
                .iter()
                .zip(&outcomes)
                .filter(move |(c, _)| c.kind == Some(kind))
                .map(|(_, o)| o)
        };
        if of_kind().next().is_some() {
            matching_by_kind.insert(kind.as_str().to_string(), summary(of_kind()));
        }
    }
    Ok(MatchingByKind {
        matching: summary(outcomes.iter()),
        matching_by_kind,
    })
}

/// The kind of each pair of a matching file: its optional string field
/// `kind`, one of [`Kind::names`]; anything else is an error naming the
/// file and line.
pub fn kinds_of(path: &Path, entries: &[Located]) -> Result<Vec<Option<Kind>>> {
    entries
        .iter()
        .map(|l| match l.entry.get("kind") {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Kind::parse(s).map(Some).ok_or_else(|| {
                l.error(
                    path,
                    format!(
                        "`kind` {s:?} is not a kind: expected one of {}",
                        Kind::names()
                    ),
                )
            }),
            Some(other) => Err(l.error(
                path,
                format!(
                    "`kind` must be a string, one of {}; found {other}",
                    Kind::names()
                ),
            )),
        })
        .collect()
}

/// Matching accuracy on explicit triples: for each `(image, caption,
/// negative)` of `ds` and `negatives`, whether the image scores higher with
/// `caption`, by ITM and ITC; per kind where `kinds` names one.
pub fn matching_triples(
    model: &VlModel,
    ds: &Dataset,
    negatives: &[String],
    kinds: &[Option<Kind>],
    inp: &EvalInputs<'_>,
) -> Result<MatchingByKind> {
    let cases: Vec<MatchingCase> = ds
        .pairs
        .iter()
        .zip(negatives)
        .enumerate()
        .map(|(i, (p, n))| MatchingCase {
            image: p.image,
            caption: p.caption.clone(),
            negative: n.clone(),
            kind: kinds.get(i).copied().flatten(),
        })
        .collect();
    score_cases(model, ds, inp, &cases)
}
