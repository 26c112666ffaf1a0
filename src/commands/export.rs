//! `vlmatch export`: a trained run's encoders in the HuggingFace layout.

use std::path::Path;
use vlmatch_core::Result;

/// `vlmatch export` of a trained run's newest checkpoint.
pub fn export_run(run_dir: &Path, out: &Path, sets: &[String]) -> Result<crate::export::Exported> {
    let r = crate::run::load_run(run_dir, sets)?;
    let mut e = crate::export::export(&r.loaded, &r.tok, &r.asm.vs, out)?;
    e.checkpoint = Some((r.checkpoint, r.state.step));
    Ok(e)
}

/// [`export_run`], printing where each encoder went and what was skipped.
pub fn export_cmd(run_dir: &Path, out: &Path, sets: &[String]) -> Result<()> {
    let e = export_run(run_dir, out, sets)?;
    if let Some((path, step)) = &e.checkpoint {
        println!("from checkpoint: {} (step {step})", path.display());
    }
    for (role, dir) in [("image", &e.image), ("text", &e.text)] {
        if let Some(d) = dir {
            println!("{role} encoder: {}", d.display());
        }
    }
    for s in &e.skipped {
        println!("not exported: {s}");
    }
    Ok(())
}
