//! Matching heads on fused states: a 2-way ITM head on the fused `[CLS]`
//! (ALBEF's `itm_head`) and an ELECTRA-style per-token RTD head
//! (`rtd_head.dense` + GELU + `rtd_head.out`, Clark et al., ICLR 2020).
//!
//! Registered as discriminator `linear`. Width: the fusion encoder's.

use serde::Deserialize;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Discriminator, Encoded, Result};
use vlmatch_layers::Linear;
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(discriminator "linear" => build);

/// `[model.discriminator]` for `plugin = "linear"` has no keys of its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearHeadsConfig {}

pub struct LinearHeads {
    itm: Linear,
    rtd_dense: Linear,
    rtd_out: Linear,
}

impl LinearHeads {
    pub fn new(p: &nn::Path, width: i64, compute: Kind) -> Self {
        LinearHeads {
            itm: Linear::new(&(p / "itm_head"), width, 2, true, compute),
            rtd_dense: Linear::new(&(p / "rtd_head" / "dense"), width, width, true, compute),
            rtd_out: Linear::new(&(p / "rtd_head" / "out"), width, 1, true, compute),
        }
    }
}

impl Discriminator for LinearHeads {
    fn token_logits(&self, fused: &Encoded) -> Result<Tensor> {
        let h = self.rtd_dense.forward(&fused.hidden).gelu("none");
        Ok(self
            .rtd_out
            .forward(&h)
            .squeeze_dim(-1)
            .to_kind(Kind::Float))
    }
    fn pair_logits(&self, fused: &Encoded) -> Result<Tensor> {
        Ok(self.itm.forward(&fused.cls()).to_kind(Kind::Float))
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Discriminator>> {
    let _: LinearHeadsConfig = ctx.params()?;
    Ok(Rc::new(LinearHeads::new(
        &ctx.path,
        ctx.width("fusion")?,
        ctx.env.compute,
    )))
}
