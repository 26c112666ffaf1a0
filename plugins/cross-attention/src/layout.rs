//! How `cross_attention` starts from a text checkpoint (ALBEF): fusion
//! layer `i` takes the self-attention and feed-forward of the checkpoint's
//! layer `i + init_layer_offset`, the layers above the text encoder's; its
//! cross-attention is new. The fusion cannot be built from a checkpoint
//! alone and has no `transformers` class, so it exports nothing.

use vlmatch_layers::layout::{HubLayout, NameMap};
use vlmatch_registry::weights::{hub_name, layer_index, LoadContext};

/// The checkpoint layout registered with encoder `cross_attention`. BERT's
/// and RoBERTa's layers are the same post-LN blocks under the same names;
/// the cross-attention is new by design.
pub static CROSS_ATTENTION_LAYOUT: HubLayout = HubLayout::new(
    &["bert", "roberta"],
    &[
        "BertModel",
        "BertForMaskedLM",
        "RobertaModel",
        "RobertaForMaskedLM",
    ],
    NameMap::Custom(map_name),
)
.with_new_by_design(".crossattention.")
.with_read_arch(|_| Ok(None));

/// `encoder.layer.N.*` -> `layer.(N - offset).*` for `N >= offset`, where
/// the offset is `init_layer_offset`, or else the number of text encoder
/// layers the model has (those layers went to the text encoder).
fn map_name(ctx: &LoadContext<'_>, name: &str) -> Option<String> {
    let n = hub_name(name, &["bert.", "roberta."]);
    let (index, rest) = layer_index(&n, "encoder.layer.")?;
    let offset = ctx
        .section
        .get("init_layer_offset")
        .and_then(|v| v.as_i64())
        .unwrap_or_else(|| text_layers(ctx));
    let i = index - offset;
    (i >= 0).then(|| format!("layer.{i}.{rest}"))
}

/// Number of `text_encoder.encoder.layer.N` blocks in the model.
fn text_layers(ctx: &LoadContext<'_>) -> i64 {
    ctx.vars
        .keys()
        .filter_map(|k| layer_index(k.strip_prefix("text_encoder.")?, "encoder.layer."))
        .map(|(n, _)| n + 1)
        .max()
        .unwrap_or(0)
}
