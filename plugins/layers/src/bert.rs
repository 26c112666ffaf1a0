//! The BERT family (BERT, RoBERTa, ALBEF's and METER's fusions): post-LN
//! layers with optional cross-attention ([`BertLayer`]), stacked
//! ([`BertStack`]), under embeddings parametrised by the position-id rule
//! and token types ([`BertEmbeddings`]); a text encoder is the two
//! ([`TextEncoder`]), configured by its plugin's resolved architecture
//! ([`TextArch`]). Parameter names follow HuggingFace `BertModel`.

use crate::arch::LayerKeys;
use crate::hf::{ArchSection, CheckedArch};
use crate::{checkpointed, hf_init, Attention, LayerNorm, Linear};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::checkpoint::Checkpointer;
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_registry::BuildContext;

/// Hyper-parameters of a post-LN BERT layer (HuggingFace `BertLayer`).
#[derive(Debug, Clone, Copy)]
pub struct BertLayerConfig {
    pub hidden: i64,
    pub heads: i64,
    pub intermediate: i64,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub layer_norm_eps: f64,
    /// Width of the states cross-attended to; `None` for a text-only layer.
    pub cross_width: Option<i64>,
    pub compute: Kind,
}

/// Self-attention, then (fusion layers) cross-attention to the image, then a
/// feed-forward block; each sub-layer residual + LayerNorm. Parameter names
/// follow HuggingFace `BertLayer` and ALBEF's `crossattention`.
#[derive(Debug)]
pub struct BertLayer {
    attention: Attention,
    attention_out: Linear,
    attention_ln: LayerNorm,
    cross: Option<(Attention, Linear, LayerNorm)>,
    intermediate: Linear,
    output: Linear,
    output_ln: LayerNorm,
    dropout: f64,
}

impl BertLayer {
    pub fn new(p: &nn::Path, cfg: &BertLayerConfig) -> Self {
        Self::build(p, cfg, None)
    }

    /// A fusion layer whose cross-attention `key` and `value` projections
    /// are `with`'s (shared, not copied; `with` must have cross-attention
    /// of the same width): the second layer of an ALBEF NLVR2 pair. Its own
    /// parameters are everything else, under `p`.
    pub fn sharing_cross_key_value(p: &nn::Path, cfg: &BertLayerConfig, with: &BertLayer) -> Self {
        let shared = with
            .cross
            .as_ref()
            .map(|(a, _, _)| a)
            .expect("the layer shared with has cross-attention");
        Self::build(p, cfg, Some(shared))
    }

    /// The same layer under a second handle (its tensors shared, not
    /// copied), which a checkpointed call keeps for backward.
    pub fn shared(&self) -> BertLayer {
        BertLayer {
            attention: self.attention.shared(),
            attention_out: self.attention_out.shared(),
            attention_ln: self.attention_ln.shared(),
            cross: self
                .cross
                .as_ref()
                .map(|(a, o, l)| (a.shared(), o.shared(), l.shared())),
            intermediate: self.intermediate.shared(),
            output: self.output.shared(),
            output_ln: self.output_ln.shared(),
            dropout: self.dropout,
        }
    }

    /// Every parameter the layer reads (shared ones included).
    pub fn params(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        self.attention.params(&mut out);
        self.attention_out.params(&mut out);
        self.attention_ln.params(&mut out);
        if let Some((a, o, l)) = &self.cross {
            a.params(&mut out);
            o.params(&mut out);
            l.params(&mut out);
        }
        self.intermediate.params(&mut out);
        self.output.params(&mut out);
        self.output_ln.params(&mut out);
        out
    }

    /// The cross-attention's `key` and `value` weights; `None` for a
    /// text-only layer.
    pub fn cross_key_value_weights(&self) -> Option<[&Tensor; 2]> {
        self.cross.as_ref().map(|(a, _, _)| a.key_value_weights())
    }

