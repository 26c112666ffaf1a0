//! How `vit` maps onto HuggingFace `ViTModel` checkpoints and back: its
//! parameter names are the hub's below the optional `vit.` prefix.

use crate::{VitConfig, VitSection};
use serde_json::json;
use vlmatch_core::Result;
use vlmatch_layers::layout::{export_files, hub_config, image_processor, HubLayout, NameMap};
use vlmatch_registry::weights::{ExportContext, ExportFiles};

/// The checkpoint layout registered with encoder `vit`: everything below
/// `vit.` except the pooler and a classifier head; a checkpoint at another
/// resolution has its position embeddings interpolated.
pub static VIT_LAYOUT: HubLayout = HubLayout::new(
    &["vit"],
    &["ViTModel", "ViTForImageClassification"],
    NameMap::below(&["vit."]).skip(&["pooler.", "classifier."], &[]),
)
.with_grid_positions("embeddings.position_embeddings")
.with_export(export);

/// A `ViTModel` at the run's resolution, with a `ViTImageProcessor`
/// holding the run's normalisation.
fn export(ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
    let c: VitConfig = ctx.params::<VitSection>()?.resolve(ctx.key)?;
    let s = ctx.image_size;
    let run = json!({
        "image_size": s,
        "num_channels": 3,
        "image_mean": ctx.mean,
        "image_std": ctx.std,
    });
    let size = json!({"size": {"height": s, "width": s}});
    let files = vec![image_processor(ctx, "ViTImageProcessor", size)];
    export_files(ctx, hub_config("vit", "ViTModel", &c, run), files)
}
