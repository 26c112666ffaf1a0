//! `vlmatch finetune`: fine-tune a pretrained run on a downstream task.

use crate::downstream::{self, Task};
use std::path::PathBuf;
use vlmatch_core::{Error, Result};

/// The options only the classification tasks (`snli-ve`, `nlvr2`) take.
#[derive(Debug, Default)]
pub struct Classification {
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub eval_every: Option<i64>,
    pub blank_images: bool,
}

/// Fine-tune for `task` (`vqa`, `snli-ve` or `nlvr2`) and print the
/// fine-tuned run's directory (and for `snli-ve`/`nlvr2` the report as one
/// JSON line).
pub fn finetune(task: &str, opts: &crate::vqa::FinetuneOptions, cls: Classification) -> Result<()> {
    if let Some(t) = Task::parse(task) {
        let r = downstream::finetune(&downstream::FinetuneOptions {
            task: t,
            checkpoint: opts.checkpoint.clone(),
            data: opts.data.clone(),
            val: cls.val,
            test: cls.test,
            image_root: opts.image_root.clone(),
            out: opts.out.clone(),
            steps: opts.steps,
            lr: opts.lr,
            batch_size: opts.batch_size,
            eval_every: cls.eval_every,
            blank_images: cls.blank_images,
            sets: opts.sets.clone(),
            progress: opts.progress,
            resume: opts.resume,
            fault: opts.fault,
        })?;
        println!("fine-tuned run: {}", r.out.display());
        println!("{}", serde_json::to_string(&r).expect("serialisable"));
        return Ok(());
    }
    if task != "vqa" {
        return Err(Error::Config(format!(
            "--task `{task}`: the fine-tuning tasks are `vqa`, `snli-ve` and `nlvr2`"
        )));
    }
    if cls.val.is_some() || cls.test.is_some() || cls.eval_every.is_some() || cls.blank_images {
        return Err(Error::Config(
            "--val, --test, --eval-every and --blank-images are options of `snli-ve` and \
             `nlvr2`, not `vqa`"
                .into(),
        ));
    }
    let out = crate::vqa::finetune(opts)?;
    println!("fine-tuned run: {}", out.display());
    Ok(())
}
