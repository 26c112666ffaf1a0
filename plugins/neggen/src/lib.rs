//! NegGen (`shared/method.md`): generated fine-grained negative captions.
//!
//! 1. POS-tag the caption ([`PosTagger`]; default [`BrillTagger`], offline);
//!    candidates are the words tagged noun or adjective.
//! 2. Mask `mask_ratio` of them (at least one), every word piece of a word.
//! 3. Refill the masks with the model's generator (text encoder + MLM head,
//!    reading the masked text alone), or with a fixed masked language model
//!    from a checkpoint (`fill_model`, in its own tokenizer), piece by piece
//!    from left to right; a word's first piece never takes its original
//!    value, so the word always changes; first pieces are whole-word tokens
//!    and later ones `##` pieces (WordPiece vocabularies only).
//! 4. Filter: a candidate equal to a caption of the same image is dropped,
//!    and, after `filter_after_steps`, one whose ITM match probability with
//!    the image is above `filter_threshold` (it may describe the image).
//!
//! Tagging (step 1) is a [`TagPrep`] that the data loader runs on its
//! worker threads while the previous step trains.
//!
//! Registered as negative sampler `neggen`; FG-ITM lists it in `samplers`.
//! Words are whitespace-separated; punctuation stays attached to its word.

use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{random, readback};
use vlmatch_core::{
    Batch, CaptionPrep, EncoderInput, Error, Forward, NegativeSampler, Negatives, Prepared, Result,
    SamplerInput, SpecialTokens, TextBatch, TextCodec,
};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(negative_sampler "neggen" => build);

