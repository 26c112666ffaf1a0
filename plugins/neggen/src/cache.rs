//! The `neggen_cache` sampler: negatives written by `vlmatch neggen`.

use serde::Deserialize;
use std::collections::HashMap;
use std::rc::Rc;
use vlmatch_core::{
    random, readback, Error, NegativeSampler, Negatives, Result, SamplerInput, TextCodec,
};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(negative_sampler "neggen_cache" => build_cache);

/// `[samplers.<name>]` for `plugin = "neggen_cache"`: negatives written by
/// `vlmatch neggen` (JSON lines with at least `caption` and `negative`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NegGenCacheConfig {
    pub path: std::path::PathBuf,
}

/// NegGen negatives read from a cache file instead of generated online.
pub struct NegGenCache {
    by_caption: HashMap<String, Vec<String>>,
    codec: Rc<dyn TextCodec>,
}

impl NegGenCache {
    pub fn load(path: &std::path::Path, codec: Rc<dyn TextCodec>) -> Result<Self> {
        let text = vlmatch_registry::check::read_utf8(path)?;
        let mut by_caption: HashMap<String, Vec<String>> = HashMap::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |m: String| Error::Data {
                path: path.to_path_buf(),
                line: Some(n + 1),
                message: m,
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("expected a string field `{k}`")))
            };
            by_caption
                .entry(field("caption")?)
                .or_default()
                .push(field("negative")?);
        }
        Ok(NegGenCache { by_caption, codec })
    }
}

impl NegativeSampler for NegGenCache {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let batch = input.forward.batch;
        let device = batch.text.ids.device();
        let u = random::uniform(&input.forward.random_keys(), 1);
        let draws = readback::to_vec::<f32>(&u)?;
        let (index, texts): (Vec<i64>, Vec<&str>) = batch
            .captions
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let negs = self.by_caption.get(c)?;
                Some((i as i64, negs[random::below(draws[i], negs.len())].as_str()))
            })
            .unzip();
        Ok(Negatives::from_texts(
            self.codec.as_ref(),
            &index,
            &texts,
            device,
        ))
    }
}

fn build_cache(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let cfg: NegGenCacheConfig = ctx.params()?;
    Ok(Box::new(NegGenCache::load(
        &cfg.path,
        ctx.env.text.clone(),
    )?))
}
