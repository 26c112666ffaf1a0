//! `vlmatch explain`: where a caption disagrees with an image.
//!
//! The VL-RTD discriminator gives every caption token the probability that
//! it was replaced, i.e. that it does not fit the image; this module turns
//! that into a per-word report (a word's probability is the highest of its
//! word pieces), adds the ITM match probability of the whole pair, and can
//! write a small HTML page that highlights the suspicious words next to the
//! image.

use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::path::Path;
use tch::{Kind, Tensor};
use vlmatch_core::{Encoded, EncoderInput, Error, Result, TextBatch, VlModel};

#[derive(Debug, Clone, Serialize)]
pub struct WordScore {
    pub word: String,
    /// Probability that the word does not match the image (VL-RTD head).
    pub mismatch: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub text: String,
    pub words: Vec<WordScore>,
    /// ITM probability that image and caption match.
    pub itm: f64,
    /// The word with the highest mismatch probability.
    pub most_suspicious: Option<String>,
}

/// Per-word values from per-token values: a word takes the highest of its
/// pieces' values.
pub fn word_max(tokens: &[f64], spans: &[std::ops::Range<usize>]) -> Vec<f64> {
    spans
        .iter()
        .map(|r| tokens[r.clone()].iter().cloned().fold(f64::MIN, f64::max))
        .collect()
}

/// Scores of `text` against one image given as normalised pixels
/// `[3, S, S]`.
pub fn explain(
    model: &VlModel,
    tokenizer: &Tokenizer,
    max_len: usize,
    image: &Tensor,
    text: &str,
) -> Result<Explanation> {
    let (ids, words) = tokenizer.encode_words(text, max_len);
    if words.is_empty() {
        return Err(Error::Config(format!(
            "--text {text:?}: nothing to explain (no words)"
        )));
    }
    tch::no_grad(|| {
        let device = model.device;
        let n = ids.len() as i64;
        let batch = TextBatch::new(
            Tensor::from_slice(&ids).view([1, n]).to_device(device),
            Tensor::ones([1, n], (Kind::Int64, device)),
        );
        let img = model.image.forward_t(
            EncoderInput::Image(&image.unsqueeze(0).to_device(device)),
            false,
        )?;
        let txt = model.text.forward_t(EncoderInput::Text(&batch), false)?;
        // One full fusion: the RTD head reads every token, ITM the [CLS].
        let fused: Encoded = model.fuse(&txt, &img, false)?;
        let token_p = model
            .discriminator
            .token_logits(&fused)?
            .sigmoid()
            .to_kind(Kind::Double)
            .to_device(tch::Device::Cpu)
            .view([-1]);
        let token_p = Vec::<f64>::try_from(token_p)?;
        let itm = model
            .discriminator
            .pair_logits(&fused)?
            .softmax(1, Kind::Float)
            .double_value(&[0, 1]);
        let spans: Vec<_> = words.iter().map(|(_, r)| r.clone()).collect();
        let words: Vec<WordScore> = words
            .into_iter()
            .zip(word_max(&token_p, &spans))
            .map(|((word, _), mismatch)| WordScore { word, mismatch })
            .collect();
        let most_suspicious = words
            .iter()
            .max_by(|a, b| a.mismatch.total_cmp(&b.mismatch))
            .map(|w| w.word.clone());
        Ok(Explanation {
            text: text.to_string(),
            words,
            itm,
            most_suspicious,
        })
    })
}

/// Normalised `[3, size, size]` pixels of an image file.
pub fn image_tensor(path: &Path, size: usize, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let rgb = crate::data::loader::decode_resized(path, "--image", size)?;
    let s = size as i64;
    Ok(Tensor::from_slice(&crate::data::normalize(&rgb, mean, std)).view([3, s, s]))
}

/// The report as text lines: each word with its probability and a bar.
pub fn render_text(e: &Explanation) -> String {
    let width = e
        .words
        .iter()
        .map(|w| w.word.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!("caption: {}\nITM match probability: {:.3}\n", e.text, e.itm);
    s += &format!("{:<width$}  p(mismatch)\n", "word");
    for w in &e.words {
        let bar = "#".repeat((w.mismatch * 20.0).round() as usize);
        let mark = if Some(&w.word) == e.most_suspicious.as_ref() {
            "  <- most suspicious"
        } else {
            ""
        };
        s += &format!("{:<width$}  {:.3} {bar}{mark}\n", w.word, w.mismatch);
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A self-contained HTML page: the image (embedded) and the caption with
/// each word's background as red as its mismatch probability.
pub fn render_html(e: &Explanation, image: &Path) -> Result<String> {
    let bytes = std::fs::read(image).map_err(|err| Error::io(image, err))?;
    let mime = match image
        .extension()
        .and_then(|x| x.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => "image/jpeg",
    };
    let words: String = e
        .words
        .iter()
        .map(|w| {
            format!(
                "<span title=\"p(mismatch) = {p:.3}\" style=\"background: rgba(220, 30, 30, {p:.3})\">{}</span> ",
                escape(&w.word),
                p = w.mismatch
            )
        })
        .collect();
    let rows: String = e
        .words
        .iter()
        .map(|w| {
            format!(
                "<tr><td>{}</td><td>{:.3}</td></tr>",
                escape(&w.word),
                w.mismatch
            )
        })
        .collect();
    Ok(format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>vlmatch explain</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}} img{{max-width:384px;image-rendering:pixelated;border:1px solid #ccc}}\
         .caption{{font-size:1.6em;margin:1em 0}} .caption span{{padding:0 .15em;border-radius:.2em}} td{{padding:0 1em}}</style></head>\n\
         <body>\n<img src=\"data:{mime};base64,{}\" alt=\"{}\">\n<div class=\"caption\">{words}</div>\n\
         <p>ITM match probability: {:.3}. Red: the VL-RTD discriminator's probability that a word does not match the image{}.</p>\n\
         <table><tr><th>word</th><th>p(mismatch)</th></tr>{rows}</table>\n</body></html>\n",
        base64(&bytes),
        escape(&image.display().to_string()),
        e.itm,
        e.most_suspicious
            .as_ref()
            .map(|w| format!(" (highest: <b>{}</b>)", escape(w)))
            .unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
