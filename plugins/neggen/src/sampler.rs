//! The `neggen` negative sampler: tagging, planning, filling and filtering
//! put together.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{
    Batch, CaptionPrep, EncoderInput, Error, Forward, NegativeSampler, Negatives, Result,
    SamplerInput, TextCodec,
};
use vlmatch_registry::BuildContext;

use crate::candidate::Counts;
use crate::config::NegGenConfig;
use crate::draw::Draw;
use crate::fill::fill;
use crate::filter::{filter, Filled};
use crate::plan::{piece_masks, piece_style, plan, realise, PieceStyle};
use crate::tagging::{core, tagged_candidates, BrillTagger, PosTagger, TagPrep, Tagged};
use vlmatch_core::{MaskedWord, NegativeCandidate as Candidate};

vlmatch_registry::register!(negative_sampler "neggen" => build);

pub struct NegGen {
    cfg: NegGenConfig,
    tagger: Arc<dyn PosTagger>,
    codec: Rc<dyn TextCodec>,
    masks: RefCell<Option<(Tensor, Tensor, PieceStyle)>>,
    prep: Arc<TagPrep>,
    /// `fill_model`, when configured; else the model's generator fills.
    filler: Option<vlmatch_registry::MaskedLm>,
    pub counts: Counts,
    /// The counts of the last `sample` call.
    last: Cell<[u64; 4]>,
}

impl NegGen {
    pub fn new(cfg: NegGenConfig, tagger: Arc<dyn PosTagger>, codec: Rc<dyn TextCodec>) -> Self {
        NegGen {
            prep: Arc::new(TagPrep::new(tagger.clone(), cfg.tags.clone())),
            cfg,
            tagger,
            codec,
            masks: RefCell::new(None),
            filler: None,
            counts: Counts::default(),
            last: Cell::new([0; 4]),
        }
    }

    /// Fill with `filler` (NegGen's `fill_model`) instead of the model's
    /// generator.
    pub fn with_filler(mut self, filler: vlmatch_registry::MaskedLm) -> Self {
        self.filler = Some(filler);
        self.masks = RefCell::new(None);
        self
    }

    /// NegGen as configured, loading `fill_model` (if set) with the host's
    /// `masked_lm` loader on `device` in `compute`; see [`NegGen::configured`].
    pub fn load(
        cfg: NegGenConfig,
        codec: Rc<dyn TextCodec>,
        masked_lm: Option<vlmatch_registry::MaskedLmLoader>,
        device: Device,
        compute: Kind,
        key: &str,
    ) -> Result<Self> {
        let filler = match &cfg.fill_model {
            Some(dir) => {
                let load = masked_lm.ok_or_else(|| {
                    Error::Config(format!(
                        "config key `{key}.fill_model`: this program cannot load masked language models"
                    ))
                })?;
                let f = load(dir, device, compute)
                    .map_err(|e| Error::Config(format!("config key `{key}.fill_model`: {e}")))?;
                tracing::info!("NegGen fill model: {}", f.report);
                Some(f)
            }
            None => None,
        };
        Self::configured(cfg, codec, filler, key)
    }

    /// NegGen as configured: `filler` fills when given, and the vocabulary
    /// that fills must mark word pieces (WordPiece or byte-level BPE). `key`
    /// names the config section in errors.
    pub fn configured(
        cfg: NegGenConfig,
        codec: Rc<dyn TextCodec>,
        filler: Option<vlmatch_registry::MaskedLm>,
        key: &str,
    ) -> Result<Self> {
        let fill_codec = filler.as_ref().map_or(codec.as_ref(), |f| f.codec.as_ref());
        if piece_style(fill_codec).is_none() {
            let what = if filler.is_some() {
                format!("`{key}.fill_model`'s tokenizer")
            } else {
                "the run's tokenizer (`data.vocab`)".to_string()
            };
            return Err(Error::Config(format!(
                "config key `{key}`: NegGen fills whole words piece by piece, which needs a \
                 vocabulary that marks word pieces: WordPiece (`##` continuation pieces, as \
                 BERT's) or byte-level BPE (`Ġ` word starts, as RoBERTa's); {what} has neither"
            )));
        }
        let sampler = NegGen::new(cfg, Arc::new(BrillTagger::new()), codec);
        Ok(match filler {
            Some(f) => sampler.with_filler(f),
            None => sampler,
        })
    }

    /// The tokenizer masks are planned and filled in: the fill model's.
    fn fill_codec(&self) -> &dyn TextCodec {
        match &self.filler {
            Some(f) => f.codec.as_ref(),
            None => self.codec.as_ref(),
        }
    }