    fn build(p: &nn::Path, cfg: &BertLayerConfig, share_kv: Option<&Attention>) -> Self {
        let h = cfg.hidden;
        let attn = |p: nn::Path, kv: i64, share: Option<&Attention>| {
            (
                match share {
                    Some(with) => Attention::sharing_key_value(
                        &(&p / "self"),
                        h,
                        with,
                        cfg.attention_dropout,
                        cfg.compute,
                    ),
                    None => Attention::new(
                        &(&p / "self"),
                        h,
                        kv,
                        h,
                        cfg.heads,
                        cfg.attention_dropout,
                        cfg.compute,
                    ),
                },
                Linear::new(&(&p / "output" / "dense"), h, h, true, cfg.compute),
                LayerNorm::new(&(&p / "output" / "LayerNorm"), h, cfg.layer_norm_eps),
            )
        };
        let (attention, attention_out, attention_ln) = attn(p / "attention", h, None);
        BertLayer {
            attention,
            attention_out,
            attention_ln,
            cross: cfg
                .cross_width
                .map(|w| attn(p / "crossattention", w, share_kv)),
            intermediate: Linear::new(
                &(p / "intermediate" / "dense"),
                h,
                cfg.intermediate,
                true,
                cfg.compute,
            ),
            output: Linear::new(
                &(p / "output" / "dense"),
                cfg.intermediate,
                h,
                true,
                cfg.compute,
            ),
            output_ln: LayerNorm::new(&(p / "output" / "LayerNorm"), h, cfg.layer_norm_eps),
            dropout: cfg.hidden_dropout,
        }
    }

    /// `xs` `[B, L, H]` with `mask` `[B, L]`; `image` `[B, N, W]` with its
    /// mask for fusion layers. Returns `[B, L, H]` fp32.
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        image: Option<(&Tensor, &Tensor)>,
        train: bool,
    ) -> Tensor {
        self.forward_rows(xs, xs, mask, image, train)
    }

    /// The layer's output at the positions `rows` only (`[B, R, D]`, a slice
    /// of `xs` along dimension 1): self-attention still reads every position
    /// of `xs` as keys and values, so each returned row equals that row of
    /// [`BertLayer::forward`]; the others are not computed.
    pub fn forward_rows(
        &self,
        rows: &Tensor,
        xs: &Tensor,
        mask: &Tensor,
        image: Option<(&Tensor, &Tensor)>,
        train: bool,
    ) -> Tensor {
        self.forward_rows_indexed(rows, xs, mask, image, None, train)
    }

    /// [`BertLayer::forward_rows`] with `image` `[U, N, W]` holding each
    /// distinct image once and `image_index` `[B]` naming row `b`'s
    /// ([`Attention::forward_indexed`]): the cross-attention keys and values
    /// are computed once per image.
    pub fn forward_rows_indexed(
        &self,
        rows: &Tensor,
        xs: &Tensor,
        mask: &Tensor,
        image: Option<(&Tensor, &Tensor)>,
        image_index: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let a = self.attention.forward(rows, xs, Some(mask), train);
        let a = self.attention_out.forward(&a).dropout(self.dropout, train);
        let mut xs = self.attention_ln.forward(&(a + rows));
        if let (Some((attn, out, ln)), Some((img, img_mask))) = (&self.cross, image) {
            let c = attn.forward_indexed(&xs, img, Some(img_mask), image_index, train);
            let c = out.forward(&c).dropout(self.dropout, train);
            xs = ln.forward(&(c + &xs));
        }
        let h = self.intermediate.forward(&xs).gelu("none");
        let h = self.output.forward(&h).dropout(self.dropout, train);
        self.output_ln.forward(&(h + xs))
    }
}

/// How a text's position ids are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionIds {
    /// `0, 1, ..., L - 1` in every row (BERT).
    Absolute,
    /// `padding_idx + cumsum(mask) * mask`: `padding_idx + 1, + 2, ...` over
    /// real tokens and `padding_idx` on padding (RoBERTa; `transformers`'
    /// `create_position_ids_from_input_ids`, with the attention mask for
    /// "not padding").
    PaddingOffset { padding_idx: i64 },
}

impl PositionIds {
    /// The longest text a table of `max_position_embeddings` holds.
    pub fn max_len(&self, max_position_embeddings: i64) -> i64 {
        match self {
            PositionIds::Absolute => max_position_embeddings,
            PositionIds::PaddingOffset { padding_idx } => max_position_embeddings - padding_idx - 1,
        }
    }

    /// The table as errors name it (`512 positions`, `514 positions past
    /// pad_token_id 1`).
    fn describe(&self, max_position_embeddings: i64) -> String {
        match self {
            PositionIds::Absolute => format!("{max_position_embeddings} positions"),
            PositionIds::PaddingOffset { padding_idx } => {
                format!("{max_position_embeddings} positions past pad_token_id {padding_idx}")
            }
        }
    }

