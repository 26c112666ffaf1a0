//! `vlmatch finetune`: fine-tune a pretrained run on a downstream task.

use vlmatch_core::{Error, Result};

/// Fine-tune for `task` (`vqa`) and print the fine-tuned run's directory.
pub fn finetune(task: &str, opts: &crate::vqa::FinetuneOptions) -> Result<()> {
    if task != "vqa" {
        return Err(Error::Config(format!(
            "--task `{task}`: the fine-tuning task is `vqa`"
        )));
    }
    let out = crate::vqa::finetune(opts)?;
    println!("fine-tuned run: {}", out.display());
    Ok(())
}