    /// Caption `i` of `batch`'s candidate words with their tags: the
    /// loader's result when it ran [`TagPrep`] (under `key`), else tagged
    /// here.
    fn tagged(&self, batch: &Batch, key: &str, i: usize) -> Tagged {
        match batch.prepared::<Tagged>(key, i) {
            Some(t) => t.clone(),
            None => tagged_candidates(&batch.captions[i], self.tagger.as_ref(), &self.cfg.tags),
        }
    }

    /// Words to mask in `caption`, drawn with `draw(n)` uniform in `0..n`.
    pub fn choose(&self, caption: &str, draw: impl FnMut(usize) -> usize) -> Vec<usize> {
        let tagged = tagged_candidates(caption, self.tagger.as_ref(), &self.cfg.tags);
        self.choose_among(&tagged, draw)
    }

    /// Words to mask among a caption's `tagged` candidates.
    fn choose_among(&self, tagged: &Tagged, mut draw: impl FnMut(usize) -> usize) -> Vec<usize> {
        let mut cands: Vec<usize> = tagged.iter().map(|(i, _)| *i).collect();
        if cands.is_empty() {
            return cands;
        }
        let n = ((cands.len() as f64 * self.cfg.mask_ratio).ceil() as usize).clamp(1, cands.len());
        for i in 0..n {
            let j = i + draw(cands.len() - i);
            cands.swap(i, j);
        }
        let mut chosen = cands[..n].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// Every candidate for the batch's captions, with its provenance and
    /// whether it passed the filters (the ITM filter from
    /// `filter_after_steps` on).
    pub fn candidates(&self, fwd: &Forward<'_>, step: i64) -> Result<Vec<Candidate>> {
        let batch = fwd.batch;
        let model = fwd.model;
        // What fills: the fill model, or the model's text encoder and generator.
        let (encoder, head) = match &self.filler {
            Some(f) => (&f.encoder, &f.head),
            None => (&model.text, fwd.generator("neggen")?),
        };
        let codec = self.fill_codec();
        let max_len = self.filler.as_ref().map_or(usize::MAX, |f| f.max_len);
        let device = batch.text.ids.device();
        if self.masks.borrow().is_none() {
            let style = piece_style(codec).unwrap_or(PieceStyle::WordPiece);
            let (first, cont) = piece_masks(codec, device, style);
            *self.masks.borrow_mut() = Some((first, cont, style));
        }
        let masks = self.masks.borrow();
        let masks = masks.as_ref().expect("just set");
        // Each caption's choices come from its own stream, keyed by sample
        // (`vlmatch_core::random`), so they do not depend on the batch split.
        // On the host (the device's keys bit for bit): no read-back.
        let caption_keys = fwd.random_keys_host();
        let mut owners = Vec::new();
        let mut plans = Vec::new();
        let mut plan_keys = Vec::new();
        let key = self.prep.key();
        let tagged: Vec<Tagged> = (0..batch.captions.len())
            .map(|i| self.tagged(batch, &key, i))
            .collect();
        for (i, caption) in batch.captions.iter().enumerate() {
            self.counts.captions.set(self.counts.captions.get() + 1);
            let mut any = false;
            let mut rng = Draw::new(caption_keys[i]);
            let mut draw = |n: usize| rng.below(n);
            for c in 0..self.cfg.candidates.max(1) {
                let chosen = self.choose_among(&tagged[i], &mut draw);
                if let Some(p) = (!chosen.is_empty())
                    .then(|| plan(caption, &chosen, codec, masks.2))
                    .flatten()
                    .filter(|p| p.ids.len() <= max_len)
                {
                    owners.push(i);
                    plans.push(p);
                    plan_keys.push(caption_keys[i].wrapping_add(c as i64));
                    any = true;
                }
            }
            if !any {
                self.counts
                    .no_candidate
                    .set(self.counts.no_candidate.get() + 1);
            }
        }
        if plans.is_empty() {
            return Ok(vec![]);
        }
        let filled = tch::no_grad(|| {
            fill(
                &plans,
                &plan_keys,
                codec.special(),
                (&masks.0, &masks.1),
                self.cfg.temperature,
                self.cfg.top_k,
                device,
                |text, pos| {
                    let states = encoder.forward_t(EncoderInput::Text(text), false)?;
                    let d = states.hidden.size()[2];
                    let at = vlmatch_core::Encoded {
                        hidden: states.hidden.gather(
                            1,
                            &pos.view([-1, 1, 1]).expand([-1, 1, d], false),
                            false,
                        ),
                        mask: states.mask.gather(1, &pos.view([-1, 1]), false),
                    };
                    Ok(head.logits(&at, false)?.squeeze_dim(1))
                },
            )
        })?;
        let texts: Vec<String> = plans
            .iter()
            .zip(&filled)
            .map(|(p, f)| realise(p, f, codec, masks.2))
            .collect();

        // Filter: never a caption of a positive of the image; replacements of
        // the same kind of word (pos_check); then ITM, once trained.
        let (keep, itm) = filter(
            fwd,
            &self.cfg,
            self.tagger.as_ref(),
            self.codec.as_ref(),
            Filled {
                owners: &owners,
                plans: &plans,
                texts: &texts,
            },
            step,
        )?;
        let mut out = Vec::with_capacity(texts.len());
        for ((((owner, text), kept), itm_score), plan) in
            owners.into_iter().zip(texts).zip(keep).zip(itm).zip(&plans)
        {
            let tags = &tagged[owner];
            let new_words: Vec<&str> = text.split(' ').collect();
            let masked = plan
                .spans
                .iter()
                .map(|&(w, ..)| MaskedWord {
                    index: w,
                    original: core(&plan.words[w]).to_string(),
                    replacement: core(new_words[w]).to_string(),
                    tag: tags
                        .iter()
                        .find(|(i, _)| *i == w)
                        .map(|(_, t)| t.clone())
                        .unwrap_or_default(),
                })
                .collect();
            out.push(Candidate {
                owner,
                text,
                masked,
                itm: itm_score,
                kept,
            });
        }
        // Captions whose every candidate the filters dropped.
        let owners: std::collections::BTreeSet<usize> = out.iter().map(|c| c.owner).collect();
        let dropped = owners
            .iter()
            .filter(|&&o| !out.iter().any(|c| c.owner == o && c.kept))
            .count();
        self.counts
            .dropped_by_filter
            .set(self.counts.dropped_by_filter.get() + dropped as u64);
        Ok(out)
    }

    fn generate(&self, fwd: &Forward<'_>, step: i64) -> Result<(Vec<i64>, Vec<String>)> {
        let cands = self.candidates(fwd, step)?;

        // One negative per caption: its first candidate that survived.
        let mut index = Vec::new();
        let mut out = Vec::new();
        for c in cands {
            if c.kept && !index.contains(&(c.owner as i64)) {
                index.push(c.owner as i64);
                out.push(c.text);
            }
        }
        self.counts
            .produced
            .set(self.counts.produced.get() + index.len() as u64);
        Ok((index, out))
    }
}

impl NegativeSampler for NegGen {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let _span = tracing::trace_span!("neggen").entered();
        let device = input.forward.batch.text.ids.device();
        let before = self.counts.values();
        let (index, texts) = self.generate(input.forward, input.step)?;
        let after = self.counts.values();
        self.last.set(std::array::from_fn(|i| after[i] - before[i]));
        if input.step % 100 == 0 {
            let c = &self.counts;
            tracing::debug!(
                captions = c.captions.get(),
                produced = c.produced.get(),
                no_candidate = c.no_candidate.get(),
                dropped_by_filter = c.dropped_by_filter.get(),
                "neggen"
            );
        }
        Ok(Negatives::from_texts(
            self.codec.as_ref(),
            &index,
            &texts,
            device,
        ))
    }