    /// Why texts of `max_len` do not fit a table of
    /// `max_position_embeddings`.
    fn too_long(&self, max_len: i64, max_position_embeddings: i64) -> String {
        let mpe = max_position_embeddings;
        match self {
            PositionIds::Absolute => {
                format!("data.max_len {max_len} exceeds max_position_embeddings {mpe}")
            }
            PositionIds::PaddingOffset { padding_idx } => format!(
                "data.max_len {max_len} exceeds the {} positions past pad_token_id \
                 {padding_idx} that max_position_embeddings {mpe} leaves",
                self.max_len(mpe)
            ),
        }
    }

    /// Position ids `[B, L]` (`Absolute`: `[L]`) of a text with `mask`
    /// `[B, L]`.
    pub fn ids(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        match self {
            PositionIds::Absolute => Tensor::arange(ids.size()[1], (Kind::Int64, ids.device())),
            PositionIds::PaddingOffset { padding_idx } => {
                let mask = mask.to_kind(Kind::Int64);
                mask.cumsum(1, Kind::Int64) * &mask + *padding_idx
            }
        }
    }
}

/// The embedding keys of a BERT-family architecture (HuggingFace names).
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingKeys {
    pub hidden_size: i64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    /// The vocabulary size a checkpoint states, if any.
    #[serde(default)]
    pub vocab_size: Option<i64>,
}

impl EmbeddingKeys {
    /// The keys of a resolved architecture.
    pub fn of<C: Serialize>(cfg: &C) -> EmbeddingKeys {
        serde_json::to_value(cfg)
            .and_then(serde_json::from_value)
            .expect("a resolved text architecture has the embedding keys")
    }
}

/// `embeddings.{word_embeddings, position_embeddings,
/// token_type_embeddings, LayerNorm}`: the sum of a token's word, position
/// and (first) token-type embeddings, layer-normed, with dropout.
pub struct BertEmbeddings {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    layer_norm: LayerNorm,
    dropout: f64,
    positions: PositionIds,
}

impl BertEmbeddings {
    /// Build under `p` (the `embeddings` path) for `vocab_size` tokens.
    pub fn new(
        p: &nn::Path,
        keys: &EmbeddingKeys,
        vocab_size: i64,
        positions: PositionIds,
    ) -> Self {
        let h = keys.hidden_size;
        let table = |name: &str, rows: i64| (p / name).var("weight", &[rows, h], hf_init());
        BertEmbeddings {
            word_embeddings: table("word_embeddings", vocab_size),
            position_embeddings: table("position_embeddings", keys.max_position_embeddings),
            token_type_embeddings: table("token_type_embeddings", keys.type_vocab_size),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), h, keys.layer_norm_eps),
            dropout: keys.hidden_dropout_prob,
            positions,
        }
    }

    /// The word embeddings `[V, H]` (an LM head's tied decoder).
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings
    }

    /// `ids`, `mask` `[B, L]` -> `[B, L, H]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let words = embed(&self.word_embeddings, ids);
        let positions = embed(&self.position_embeddings, &self.positions.ids(ids, mask));
        let positions = match self.positions {
            PositionIds::Absolute => positions.unsqueeze(0),
            PositionIds::PaddingOffset { .. } => positions,
        };
        let xs = words + positions + self.token_type_embeddings.get(0);
        self.layer_norm.forward(&xs).dropout(self.dropout, train)
    }
}

/// BERT layers `0..n` under one path (`encoder.layer`, a fusion's `layer`).
pub struct BertStack {
    layers: Vec<BertLayer>,
    /// Activation checkpointing of every layer, where set.
    checkpoint: Option<Checkpointer>,
}

impl BertStack {
    /// `n` layers `cfg` under `p / i`.
    pub fn new(p: &nn::Path, n: i64, cfg: &BertLayerConfig) -> Self {
        BertStack {
            layers: (0..n).map(|i| BertLayer::new(&(p / i), cfg)).collect(),
            checkpoint: None,
        }
    }

    /// ALBEF's NLVR2 fusion: `2n` layers, layer `2k + 1` sharing layer
    /// `2k`'s cross-attention key and value.
    pub fn pairs(p: &nn::Path, n: i64, cfg: &BertLayerConfig) -> Self {
        let mut layers = Vec::new();
        for k in 0..n {
            let first = BertLayer::new(&(p / (2 * k)), cfg);
            let second = BertLayer::sharing_cross_key_value(&(p / (2 * k + 1)), cfg, &first);
            layers.extend([first, second]);
        }
        BertStack {
            layers,
            checkpoint: None,
        }
    }

