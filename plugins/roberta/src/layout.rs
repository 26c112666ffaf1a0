//! How `roberta` and `roberta_lm_head` map onto HuggingFace `RobertaModel`
//! and `RobertaForMaskedLM` checkpoints and back: the encoder's parameter
//! names are the hub's below the optional `roberta.` prefix, the head's are
//! `lm_head.*`.

use crate::{RobertaConfig, RobertaSection};
use serde_json::json;
use vlmatch_core::Result;
use vlmatch_layers::layout::{
    export_files, head_arch, hub_config, text_arch, HubLayout, NameMap, TEXT_ID_BUFFERS,
    TIED_DECODER,
};
use vlmatch_registry::weights::{ExportContext, ExportFiles};

/// The checkpoint layout registered with encoder `roberta`: everything
/// below `roberta.` except the pooler, the LM head (the generator's) and
/// the id buffers.
pub static ROBERTA_LAYOUT: HubLayout = HubLayout::new(
    &["roberta"],
    &["RobertaModel", "RobertaForMaskedLM"],
    NameMap::below(&["roberta."]).skip(&["lm_head.", "pooler."], TEXT_ID_BUFFERS),
)
.with_read_arch(|dir| {
    let cfg = RobertaSection::from_init(dir).resolve("fill_model.text")?;
    text_arch(dir, cfg.max_len(), cfg.vocab_size)
})
.with_export(export);

/// A `RobertaModel` (`config.json` from the resolved section, weights by
/// their own names).
fn export(ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
    let c: RobertaConfig = ctx.params::<RobertaSection>()?.resolve(ctx.key)?;
    let run = json!({
        "vocab_size": ctx.vocab_size,
        "bos_token_id": ctx.special.cls,
        "eos_token_id": ctx.special.sep,
    });
    export_files(ctx, hub_config("roberta", "RobertaModel", &c, run), vec![])
}

/// The checkpoint layout registered with generator `roberta_lm_head`: a
/// `RobertaForMaskedLM`'s `lm_head.*` under the same names (the decoder
/// weight is the tied word-embedding matrix and is not loaded; its bias is
/// `lm_head.bias`). The head's epsilon is the checkpoint's
/// `layer_norm_eps`.
pub static ROBERTA_LM_HEAD_LAYOUT: HubLayout = HubLayout::new(
    &["roberta"],
    &["RobertaForMaskedLM"],
    NameMap::within("lm_head.")
        .current_layer_norms()
        .skip(&[], TIED_DECODER),
)
.with_read_arch(|dir| {
    let cfg = RobertaSection::from_init(dir).resolve("fill_model.text")?;
    head_arch(cfg.layer_norm_eps)
});
