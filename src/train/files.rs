//! The run directory's logs, cut back to a checkpoint on resume.

use serde_json::Value;
use std::path::Path;
use vlmatch_core::Result;

/// Keep the lines of a JSON-lines log (`metrics.jsonl`, `eval.jsonl`) up
/// to `step`, dropping what a killed run logged after its last checkpoint.
pub fn truncate_metrics(path: &Path, step: i64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_i64))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::durable::write(path, kept)
}
