//! `vlmatch preview`: a split's images and captions as files.

use std::path::Path;
use vlmatch_core::{Error, Result};
use vlmatch_registry::ConfigLayers;

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
            let line = serde_json::json!({
                "pair": k,
                "image": file_name(i),
                "image_index": i,
                "image_id": ds.image_ids[i],
                "caption": caption,
                "ids": tok.encode(caption, max_len),
            });
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
        for (image, caption, negative) in cases.iter().filter(|c| c.0 < n) {
            let line = serde_json::json!({
                "image": file_name(*image),
                "image_index": image,
                "caption": caption,
                "negative": negative,
                "caption_ids": tok.encode(caption, max_len),
                "negative_ids": tok.encode(negative, max_len),
            });
            triples.push_str(&format!("{line}\n"));
        }
        n_matching = Some(cases.iter().filter(|c| c.0 < n).count());
        files.push(("matching.jsonl", triples));
    }
    let sp = tok.special;
    let meta = serde_json::json!({
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