    /// [`NegGen::candidates`], for `vlmatch neggen` and the benchmark.
    fn candidates(&self, forward: &Forward<'_>, step: i64) -> Option<Result<Vec<Candidate>>> {
        Some(NegGen::candidates(self, forward, step))
    }

    /// POS tagging, for the loader's worker threads.
    fn caption_prep(&self) -> Option<Arc<dyn CaptionPrep>> {
        Some(self.prep.clone())
    }

    /// `captions`, `produced` (negatives used), `no_candidate` (captions
    /// without a noun or adjective), `dropped_by_filter` (candidates the
    /// ITM filter or the positive check removed), of the last batch.
    fn stats(&self) -> Vec<(String, f64)> {
        let [captions, produced, no_candidate, dropped] = self.last.get();
        vec![
            ("captions".into(), captions as f64),
            ("produced".into(), produced as f64),
            ("no_candidate".into(), no_candidate as f64),
            ("dropped_by_filter".into(), dropped as f64),
        ]
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let cfg: NegGenConfig = ctx.params()?;
    cfg.check(&ctx.key)?;
    if cfg.fill_model.is_none() && ctx.model.and_then(|m| m.generator.as_ref()).is_none() {
        return Err(Error::Config(format!(
            "config key `{}`: NegGen fills masks with the model's generator; set `[model.generator] plugin = \"mlm_head\"` or `{}.fill_model = \"DIR\"` (a BertForMaskedLM)",
            ctx.key, ctx.key
        )));
    }
    Ok(Box::new(NegGen::load(
        cfg,
        ctx.env.text.clone(),
        ctx.env.masked_lm,
        ctx.env.device,
        ctx.env.compute,
        &ctx.key,
    )?))
}