/// Tags whose words NegGen may replace: nouns and adjectives (Penn Treebank).
pub const DEFAULT_TAGS: [&str; 5] = ["NN", "NNS", "JJ", "JJR", "JJS"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NegGenConfig {
    /// Share of the candidate words masked (at least one).
    #[serde(default = "half")]
    pub mask_ratio: f64,
    #[serde(default = "one")]
    pub temperature: f64,
    /// Sample among the top k tokens only (0: all).
    #[serde(default)]
    pub top_k: i64,
    /// Candidates generated per caption; the first that passes the filter is used.
    #[serde(default = "one_usize")]
    pub candidates: usize,
    /// Drop candidates whose ITM match probability is above this.
    #[serde(default = "half")]
    pub filter_threshold: f64,
    /// Training steps before the ITM filter applies (an untrained ITM head
    /// says nothing).
    #[serde(default)]
    pub filter_after_steps: i64,
    /// POS tags of replaceable words.
    #[serde(default = "default_tags")]
    pub tags: Vec<String>,
    /// Drop a candidate unless every replacement is itself tagged with one
    /// of `tags` in the new caption (a noun stays a noun): the fluency check
    /// that keeps fills like "on a black in" out.
    #[serde(default = "yes")]
    pub pos_check: bool,
    /// Fill with this fixed masked language model instead of the model's
    /// generator: a HuggingFace `BertForMaskedLM` directory (`config.json`,
    /// `model.safetensors`, `tokenizer.json` or `vocab.txt`). Its tokenizer
    /// may differ from the run's: negatives are re-tokenised as text.
    #[serde(default)]
    pub fill_model: Option<std::path::PathBuf>,
}

fn yes() -> bool {
    true
}

fn half() -> f64 {
    0.5
}
fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
/// [`DEFAULT_TAGS`] as owned strings.
pub fn default_tags_vec() -> Vec<String> {
    default_tags()
}

fn default_tags() -> Vec<String> {
    DEFAULT_TAGS.iter().map(|t| t.to_string()).collect()
}

/// Part-of-speech tagging of whitespace-separated words. `Send + Sync`:
/// the data loader's worker threads tag captions ahead of the step.
pub trait PosTagger: Send + Sync {
    /// One Penn Treebank tag per word (trailing punctuation already removed).
    fn tag_words(&self, words: &[&str]) -> Vec<String>;
}

/// The default tagger: `english-pos-tagger`'s Brill-style lexicon and rules.
pub struct BrillTagger(english_pos_tagger::Tagger);

impl BrillTagger {
    pub fn new() -> Self {
        BrillTagger(english_pos_tagger::Tagger::new())
    }
}

impl Default for BrillTagger {
    fn default() -> Self {
        Self::new()
    }
}

impl PosTagger for BrillTagger {
    fn tag_words(&self, words: &[&str]) -> Vec<String> {
        self.0
            .tag_raw_tokens(words)
            .into_iter()
            .map(|t| t.pos.unwrap_or_default())
            .collect()
    }
}

/// A word's text without trailing punctuation.
pub fn core(word: &str) -> &str {
    word.trim_end_matches(|c: char| c.is_ascii_punctuation())
}

/// Indices (into `caption.split(' ')`) of the words tagged with one of `tags`.
pub fn candidate_words(caption: &str, tagger: &dyn PosTagger, tags: &[String]) -> Vec<usize> {
    tagged_candidates(caption, tagger, tags)
        .into_iter()
        .map(|(i, _)| i)
        .collect()
}

/// [`candidate_words`] with each word's tag.
pub fn tagged_candidates(
    caption: &str,
    tagger: &dyn PosTagger,
    tags: &[String],
) -> Vec<(usize, String)> {
    let words: Vec<&str> = caption.split(' ').collect();
    let cores: Vec<&str> = words.iter().map(|w| core(w)).collect();
    let nonempty: Vec<usize> = (0..cores.len())
        .filter(|&i| cores[i].chars().any(char::is_alphabetic))
        .collect();
    let tagged = tagger.tag_words(&nonempty.iter().map(|&i| cores[i]).collect::<Vec<_>>());
    nonempty
        .into_iter()
        .zip(tagged)
        .filter(|(_, t)| tags.iter().any(|x| x == t))
        .collect()
}

/// Whether every word index in `masked` is, in `text`, still tagged with one
/// of `tags` (NegGen's `pos_check`: a noun stays a noun or adjective).
pub fn replacements_keep_their_kind(
    text: &str,
    masked: &[usize],
    tagger: &dyn PosTagger,
    tags: &[String],
) -> bool {
    let tagged = tagged_candidates(text, tagger, tags);
    masked.iter().all(|w| tagged.iter().any(|(i, _)| i == w))
}

/// `caption` with its candidate words in brackets (`A [red] [car].`), the
/// form of the golden tagging file.
pub fn mark_candidates(caption: &str, tagger: &dyn PosTagger, tags: &[String]) -> String {
    let picked = candidate_words(caption, tagger, tags);
    caption
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if picked.contains(&i) {
                format!("[{w}]")
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One caption prepared for filling: token ids with the chosen words'
/// pieces masked, and where each chosen word's pieces sit.
#[derive(Debug, Clone)]
pub struct Plan {
    pub words: Vec<String>,
    /// `(word index, first token position, piece count, original first piece)`.
    pub spans: Vec<(usize, usize, usize, i64)>,
    pub ids: Vec<i64>,
}

/// Mask the pieces of `chosen` words of `caption`.
pub fn plan(caption: &str, chosen: &[usize], codec: &dyn TextCodec) -> Option<Plan> {
    let special = codec.special();
    let words: Vec<String> = caption.split(' ').map(str::to_string).collect();
    let mut ids = vec![special.cls];
    let mut spans = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let c = core(w);
        let core_pieces = codec.pieces(c);
        if chosen.contains(&i) {
            if core_pieces.is_empty() || core_pieces.contains(&special.unk) {
                return None;
            }
            spans.push((i, ids.len(), core_pieces.len(), core_pieces[0]));
            ids.extend(std::iter::repeat_n(special.mask, core_pieces.len()));
            ids.extend(codec.pieces(&w[c.len()..]));
        } else {
            ids.extend(codec.pieces(w));
        }
    }
    ids.push(special.sep);
    Some(Plan { words, spans, ids })
}

/// The caption with each span's word core replaced by its filled pieces.
pub fn realise(plan: &Plan, filled: &[i64], codec: &dyn TextCodec) -> String {
    let mut words = plan.words.clone();
    for &(w, start, n, _) in &plan.spans {
        let mut text = String::new();
        for &id in &filled[start..start + n] {
            let t = codec.token(id);
            text.push_str(t.strip_prefix("##").unwrap_or(&t));
        }
        let rest = &plan.words[w][core(&plan.words[w]).len()..];
        words[w] = format!("{text}{rest}");
    }
    words.join(" ")
}

/// Whether `codec` is a WordPiece vocabulary: some entry is a `##` piece.
pub fn is_wordpiece(codec: &dyn TextCodec) -> bool {
    (0..codec.vocab_size()).any(|id| codec.token(id).starts_with("##"))
}

/// Vocabulary masks: `[V]` bool, whole-word alphabetic tokens and `##`
/// alphabetic continuation pieces.
pub fn piece_masks(codec: &dyn TextCodec, device: Device) -> (Tensor, Tensor) {
    let special = codec.special();
    let specials = [
        special.pad,
        special.unk,
        special.cls,
        special.sep,
        special.mask,
    ];
    let (mut first, mut cont) = (Vec::new(), Vec::new());
    for id in 0..codec.vocab_size() {
        let t = codec.token(id);
        let alpha = |s: &str| !s.is_empty() && s.chars().all(char::is_alphabetic);
        let is_special = specials.contains(&id);
        first.push(!is_special && alpha(&t));
        cont.push(!is_special && t.strip_prefix("##").is_some_and(alpha));
    }
    (
        Tensor::from_slice(&first).to_device(device),
        Tensor::from_slice(&cont).to_device(device),
    )
}

/// Fill the masked spans of `plans` left to right, one piece per step, with
/// `logits_at(text, pos)` giving the `[R, V]` vocabulary logits of row `r`
/// of `text` (`[R, L]`: the plans still filling) at position `pos[r]`.
/// Returns the filled ids per plan. Plan `r`'s draw at step `t` is keyed
/// by `keys[r]` and `t` (`vlmatch_core::random`).
#[allow(clippy::too_many_arguments)]
pub fn fill(
    plans: &[Plan],
    keys: &[i64],
    special: SpecialTokens,
    masks: &(Tensor, Tensor),
    temperature: f64,
    top_k: i64,
    device: Device,
    mut logits_at: impl FnMut(&TextBatch, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<i64>>> {
    let k = plans.len();
    let l = plans.iter().map(|p| p.ids.len()).max().unwrap_or(2);
    let mut flat = Vec::with_capacity(k * l);
    let mut attn = Vec::with_capacity(k * l);
    for p in plans {
        flat.extend(&p.ids);
        flat.extend(std::iter::repeat_n(special.pad, l - p.ids.len()));
        attn.extend(std::iter::repeat_n(1i64, p.ids.len()));
        attn.extend(std::iter::repeat_n(0i64, l - p.ids.len()));
    }
    let mut ids = Tensor::from_slice(&flat)
        .view([k as i64, l as i64])
        .to_device(device);
    let attn = Tensor::from_slice(&attn)
        .view([k as i64, l as i64])
        .to_device(device);
    // Per plan, its masked positions in order: (position, is first piece, original first piece).
    let steps: Vec<Vec<(usize, bool, i64)>> = plans
        .iter()
        .map(|p| {
            p.spans
                .iter()
                .flat_map(|&(_, start, n, orig)| (0..n).map(move |j| (start + j, j == 0, orig)))
                .collect()
        })
        .collect();
    let depth = steps.iter().map(Vec::len).max().unwrap_or(0);
    let (first_ok, cont_ok) = masks;
    for t in 0..depth {
        let rows: Vec<usize> = (0..k).filter(|&r| steps[r].len() > t).collect();
        let row_t = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>())
            .to_device(device);
        let pos: Vec<i64> = rows.iter().map(|&r| steps[r][t].0 as i64).collect();
        let pos_t = Tensor::from_slice(&pos).to_device(device);
        // Only the plans still filling, and the head only where it is read:
        // `[R, V]`, not `[K, L, V]` (with a 30k vocabulary that is gigabytes).
        let active = TextBatch::new(ids.index_select(0, &row_t), attn.index_select(0, &row_t));
        let at = logits_at(&active, &pos_t)?.to_kind(Kind::Float);
        let v = at.size()[1];
        let is_first: Vec<bool> = rows.iter().map(|&r| steps[r][t].1).collect();
        let is_first_t = Tensor::from_slice(&is_first).to_device(device).unsqueeze(1);
        let mut allowed = first_ok
            .unsqueeze(0)
            .logical_and(&is_first_t)
            .logical_or(&cont_ok.unsqueeze(0).logical_and(&is_first_t.logical_not()));
        // The original word never comes back: its first piece is forbidden.
        let orig: Vec<i64> = rows.iter().map(|&r| steps[r][t].2).collect();
        let orig_t = Tensor::from_slice(&orig).to_device(device).view([-1, 1]);
        let forbid = orig_t
            .one_hot(v)
            .squeeze_dim(1)
            .to_kind(Kind::Bool)
            .logical_and(&is_first_t);
        allowed = allowed.logical_and(&forbid.logical_not());
        let mut scores =
            (at / temperature.max(1e-6)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        if top_k > 0 && top_k < v {
            let (kth, _) = scores.topk(top_k, 1, true, true);
            let floor = kth.narrow(1, top_k - 1, 1);
            scores = scores.masked_fill(&scores.lt_tensor(&floor), f64::NEG_INFINITY);
        }
        let row_keys: Vec<i64> = rows.iter().map(|&r| keys[r]).collect();
        let row_keys = random::combine(
            &Tensor::from_slice(&row_keys).to_device(device),
            &Tensor::from(t as i64).to_device(device),
        );
        let u = random::uniform(&row_keys, 1).squeeze_dim(1);
        let drawn = random::categorical(&scores.softmax(1, Kind::Float), &u);
        let _ = ids.index_put_(&[Some(row_t), Some(pos_t)], &drawn, false);
    }
    let ids_v = readback::to_vec::<i64>(&ids)?;
    Ok((0..k).map(|r| ids_v[r * l..(r + 1) * l].to_vec()).collect())
}

/// `f(i, item)` for every item, in order, on up to 8 scoped threads (one
/// when there are few items: a thread costs more than tagging a caption).
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(items.len().div_ceil(16))
        .max(1);
    if threads == 1 {
        return items.iter().enumerate().map(|(i, x)| f(i, x)).collect();
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per)
            .enumerate()
            .map(|(c, chunk)| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(k, x)| f(c * per + k, x))
                        .collect::<Vec<R>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("NegGen worker panicked"))
            .collect()
    })
}

