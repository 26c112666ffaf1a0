//! How `clip_vit` maps onto HuggingFace `CLIPVisionModel` and `CLIPModel`
//! checkpoints and back: its parameter names are the hub's (below
//! `vision_model.` in older files); a `CLIPModel`'s text tower, projections
//! and temperature are not its.

use crate::{ClipVitConfig, ClipVitSection};
use serde_json::json;
use vlmatch_core::Result;
use vlmatch_layers::layout::{export_files, hub_config, image_processor, HubLayout, NameMap};
use vlmatch_registry::weights::{ExportContext, ExportFiles};

/// The checkpoint layout registered with encoder `clip_vit`: names with or
/// without `vision_model.` (`transformers` 4 writes it, 5 does not), except
/// a `CLIPModel`'s other parts and the id buffer; a checkpoint at another
/// resolution has its position embeddings interpolated.
pub static CLIP_VIT_LAYOUT: HubLayout = HubLayout::new(
    &["clip", "clip_vision_model"],
    &["CLIPVisionModel", "CLIPModel"],
    NameMap::below(&["vision_model."])
        .current_layer_norms()
        .skip(CLIP_OTHER_PARTS, &["embeddings.position_ids"]),
)
.with_grid_positions("embeddings.position_embedding.weight")
.with_export(export);

/// A `CLIPModel`'s parts that are not its vision tower's.
const CLIP_OTHER_PARTS: &[&str] = &[
    "text_model.",
    "text_projection",
    "visual_projection",
    "logit_scale",
];

/// A `CLIPVisionModel` at the run's resolution, with a
/// `CLIPImageProcessor` holding the run's normalisation.
fn export(ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
    let c: ClipVitConfig = ctx.params::<ClipVitSection>()?.resolve(ctx.key)?;
    let s = ctx.image_size;
    let run = json!({"image_size": s, "initializer_factor": 1.0});
    let sizes = json!({
        "size": {"shortest_edge": s},
        "do_center_crop": true,
        "crop_size": {"height": s, "width": s},
    });
    let files = vec![image_processor(ctx, "CLIPImageProcessor", sizes)];
    let config = hub_config("clip_vision_model", "CLIPVisionModel", &c, run);
    export_files(ctx, config, files)
}
