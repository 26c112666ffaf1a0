//! How `clip_vit` maps onto HuggingFace `CLIPVisionModel` and `CLIPModel`
//! checkpoints and back: its parameter names are the hub's (below
//! `vision_model.` in older files); a `CLIPModel`'s text tower, projections
//! and temperature are not its.

use crate::{ClipVitConfig, ClipVitSection};
use serde_json::json;
use tch::Tensor;
use vlmatch_core::Result;
use vlmatch_layers::hf::interpolate_grid_positions;
use vlmatch_registry::weights::{CheckpointLayout, ExportContext, ExportFiles, LoadContext};

/// The checkpoint layout registered with encoder `clip_vit`.
pub struct ClipVitLayout;

impl CheckpointLayout for ClipVitLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["clip", "clip_vision_model"]
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["CLIPVisionModel", "CLIPModel"]
    }

    /// Names with or without `vision_model.` (`transformers` 4 writes it, 5
    /// does not), except a `CLIPModel`'s other parts and the id buffer.
    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let n = name.strip_prefix("vision_model.").unwrap_or(name);
        let not_ours = [
            "text_model.",
            "text_projection",
            "visual_projection",
            "logit_scale",
        ];
        let skip = not_ours.iter().any(|p| n.starts_with(p)) || n == "embeddings.position_ids";
        (!skip).then(|| n.to_string())
    }

    /// A checkpoint at another resolution: position embeddings interpolated.
    fn resize(&self, param: &str, tensor: &Tensor, target: &[i64]) -> Option<Tensor> {
        (param == "embeddings.position_embedding.weight")
            .then(|| interpolate_grid_positions(tensor, target))
            .flatten()
    }

    /// A `CLIPVisionModel` at the run's resolution, with a
    /// `CLIPImageProcessor` holding the run's normalisation.
    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        let c: ClipVitConfig = ctx.params::<ClipVitSection>()?.resolve(ctx.key)?;
        let config = json!({
            "model_type": "clip_vision_model",
            "architectures": ["CLIPVisionModel"],
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_channels": c.num_channels,
            "image_size": ctx.image_size,
            "patch_size": c.patch_size,
            "hidden_act": c.hidden_act,
            "layer_norm_eps": c.layer_norm_eps,
            "attention_dropout": c.attention_dropout,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
        });
        let preprocessor = json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": true,
            "size": {"shortest_edge": ctx.image_size},
            "do_center_crop": true,
            "crop_size": {"height": ctx.image_size, "width": ctx.image_size},
            "resample": 3,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": ctx.mean,
            "image_std": ctx.std,
        });
        Ok(Some(ExportFiles {
            config,
            tensors: ctx.tensors_prefixed(""),
            files: vec![("preprocessor_config.json".into(), preprocessor)],
        }))
    }
}
