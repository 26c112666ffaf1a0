//! `vlmatch explain`: where a caption disagrees with an image.

use std::path::Path;
use vlmatch_core::{Error, Result};

/// `vlmatch explain` on a trained run.
pub fn explain_cmd(
    run_dir: &Path,
    image: &Path,
    text: &str,
    sets: &[String],
) -> Result<crate::explain::Explanation> {
    let crate::run::LoadedRun {
        loaded, tok, asm, ..
    } = crate::run::load_run(run_dir, sets)?;
    let d = &loaded.config.data;
    let pixels = crate::explain::image_tensor(image, d.image_size as usize, d.mean, d.std)?;
    crate::explain::explain(&asm.model, &tok, d.max_len as usize, &pixels, text)
}

/// [`explain_cmd`], printing the table, the JSON object and, with `html`,
/// writing the page.
pub fn explain_print(
    run_dir: &Path,
    image: &Path,
    text: &str,
    html: Option<&Path>,
    sets: &[String],
) -> Result<()> {
    let e = explain_cmd(run_dir, image, text, sets)?;
    print!("{}", crate::explain::render_text(&e));
    if let Some(path) = html {
        let page = crate::explain::render_html(&e, image)?;
        std::fs::write(path, page).map_err(|err| Error::io(path, err))?;
        println!("wrote {}", path.display());
    }
    println!("{}", serde_json::to_string(&e).expect("json"));
    Ok(())
}
