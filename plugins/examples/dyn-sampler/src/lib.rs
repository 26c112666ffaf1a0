//! Dynamic plugin example: negative sampler `color_flip`, which turns the
//! first color word of a caption into its counterpart (red <-> green, blue
//! <-> orange, yellow <-> purple, black <-> white): a fluent caption that is
//! wrong about the image in one detail.

use vlmatch_registry::dynamic::TextSampler;

const PAIRS: [(&str, &str); 4] = [
    ("red", "green"),
    ("blue", "orange"),
    ("yellow", "purple"),
    ("black", "white"),
];

pub struct ColorFlip;

/// The caption with its first color word flipped, if it has one.
pub fn flip(caption: &str) -> Option<String> {
    let mut words: Vec<String> = caption.split(' ').map(str::to_string).collect();
    for w in &mut words {
        let other = PAIRS.iter().find_map(|&(a, b)| {
            if w == a {
                Some(b)
            } else if w == b {
                Some(a)
            } else {
                None
            }
        });
        if let Some(o) = other {
            *w = o.to_string();
            return Some(words.join(" "));
        }
    }
    None
}

impl TextSampler for ColorFlip {
    fn from_config(json: &str) -> Result<Self, String> {
        // The section holds only `plugin`; anything else is a mistake.
        let extra = json.contains(':') && json.replace(' ', "") != r#"{"plugin":"color_flip"}"#;
        if extra {
            return Err(format!(
                "color_flip takes no keys besides `plugin`, got {json}"
            ));
        }
        Ok(ColorFlip)
    }
    fn negative(&mut self, caption: &str, _seed: u64) -> Option<String> {
        flip(caption)
    }
}

vlmatch_registry::export_dynamic_samplers!("color_flip" => ColorFlip);
