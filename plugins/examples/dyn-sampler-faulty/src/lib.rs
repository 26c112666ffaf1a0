//! Sampler `panicky`, which panics on purpose: in `create` when its section
//! says `panic_in = "create"`, otherwise in `sample` on the first caption.
//! The export macro catches both, so the host gets errors, not an abort.

use vlmatch_registry::dynamic::TextSampler;

pub struct Panicky;

impl TextSampler for Panicky {
    fn from_config(json: &str) -> Result<Self, String> {
        if json.replace(' ', "").contains(r#""panic_in":"create""#) {
            panic!("panicky was told to panic in create");
        }
        Ok(Panicky)
    }
    fn negative(&mut self, caption: &str, _seed: u64) -> Option<String> {
        panic!("panicky cannot negate {caption:?}");
    }
}

vlmatch_registry::export_dynamic_samplers!("panicky" => Panicky);
