//! Downstream task heads ([`vlmatch_core::Head`]) on fused `[CLS]` states.
//!
//! - `albef_classifier` (SNLI-VE, NLVR2): ALBEF's `cls_head`,
//!   `Linear(D, D) -> ReLU -> Linear(D, outputs)`; parameters `0.*` and
//!   `2.*` under its path (the host builds it at `cls_head`, ALBEF's names).
//! - `meter_vqa` (VQA): METER's answer classifier, `Linear(D, 2D) -> GELU ->
//!   LayerNorm -> Linear(2D, answers)`; parameters `dense.*`,
//!   `LayerNorm.*`, `out.*` (built at `vqa_head`).
//!
//! Logits come out in fp32 whatever the compute dtype.

use tch::{Kind, Tensor};
use vlmatch_core::{Head, Result};
use vlmatch_layers::{LayerNorm, Linear};
use vlmatch_registry::HeadSpec;

vlmatch_registry::register!(head "albef_classifier" => albef_classifier);
vlmatch_registry::register!(head "meter_vqa" => meter_vqa);

/// ALBEF's classifier head.
pub struct AlbefClassifier {
    dense: Linear,
    out: Linear,
}

fn albef_classifier(s: &HeadSpec<'_>) -> Result<Box<dyn Head>> {
    let p = &s.path;
    Ok(Box::new(AlbefClassifier {
        dense: Linear::new(&(p / "0"), s.width, s.width, true, s.compute),
        out: Linear::new(&(p / "2"), s.width, s.outputs, true, s.compute),
    }))
}

impl Head for AlbefClassifier {
    fn forward(&self, cls: &Tensor) -> Tensor {
        self.out
            .forward(&self.dense.forward(cls).relu())
            .to_kind(Kind::Float)
    }
}

/// METER's VQA answer classifier.
pub struct MeterVqa {
    dense: Linear,
    ln: LayerNorm,
    out: Linear,
}

fn meter_vqa(s: &HeadSpec<'_>) -> Result<Box<dyn Head>> {
    let p = &s.path;
    Ok(Box::new(MeterVqa {
        dense: Linear::new(&(p / "dense"), s.width, 2 * s.width, true, s.compute),
        ln: LayerNorm::new(&(p / "LayerNorm"), 2 * s.width, 1e-12),
        out: Linear::new(&(p / "out"), 2 * s.width, s.outputs, true, s.compute),
    }))
}

impl Head for MeterVqa {
    fn forward(&self, cls: &Tensor) -> Tensor {
        let h = self.ln.forward(&self.dense.forward(cls).gelu("none"));
        self.out.forward(&h).to_kind(Kind::Float)
    }
}
