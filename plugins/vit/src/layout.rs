//! How `vit` maps onto HuggingFace `ViTModel` checkpoints and back: its
//! parameter names are the hub's below the optional `vit.` prefix.

use crate::{VitConfig, VitSection};
use serde_json::json;
use tch::Tensor;
use vlmatch_core::Result;
use vlmatch_layers::hf::interpolate_grid_positions;
use vlmatch_registry::weights::{
    hub_name, CheckpointLayout, ExportContext, ExportFiles, LoadContext,
};

/// The checkpoint layout registered with encoder `vit`.
pub struct VitLayout;

impl CheckpointLayout for VitLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["vit"]
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["ViTModel", "ViTForImageClassification"]
    }

    /// Everything below `vit.` except the pooler and a classifier head.
    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let n = hub_name(name, &["vit."]);
        let skip = n.starts_with("pooler.") || n.starts_with("classifier.");
        (!skip).then_some(n)
    }

    /// A checkpoint at another resolution: position embeddings interpolated.
    fn resize(&self, param: &str, tensor: &Tensor, target: &[i64]) -> Option<Tensor> {
        (param == "embeddings.position_embeddings")
            .then(|| interpolate_grid_positions(tensor, target))
            .flatten()
    }

    /// A `ViTModel` at the run's resolution, with a `ViTImageProcessor`
    /// holding the run's normalisation.
    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        let c: VitConfig = ctx.params::<VitSection>()?.resolve(ctx.key)?;
        let config = json!({
            "model_type": "vit",
            "architectures": ["ViTModel"],
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "hidden_act": c.hidden_act,
            "hidden_dropout_prob": c.hidden_dropout_prob,
            "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
            "layer_norm_eps": c.layer_norm_eps,
            "image_size": ctx.image_size,
            "patch_size": c.patch_size,
            "num_channels": 3,
            "qkv_bias": c.qkv_bias,
            "initializer_range": 0.02,
            "image_mean": ctx.mean,
            "image_std": ctx.std,
        });
        let preprocessor = json!({
            "image_processor_type": "ViTImageProcessor",
            "do_resize": true,
            "size": {"height": ctx.image_size, "width": ctx.image_size},
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
