//! `color_flip` exported with a wrong vlmatch version, to test the handshake.

use vlmatch_registry::dynamic::TextSampler;

pub struct ColorFlip;

impl TextSampler for ColorFlip {
    fn from_config(_json: &str) -> Result<Self, String> {
        Ok(ColorFlip)
    }
    fn negative(&mut self, _caption: &str, _seed: u64) -> Option<String> {
        None
    }
}

vlmatch_registry::export_dynamic_samplers!(@table "0.0.0-other", vlmatch_registry::dynamic::ABI_VERSION; "color_flip" => ColorFlip);