/// A replaced word of a NegGen candidate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MaskedWord {
    /// Index among the caption's whitespace-separated words.
    pub index: usize,
    pub original: String,
    pub replacement: String,
    pub tag: String,
}

/// One generated candidate and its provenance.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index of the caption in the batch.
    pub owner: usize,
    pub text: String,
    pub masked: Vec<MaskedWord>,
    /// ITM match probability with the image, when the ITM filter ran.
    pub itm: Option<f64>,
    /// Whether it passed the filters.
    pub kept: bool,
}

/// Run counts, for the log.
#[derive(Debug, Default)]
pub struct Counts {
    pub captions: Cell<u64>,
    pub produced: Cell<u64>,
    pub no_candidate: Cell<u64>,
    pub dropped_by_filter: Cell<u64>,
}

impl Counts {
    fn values(&self) -> [u64; 4] {
        [
            self.captions.get(),
            self.produced.get(),
            self.no_candidate.get(),
            self.dropped_by_filter.get(),
        ]
    }
}

/// A caption's replaceable words with their tags, as [`tagged_candidates`]
/// gives them.
pub type Tagged = Vec<(usize, String)>;

/// NegGen's per-caption CPU work, which the data loader does on its worker
/// threads: POS tagging ([`tagged_candidates`]), result type [`Tagged`].
pub struct TagPrep {
    tagger: Arc<dyn PosTagger>,
    tags: Vec<String>,
}

