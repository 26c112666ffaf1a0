//! The classification tasks (SNLI-VE, NLVR2), their items and splits: what
//! the data formats, the built-in statements and the fine-tuning loop share.

use super::builtin;
use crate::data::Dataset;
use std::sync::Arc;

/// A downstream classification task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    SnliVe,
    Nlvr2,
}

impl Task {
    /// `snli-ve` or `nlvr2` (as `--task` names them).
    pub fn parse(name: &str) -> Option<Task> {
        match name {
            "snli-ve" => Some(Task::SnliVe),
            "nlvr2" => Some(Task::Nlvr2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::SnliVe => "snli-ve",
            Task::Nlvr2 => "nlvr2",
        }
    }

    /// Class names, by class index (ALBEF's numbering).
    pub fn classes(self) -> &'static [&'static str] {
        match self {
            Task::SnliVe => &builtin::SNLI_VE_CLASSES,
            Task::Nlvr2 => &["False", "True"],
        }
    }

    /// Images per item.
    pub fn images(self) -> usize {
        match self {
            Task::SnliVe => 1,
            Task::Nlvr2 => 2,
        }
    }

    /// What the task's data calls its validation split.
    pub fn val_name(self) -> &'static str {
        match self {
            Task::SnliVe => "val",
            Task::Nlvr2 => "dev",
        }
    }

    /// The `--set`s the task adds to the run's config.
    pub(crate) fn sets(self, sets: &[String]) -> Vec<String> {
        let mut out = sets.to_vec();
        if self == Task::Nlvr2 {
            out.push("model.fusion.images=2".into());
        }
        out
    }
}

/// Items of a task: item `i` is the sentence of pairs `i * per_item ..
/// (i + 1) * per_item` of `ds` with their images (left, right for NLVR2).
pub struct Items {
    pub ds: Arc<Dataset>,
    pub per_item: usize,
    /// Class index of each item.
    pub labels: Vec<i64>,
    /// The kind of statement, where known (built-in data).
    pub kinds: Vec<Option<String>>,
}

impl Items {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pair indices of `items`, in order.
    pub(crate) fn pairs_of(&self, items: &[usize]) -> Vec<usize> {
        let k = self.per_item;
        items.iter().flat_map(|&i| i * k..(i + 1) * k).collect()
    }

    /// The item each slot of a batch built from [`Items::pairs_of`] holds:
    /// `None` where `data.on_error = "skip"` replaced one of its images
    /// with another pair's, which breaks a two-image item.
    pub(crate) fn slot_items(&self, pairs: &[usize]) -> Vec<Option<usize>> {
        let k = self.per_item;
        pairs
            .chunks(k)
            .map(|slot| {
                let first = slot[0];
                (first % k == 0 && slot.iter().enumerate().all(|(r, &p)| p == first + r))
                    .then_some(first / k)
            })
            .collect()
    }
}

/// Which part of the built-in data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    /// `train`, `val`/`dev`, `test`.
    pub fn parse(name: &str) -> Option<Split> {
        match name {
            "train" => Some(Split::Train),
            "val" | "dev" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}
