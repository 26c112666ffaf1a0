//! Plugins that fail on purpose, for the boundary's tests: sampler
//! `panicky`, which panics in `create` when its section says `panic_in =
//! "create"`, otherwise in `sample` on the first caption; encoder
//! `panicky_stem`, which panics in `forward`; objective `bad_matmul`,
//! whose tch call fails (a product of mismatched shapes); objective
//! `reads_itc_logits`, which reads what a library is not given (ITC's
//! logits) and logs their sum as a metric (NaN by design). The export
//! catches every panic, so the host gets errors, not an abort.

use std::rc::Rc;
use vlmatch_plugin_sdk::core::{
    Encoded, Encoder, EncoderInput, Forward, Hook, Modality, Objective, ObjectiveOutput, Result,
};
use vlmatch_plugin_sdk::registry::hooks::HookContext;
use vlmatch_plugin_sdk::tch::{Device, Kind, Tensor};
use vlmatch_plugin_sdk::{register, BuildContext, TextSampler};

pub struct Panicky;

impl TextSampler for Panicky {
    fn from_config(json: &str) -> std::result::Result<Self, String> {
        if json.replace(' ', "").contains(r#""panic_in":"create""#) {
            panic!("panicky was told to panic in create");
        }
        Ok(Panicky)
    }
    fn negative(&mut self, caption: &str, _seed: u64) -> Option<String> {
        panic!("panicky cannot negate {caption:?}");
    }
}

struct PanickyStem;

impl Encoder for PanickyStem {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn hidden_size(&self) -> i64 {
        32
    }
    fn forward_t(&self, _: EncoderInput<'_>, _: bool) -> Result<Encoded> {
        panic!("panicky_stem was told to panic in forward");
    }
}

fn build_stem(_: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    Ok(Rc::new(PanickyStem))
}

struct BadMatmul;

impl Objective for BadMatmul {
    fn forward(&self, _: &Forward<'_>, _: i64) -> Result<ObjectiveOutput> {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([4, 5], (Kind::Float, Device::Cpu));
        Ok(ObjectiveOutput {
            losses: vec![("bad".into(), a.matmul(&b).sum(Kind::Float))],
            metrics: Vec::new(),
        })
    }
}

fn build_bad(_: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    Ok(Box::new(BadMatmul))
}

register!(encoder "panicky_stem" => build_stem);
register!(objective "bad_matmul" => build_bad);
register!(objective "reads_itc_logits" => build_reads_itc);
register!(hook "faulty_hook" => build_faulty_hook);
vlmatch_plugin_sdk::export!("panicky" => Panicky);

struct ReadsItcLogits;

impl Objective for ReadsItcLogits {
    fn forward(&self, forward: &Forward<'_>, _: i64) -> Result<ObjectiveOutput> {
        let logits = forward.similarity()?.i2t.sum(Kind::Float).detach();
        Ok(ObjectiveOutput {
            losses: Vec::new(),
            metrics: vec![("itc_logits_sum".into(), logits)],
        })
    }
}

fn build_reads_itc(_: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    Ok(Box::new(ReadsItcLogits))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct FaultyHookConfig {
    at: String,
}

struct FaultyHook;

impl Hook for FaultyHook {
    fn before_backward(&self, _step: i64, loss: Tensor) -> Tensor {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        loss * a
            .matmul(&Tensor::ones([4, 5], (Kind::Float, Device::Cpu)))
            .sum(Kind::Float)
    }
}

fn build_faulty_hook(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    if !ctx.enabled(false) {
        return Ok(None);
    }
    let c: FaultyHookConfig = ctx.params()?;
    if c.at == "model" {
        ctx.model()?;
    }
    Ok(Some(Box::new(FaultyHook)))
}