impl TagPrep {
    pub fn new(tagger: Arc<dyn PosTagger>, tags: Vec<String>) -> Self {
        TagPrep { tagger, tags }
    }
}

impl CaptionPrep for TagPrep {
    fn key(&self) -> String {
        format!("neggen.pos_tags:{}", self.tags.join(","))
    }
    fn prepare(&self, caption: &str) -> Prepared {
        Arc::new(tagged_candidates(caption, self.tagger.as_ref(), &self.tags))
    }
}

pub struct NegGen {
    cfg: NegGenConfig,
    tagger: Arc<dyn PosTagger>,
    codec: Rc<dyn TextCodec>,
    masks: RefCell<Option<(Tensor, Tensor)>>,
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
    /// that fills must be a WordPiece one. `key` names the config section in
    /// errors.
    pub fn configured(
        cfg: NegGenConfig,
        codec: Rc<dyn TextCodec>,
        filler: Option<vlmatch_registry::MaskedLm>,
        key: &str,
    ) -> Result<Self> {
        let fill_codec = filler.as_ref().map_or(codec.as_ref(), |f| f.codec.as_ref());
        if !is_wordpiece(fill_codec) {
            let what = if filler.is_some() {
                format!("`{key}.fill_model`'s tokenizer")
            } else {
                "the run's tokenizer (`data.vocab`)".to_string()
            };
            return Err(Error::Config(format!(
                "config key `{key}`: NegGen fills whole words piece by piece in a WordPiece \
                 vocabulary (`##` continuation pieces); {what} has none (byte-level BPE, as \
                 RoBERTa's, is not supported yet): use a BERT-style vocabulary or `fill_model`"
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
            *self.masks.borrow_mut() = Some(piece_masks(codec, device));
        }
        let masks = self.masks.borrow();
        let masks = masks.as_ref().expect("just set");
        // Each caption's choices come from its own stream, keyed by sample
        // (`vlmatch_core::random`), so they do not depend on the batch split.
        let caption_keys = readback::to_vec::<i64>(&fwd.random_keys())?;
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
            let mut rng = caption_keys[i] as u64;
            let mut draw = |n: usize| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng >> 33) as usize) % n.max(1)
            };
            for c in 0..self.cfg.candidates.max(1) {
                let chosen = self.choose_among(&tagged[i], &mut draw);
                if let Some(p) = (!chosen.is_empty())
                    .then(|| plan(caption, &chosen, codec))
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
                masks,
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
            .map(|(p, f)| realise(p, f, codec))
            .collect();

        // Filter: never a caption of a positive of the image (the batch's
        // positive relation, `vlmatch_core::positives`); replacements of the
        // same kind of word (pos_check); then ITM, once trained.
        let owner_index = Tensor::from_slice(&owners.iter().map(|&o| o as i64).collect::<Vec<_>>())
            .to_device(device);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encoded = self.codec.encode(&refs, device);
        let true_of_image =
            readback::to_vec::<bool>(&batch.text_is_positive(&owner_index, &encoded))?;
        // The POS check tags every candidate: spread over threads.
        let kinds_kept: Vec<bool> = if self.cfg.pos_check {
            let (tagger, tags) = (self.tagger.as_ref(), &self.cfg.tags);
            par_map(&plans, |i, p| {
                let masked: Vec<usize> = p.spans.iter().map(|&(w, ..)| w).collect();
                replacements_keep_their_kind(&texts[i], &masked, tagger, tags)
            })
        } else {
            vec![true; plans.len()]
        };
        let mut keep: Vec<bool> = true_of_image
            .iter()
            .zip(kinds_kept)
            .map(|(&positive, kind_kept)| kind_kept && !positive)
            .collect();
        let mut itm = vec![None; texts.len()];
        if step >= self.cfg.filter_after_steps {
            let probs = tch::no_grad(|| -> Result<Vec<f64>> {
                let states = model.text.forward_t(EncoderInput::Text(&encoded), false)?;
                let image = fwd.image()?;
                let image = vlmatch_core::Encoded {
                    hidden: image.hidden.detach().index_select(0, &owner_index),
                    mask: image.mask.index_select(0, &owner_index),
                };
                let fused = model.fuse_cls(&states, &image, false)?;
                let p = model
                    .discriminator
                    .pair_logits(&fused)?
                    .softmax(1, Kind::Float)
                    .select(1, 1);
                readback::to_vec::<f64>(&p.to_kind(Kind::Double))
            })?;
            for ((k, p), slot) in keep.iter_mut().zip(probs).zip(&mut itm) {
                *k = *k && p <= self.cfg.filter_threshold;
                *slot = Some(p);
            }
        }
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
    {
        use vlmatch_registry::check;
        let k = |field: &str| format!("{}.{field}", ctx.key);
        if !(cfg.mask_ratio > 0.0 && cfg.mask_ratio <= 1.0) {
            return Err(check::invalid(
                &k("mask_ratio"),
                format!("must be in (0, 1], got {}", cfg.mask_ratio),
            ));
        }
        check::positive_f64(&k("temperature"), cfg.temperature)?;
        check::at_least(&k("top_k"), cfg.top_k, 0)?;
        check::positive(
            &k("candidates"),
            i64::try_from(cfg.candidates).unwrap_or(i64::MAX),
        )?;
        check::probability(&k("filter_threshold"), cfg.filter_threshold)?;
        check::at_least(&k("filter_after_steps"), cfg.filter_after_steps, 0)?;
    }
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

vlmatch_registry::register!(negative_sampler "neggen_cache" => build_cache);

/// `[samplers.<name>]` for `plugin = "neggen_cache"`: negatives written by
/// `vlmatch neggen` (JSON lines with at least `caption` and `negative`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NegGenCacheConfig {
    pub path: std::path::PathBuf,
}

/// NegGen negatives read from a cache file instead of generated online.
pub struct NegGenCache {
    by_caption: HashMap<String, Vec<String>>,
    codec: Rc<dyn TextCodec>,
}

impl NegGenCache {
    pub fn load(path: &std::path::Path, codec: Rc<dyn TextCodec>) -> Result<Self> {
        let text = vlmatch_registry::check::read_utf8(path)?;
        let mut by_caption: HashMap<String, Vec<String>> = HashMap::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |m: String| Error::Data {
                path: path.to_path_buf(),
                line: Some(n + 1),
                message: m,
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("expected a string field `{k}`")))
            };
            by_caption
                .entry(field("caption")?)
                .or_default()
                .push(field("negative")?);
        }
        Ok(NegGenCache { by_caption, codec })
    }
}

impl NegativeSampler for NegGenCache {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let batch = input.forward.batch;
        let device = batch.text.ids.device();
        let u = random::uniform(&input.forward.random_keys(), 1);
        let draws = readback::to_vec::<f32>(&u)?;
        let (index, texts): (Vec<i64>, Vec<&str>) = batch
            .captions
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let negs = self.by_caption.get(c)?;
                Some((i as i64, negs[random::below(draws[i], negs.len())].as_str()))
            })
            .unzip();
        Ok(Negatives::from_texts(
            self.codec.as_ref(),
            &index,
            &texts,
            device,
        ))
    }
}

fn build_cache(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let cfg: NegGenCacheConfig = ctx.params()?;
    Ok(Box::new(NegGenCache::load(
        &cfg.path,
        ctx.env.text.clone(),
    )?))
}
