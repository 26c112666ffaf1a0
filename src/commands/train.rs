//! `vlmatch train`: train, then print the loss and the held-out summary.

use crate::train::{train_launched, TrainOptions};
use std::path::PathBuf;
use vlmatch_core::{Error, Result};
use vlmatch_registry::ConfigLayers;

/// Train with `layers` (on `resume`, the run's saved config replaces
/// `layers.base`); rank 0 prints the first and last loss, the held-out
/// results and the run directory.
pub fn train(
    mut layers: ConfigLayers,
    (run_dir, resume, force): (Option<PathBuf>, Option<PathBuf>, bool),
    quiet: bool,
    fault: Option<crate::fault::Fault>,
) -> Result<()> {
    if resume.is_some() {
        // The run's own saved config replaces the preset.
        layers.base = None;
    }
    let launch = vlmatch_dist::LaunchEnv::from_env()
        .map_err(|e| Error::Config(format!("launcher environment: {e}")))?;
    let rank = launch
        .as_ref()
        .filter(|l| l.world_size > 1)
        .map_or(0, |l| l.rank);
    let summary = train_launched(
        TrainOptions {
            layers,
            run_dir,
            resume,
            halt_after: None,
            progress: !quiet,
            force,
        },
        launch,
        fault,
    )?;
    if rank > 0 {
        // Rank 0 reports the run.
        return Ok(());
    }
    let first = summary
        .logged
        .first()
        .and_then(|m| m.get("loss"))
        .and_then(|v| v.as_f64());
    let last = summary
        .logged
        .last()
        .and_then(|m| m.get("loss"))
        .and_then(|v| v.as_f64());
    if let (Some(a), Some(b)) = (first, last) {
        println!(
            "loss {a:.4} -> {b:.4} over steps {}..{}",
            summary.start_step, summary.last_step
        );
    }
    if let Some(e) = &summary.eval {
        let r = &e.retrieval;
        println!(
            "held-out ITC retrieval ({} images, {} captions): image->text R@1 {:.1}% R@5 {:.1}% | \
             text->image R@1 {:.1}% R@5 {:.1}% (chance R@1 {:.1}%)",
            r.images,
            r.captions,
            100.0 * r.i2t_r1,
            100.0 * r.i2t_r5,
            100.0 * r.t2i_r1,
            100.0 * r.t2i_r5,
            100.0 * r.t2i_chance
        );
        let m = &e.matching;
        println!(
            "held-out fine-grained matching, caption vs negative ({} pairs): ITM {:.1}% | ITC {:.1}% (chance 50%)",
            m.pairs,
            100.0 * m.itm_acc,
            100.0 * m.itc_acc
        );
        let kinds: Vec<String> = e
            .matching_by_kind
            .iter()
            .map(|(k, m)| format!("{k} {:.1}% ({})", 100.0 * m.itm_acc, m.pairs))
            .collect();
        if !kinds.is_empty() {
            println!("  ITM by kind: {}", kinds.join(" | "));
        }
    }
    println!("run directory: {}", summary.run_dir.display());
    Ok(())
}
