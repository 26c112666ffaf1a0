//! `vlmatch preview`: a split's images and captions as files.

use std::path::Path;
use std::sync::Arc;
use vlmatch_core::{CaptionPrep, Error, Result};
use vlmatch_registry::{ConfigLayers, LoadedConfig};

/// `vlmatch preview`: the first `count` images (all with `None`) of a split,
/// at the configured resolution (before normalisation), with their captions,
/// token ids and, for the held-out split, the matching triples.
pub fn preview(layers: ConfigLayers, split: &str, count: Option<usize>, out: &Path) -> Result<()> {
    let loaded = layers.load()?;
    let (train, heldout) = crate::setup::datasets(&loaded)?;
    let ds = match split {
        "train" => train,
        "heldout" => heldout.ok_or_else(|| {
            Error::Config(
                "--split heldout: the config has no held-out set (built-in data, or \
                 data.heldout_annotations)"
                    .into(),
            )
        })?,
        other => {
            return Err(Error::Config(format!(
                "--split `{other}`: expected `train` or `heldout`"
            )))
        }
    };
    let tok = crate::setup::tokenizer(&loaded)?;
    let preps = tag_preps(&loaded)?;
    let data = &loaded.config.data;
    let size = data.image_size as usize;
    let max_len = data.max_len as usize;
    let n = count.unwrap_or(ds.images.len()).min(ds.images.len());
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let file_name = |i: usize| format!("{i:04}.png");
    let mut of_image: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, p) in ds.pairs.iter().enumerate() {
        if p.image < n {
            of_image[p.image].push(k);
        }
    }
    let (mut lines, mut ann, mut pairs) = (String::new(), String::new(), String::new());
    let mut n_pairs = 0usize;
    for (i, ks) in of_image.iter().enumerate() {
        let rgb = ds.load_rgb(i, size)?;
        let file = out.join(file_name(i));
        image::RgbImage::from_raw(size as u32, size as u32, rgb)
            .expect("buffer matches the size")
            .save(&file)
            .map_err(|e| Error::Data {
                path: file.clone(),
                line: None,
                message: format!("cannot write PNG: {e}"),
            })?;
        let captions: Vec<&str> = ks.iter().map(|&k| ds.pairs[k].caption.as_str()).collect();
        for c in &captions {
            lines.push_str(&format!("{}\t{c}\n", file_name(i)));
        }
        let entry = serde_json::json!({
            "image": file_name(i),
            "caption": captions,
            "image_id": ds.image_ids[i],
        });
        ann.push_str(&format!("{entry}\n"));
        for &k in ks {
            let caption = &ds.pairs[k].caption;
            let mut line = serde_json::json!({
                "pair": k,
                "image": file_name(i),
                "image_index": i,
                "image_id": ds.image_ids[i],
                "caption": caption,
                "ids": tok.encode(caption, max_len),
            });
            if !preps.is_empty() {
                line["caption_preps"] = tagged(&preps, caption).into();
            }
            pairs.push_str(&format!("{line}\n"));
            n_pairs += 1;
        }
    }
    let mut files = vec![
        ("captions.txt", lines),
        ("annotations.jsonl", ann),
        ("pairs.jsonl", pairs),
    ];
    let vocab: String = (0..tok.vocab_size())
        .map(|i| format!("{}\n", tok.token(i)))
        .collect();
    files.push(("vocab.txt", vocab));
    let mut n_matching = None;
    if split == "heldout" {
        let mut triples = String::new();
        let cases = crate::eval::matching_cases(&ds)?;
        for c in cases.cases.iter().filter(|c| c.image < n) {
            let mut line = serde_json::json!({
                "image": file_name(c.image),
                "image_index": c.image,
                "caption": c.caption,
                "negative": c.negative,
                "caption_ids": tok.encode(&c.caption, max_len),
                "negative_ids": tok.encode(&c.negative, max_len),
            });
            if let Some(kind) = c.kind {
                line["kind"] = serde_json::json!(kind.as_str());
            }
            triples.push_str(&format!("{line}\n"));
        }
        n_matching = Some(cases.cases.iter().filter(|c| c.image < n).count());
        files.push(("matching.jsonl", triples));
    }
    let sp = tok.special;
    let mut meta = serde_json::json!({
        "split": split,
        "dataset": ds.name,
        "images": n,
        "all_images": n == ds.images.len(),
        "pairs": n_pairs,
        "matching_triples": n_matching,
        "image_size": size,
        "max_len": max_len,
        "mean": data.mean,
        "std": data.std,
        "lowercase": data.lowercase,
        "tokenizer": tok.origin(),
        "vocab_size": tok.vocab_size(),
        "special": {"pad": sp.pad, "unk": sp.unk, "cls": sp.cls, "sep": sp.sep, "mask": sp.mask},
        "word_swap_default_groups": crate::samplers::word_swap_default_groups()?,
    });
    if !preps.is_empty() {
        // Each vocabulary entry prepared after a determiner, as `a ENTRY`
        // (alone, a word would be tagged as a sentence's first word).
        meta["caption_preps_after_a"] = (0..tok.vocab_size())
            .map(|i| {
                let t = tok.token(i);
                (t.to_string(), tagged(&preps, &format!("a {t}")).into())
            })
            .collect::<serde_json::Map<String, serde_json::Value>>()
            .into();
    }
    files.push((
        "meta.json",
        serde_json::to_string_pretty(&meta).expect("serialisable"),
    ));
    for (name, text) in files {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    println!(
        "wrote {n} images and {n_pairs} pairs of {} to {}: captions.txt, annotations.jsonl \
         (ALBEF format, for eval and neggen), pairs.jsonl (token ids), vocab.txt, meta.json{}",
        ds.name,
        out.display(),
        if n_matching.is_some() {
            ", matching.jsonl"
        } else {
            ""
        }
    );
    Ok(())
}

/// The training objectives' per-caption preparations (NegGen's POS
/// tagging), built when a sampler is `neggen`, so that an outside reference
/// (bench/reference_neggen.py) masks the words NegGen masks.
fn tag_preps(loaded: &LoadedConfig) -> Result<Vec<Arc<dyn CaptionPrep>>> {
    if !loaded
        .config
        .samplers
        .values()
        .any(|s| s.plugin == "neggen")
    {
        return Ok(Vec::new());
    }
    let tok = Arc::new(crate::setup::tokenizer(loaded)?);
    let (asm, _) = crate::setup::model_on(loaded, &tok, tch::Device::Cpu)?;
    Ok(asm.caption_preps())
}

/// `caption` through each of `preps` whose result is word indices (into
/// `caption.split(' ')`) with tags, by the prep's key.
fn tagged(
    preps: &[Arc<dyn CaptionPrep>],
    caption: &str,
) -> serde_json::Map<String, serde_json::Value> {
    preps
        .iter()
        .filter_map(|p| {
            let prepared = p.prepare(caption);
            let words = prepared.downcast_ref::<Vec<(usize, String)>>()?;
            Some((p.key(), serde_json::json!(words)))
        })
        .collect()
}
