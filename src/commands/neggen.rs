//! `vlmatch neggen`: NegGen negatives for a whole annotation file.

use std::path::Path;
use vlmatch_core::{Error, Result};

/// `vlmatch neggen`: NegGen over a whole annotation file, written as JSON
/// lines `{image, image_id, caption, negative, masked_words, itm_score}`
/// (atomically); returns the summary line.
pub fn neggen_offline(
    run_dir: &Path,
    data: &Path,
    image_root: Option<&Path>,
    out: &Path,
    sets: &[String],
    progress: bool,
) -> Result<String> {
    // NegGen's keys: the run's `[samplers.neggen]`, else its defaults.
    let sets =
        crate::samplers::sets_with_section(&crate::run::run_config(run_dir, sets)?, "neggen", sets);
    let crate::run::LoadedRun {
        loaded, tok, asm, ..
    } = crate::run::load_run(run_dir, &sets)?;
    let c = &loaded.config;
    tch::manual_seed(c.train.seed as i64);
    let env = crate::setup::model_env(&loaded, &tok, asm.model.device)?;
    let sampler = crate::samplers::run_sampler(&loaded, &env, &asm.model, "neggen")?;
    let ds = crate::data::load_any_within(&data.display().to_string(), image_root, None, &c.data)?;
    let mut loader_cfg = crate::data::loader::LoaderConfig::new(&c.data, c.eval.batch_size, None);
    loader_cfg.preps = crate::data::loader::CaptionPreps::new(sampler.caption_prep());
    let all: Vec<usize> = (0..ds.len()).collect();
    let bar = if progress {
        indicatif::ProgressBar::new(ds.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = std::time::Instant::now();
    let mut lines = String::new();
    let mut written = 0usize;
    // Captions seen, with no candidate (no noun/adjective to replace), and
    // whose every candidate the filters dropped.
    let (mut captions, mut no_candidate, mut dropped) = (0usize, 0usize, 0usize);
    for (b, batch) in crate::data::loader::batches(&ds, &tok, &loader_cfg, &all).enumerate() {
        let batch = batch?.to_device(asm.model.device);
        let fwd = vlmatch_core::Forward::new(&asm.model, &batch, false);
        let cands = sampler.candidates(&fwd, i64::MAX).ok_or_else(|| {
            Error::Config(
                "config key `samplers.neggen.plugin`: this sampler lists no candidates to write"
                    .into(),
            )
        })??;
        let owners: std::collections::BTreeSet<usize> = cands.iter().map(|c| c.owner).collect();
        let kept: std::collections::BTreeSet<usize> =
            cands.iter().filter(|c| c.kept).map(|c| c.owner).collect();
        captions += batch.len() as usize;
        no_candidate += batch.len() as usize - owners.len();
        dropped += owners.len() - kept.len();
        for cand in cands.into_iter().filter(|c| c.kept) {
            let pair = &ds.pairs[all[b * loader_cfg.batch_size + cand.owner]];
            let image = match &ds.images[pair.image] {
                crate::data::ImageRef::File { path, .. } => path.display().to_string(),
                crate::data::ImageRef::Scene(_) => format!("scene:{}", ds.image_ids[pair.image]),
            };
            let line = serde_json::json!({
                "image": image,
                "image_id": ds.image_ids[pair.image],
                "caption": pair.caption,
                "negative": cand.text,
                "masked_words": cand.masked.iter().map(|m| serde_json::json!({
                    "index": m.index,
                    "original": m.original,
                    "replacement": m.replacement,
                    "tag": m.tag,
                })).collect::<Vec<_>>(),
                "itm_score": cand.itm,
            });
            lines.push_str(&format!("{line}\n"));
            written += 1;
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    crate::durable::write(out, lines)?;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "neggen: {} captions, {written} negatives written to {}, {} dropped by the filter, {} without a noun/adjective, {:.1} negatives/s",
        captions,
        out.display(),
        dropped,
        no_candidate,
        written as f64 / secs.max(1e-9)
    ))
}