    /// Checkpoint every layer through `checkpointer` (the host's, from
    /// `BuildContext::checkpointer`), or none with `None`: each layer then
    /// keeps only its inputs and is computed again in backward.
    pub fn set_checkpointing(&mut self, checkpointer: Option<Checkpointer>) {
        self.checkpoint = checkpointer;
    }

    /// The number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the stack has no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[BertLayer] {
        &self.layers
    }

    /// Layer `i` ([`BertLayer::forward_rows_indexed`]): the one place this
    /// stack calls a layer, whatever the encoder (text, fusion,
    /// co-attention stream), checkpointed where the stack is.
    #[allow(clippy::too_many_arguments)]
    pub fn layer(
        &self,
        i: usize,
        rows: &Tensor,
        xs: &Tensor,
        mask: &Tensor,
        cross: Option<(&Tensor, &Tensor)>,
        cross_index: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let layer = &self.layers[i];
        let Some(checkpointer) = self.checkpoint else {
            return layer.forward_rows_indexed(rows, xs, mask, cross, cross_index, train);
        };
        // Inputs: rows, xs, mask, then the cross states and mask, then the
        // index, where present (`rows` is `xs` or a view of it: no copy).
        let mut inputs = vec![
            rows.shallow_clone(),
            xs.shallow_clone(),
            mask.shallow_clone(),
        ];
        let has_cross = cross.is_some();
        if let Some((c, m)) = cross {
            inputs.extend([c.shallow_clone(), m.shallow_clone()]);
        }
        inputs.extend(cross_index.map(Tensor::shallow_clone));
        let owned = layer.shared();
        let run = move |t: &[Tensor]| {
            let cross = has_cross.then(|| (&t[3], &t[4]));
            let index = t.get(if has_cross { 5 } else { 3 });
            owned.forward_rows_indexed(&t[0], &t[1], &t[2], cross, index, train)
        };
        checkpointed(checkpointer, &inputs, &layer.params(), Box::new(run))
    }

    /// The rows layer `i` computes: all of `xs`, or with `cls_only` in the
    /// last layer position 0 alone (a fusion's `[CLS]`, all ITM reads).
    pub fn rows(&self, i: usize, xs: &Tensor, cls_only: bool) -> Tensor {
        if cls_only && i == self.len().saturating_sub(1) {
            xs.narrow(1, 0, 1)
        } else {
            xs.shallow_clone()
        }
    }

    /// Every layer over `xs` `[B, L, H]` with `mask` `[B, L]`; layer `i`
    /// cross-attends to `cross(i)` (states and mask; row `b` to
    /// `cross_index[b]` where given), and with `cls_only` the last computes
    /// position 0 alone.
    pub fn forward<'a>(
        &self,
        xs: Tensor,
        mask: &Tensor,
        cross: impl Fn(usize) -> Option<(&'a Tensor, &'a Tensor)>,
        cross_index: Option<&Tensor>,
        cls_only: bool,
        train: bool,
    ) -> Tensor {
        let mut xs = xs;
        for i in 0..self.len() {
            let rows = self.rows(i, &xs, cls_only);
            xs = self.layer(i, &rows, &xs, mask, cross(i), cross_index, train);
        }
        xs
    }
}

/// A BERT-family text encoder's resolved architecture (a plugin's
/// [`hf_arch!`](crate::hf_arch) config, serialising under HuggingFace's
/// key names), as it configures a [`TextEncoder`].
/// Its [`CheckedArch`] is the checks resolving a section makes.
pub trait TextArch: Serialize + CheckedArch {
    /// The plugin's name, in errors.
    const PLUGIN: &'static str;
    /// The tokenizer file of its checkpoints (`vocab.txt`), in errors.
    const VOCAB_FILE: &'static str;
    /// The plugin's trace span (`|| tracing::trace_span!("bert")`).
    const SPAN: fn() -> tracing::Span;
    /// How the encoder counts positions.
    fn positions(&self) -> PositionIds {
        PositionIds::Absolute
    }
}

/// A BERT-family text encoder: [`BertEmbeddings`] under `embeddings`, then
/// a [`BertStack`] under `encoder.layer` without cross-attention.
pub struct TextEncoder {
    plugin: &'static str,
    span: fn() -> tracing::Span,
    hidden: i64,
    embeddings: BertEmbeddings,
    layers: BertStack,
}

