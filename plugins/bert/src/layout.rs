//! How `bert` maps onto HuggingFace `BertModel` checkpoints and back: its
//! parameter names are the hub's below the optional `bert.` prefix.

use crate::{BertConfig, BertSection};
use serde_json::json;
use vlmatch_core::Result;
use vlmatch_layers::layout::{
    export_files, hub_config, text_arch, HubLayout, NameMap, TEXT_ID_BUFFERS,
};
use vlmatch_registry::weights::{ExportContext, ExportFiles};

/// The checkpoint layout registered with encoder `bert`: everything below
/// `bert.` except the pooler, the heads (`cls.*`, the generator's) and the
/// position and token-type id buffers.
pub static BERT_LAYOUT: HubLayout = HubLayout::new(
    &["bert"],
    &["BertModel", "BertForMaskedLM", "BertForPreTraining"],
    NameMap::below(&["bert."]).skip(&["cls.", "pooler."], TEXT_ID_BUFFERS),
)
.with_read_arch(|dir| {
    let cfg = BertSection::from_init(dir).resolve("fill_model.text")?;
    text_arch(dir, cfg.max_position_embeddings, cfg.vocab_size)
})
.with_export(export);

/// A `BertModel` (`config.json` from the resolved section, weights by
/// their own names).
fn export(ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
    let c: BertConfig = ctx.params::<BertSection>()?.resolve(ctx.key)?;
    let run = json!({"vocab_size": ctx.vocab_size, "pad_token_id": ctx.special.pad});
    export_files(ctx, hub_config("bert", "BertModel", &c, run), vec![])
}