impl TextEncoder {
    /// Build `cfg` under `p` for `vocab_size` tokens and texts of up to
    /// `max_len`, computing in `compute`.
    pub fn new<C: TextArch>(
        p: &nn::Path,
        cfg: &C,
        vocab_size: i64,
        max_len: i64,
        compute: Kind,
    ) -> Result<Self> {
        cfg.check_arch(C::PLUGIN)?;
        let emb = EmbeddingKeys::of(cfg);
        let positions = cfg.positions();
        if max_len > positions.max_len(emb.max_position_embeddings) {
            return Err(Error::plugin(
                C::PLUGIN,
                positions.too_long(max_len, emb.max_position_embeddings),
            ));
        }
        let keys = LayerKeys::of(cfg);
        Ok(TextEncoder {
            plugin: C::PLUGIN,
            span: C::SPAN,
            hidden: emb.hidden_size,
            embeddings: BertEmbeddings::new(&(p / "embeddings"), &emb, vocab_size, positions),
            layers: BertStack::new(
                &(p / "encoder" / "layer"),
                keys.num_hidden_layers,
                &keys.bert_layer(None, None, compute),
            ),
        })
    }

    /// Checkpoint its layers through `checkpointer`
    /// ([`BertStack::set_checkpointing`]).
    pub fn set_checkpointing(&mut self, checkpointer: Option<Checkpointer>) {
        self.layers.set_checkpointing(checkpointer);
    }

    /// `ids`, `mask` `[B, L]` -> `[B, L, H]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let xs = self.embeddings.forward(ids, mask, train);
        self.layers.forward(xs, mask, |_| None, None, false, train)
    }

    /// Position ids `[B, L]` (`[L]` for absolute positions) of a text.
    pub fn position_ids(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        self.embeddings.positions.ids(ids, mask)
    }
}

impl Encoder for TextEncoder {
    fn modality(&self) -> Modality {
        Modality::Text
    }
    fn hidden_size(&self) -> i64 {
        self.hidden
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = (self.span)().entered();
        let EncoderInput::Text(text) = input else {
            return Err(Error::plugin(self.plugin, "a text encoder takes token ids"));
        };
        Ok(Encoded {
            hidden: self.forward(&text.ids, &text.mask, train),
            mask: text.mask.shallow_clone(),
        })
    }
    fn word_embeddings(&self) -> Option<Tensor> {
        Some(self.embeddings.word_embeddings().shallow_clone())
    }
}

/// The factory of a text encoder plugin whose config section is `S`: the
/// section resolved, then [`build_text`].
pub fn text_encoder<S>(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>>
where
    S: ArchSection,
    S::Arch: TextArch,
{
    let section: S = ctx.params()?;
    let cfg = section.resolve(&ctx.key)?;
    build_text(ctx, &cfg, section.init())
}

/// The factory of a text encoder plugin: `cfg` (resolved from the section,
/// with `init` its checkpoint) checked against the run's texts and
/// tokenizer, then built.
pub fn build_text<C: TextArch>(
    ctx: &BuildContext<'_>,
    cfg: &C,
    init: Option<&Path>,
) -> Result<Rc<dyn Encoder>> {
    let emb = EmbeddingKeys::of(cfg);
    let positions = cfg.positions();
    if ctx.env.max_text_len > positions.max_len(emb.max_position_embeddings) {
        return Err(vlmatch_registry::check::invalid(
            &format!("{}.max_position_embeddings", ctx.key),
            format!(
                "{} cannot hold data.max_len {} tokens; raise it or lower data.max_len",
                positions.describe(emb.max_position_embeddings),
                ctx.env.max_text_len
            ),
        ));
    }
    let tokenizer = C::VOCAB_FILE;
    if let Some(v) = emb.vocab_size.filter(|&v| v != ctx.env.vocab_size) {
        return Err(Error::Config(format!(
            "config key `{}.init`: the checkpoint's vocab_size {v} differs from the tokenizer's {}; \
             set data.vocab to the checkpoint's {tokenizer}",
            ctx.key, ctx.env.vocab_size
        )));
    }
    if let PositionIds::PaddingOffset { padding_idx } = positions {
        if init.is_some() && ctx.env.special.pad != padding_idx {
            return Err(Error::Config(format!(
                "config key `{}.init`: the checkpoint's pad_token_id {padding_idx} differs from \
                 the tokenizer's pad id {}; set data.vocab to the checkpoint's {tokenizer}",
                ctx.key, ctx.env.special.pad
            )));
        }
    }
    let mut encoder = TextEncoder::new(
        &ctx.path,
        cfg,
        ctx.env.vocab_size,
        ctx.env.max_text_len,
        ctx.env.compute,
    )?;
    encoder.set_checkpointing(ctx.checkpointer()?);
    Ok(Rc::new(encoder))
}
