//! Experiment tracking beside `metrics.jsonl` and `eval.jsonl`: TensorBoard
//! event files (`tensorboard.rs`), the progress display (`progress.rs`),
//! and the one naming scheme for scalars that `vlmatch plot` and the
//! TensorBoard tags share (`flatten`).
//!
//! Keys: a `metrics.jsonl` field keeps its name (`loss`, `itm_acc`, `lr`);
//! a nested `eval.jsonl` value is named by its path joined with dots
//! (`matching.itm_acc`, `retrieval.i2t_r1`). TensorBoard tags put the
//! group in front: `train/loss`, `heldout/matching.itm_acc`.

pub mod progress;
pub mod tensorboard;

use serde_json::Value;

/// Every numeric leaf of a JSON object, with dotted keys, in key order;
/// `null` (a non-finite value `metrics.jsonl` could not hold) is NaN.
/// `step` is the x axis, not a scalar, and is left out.
pub fn flatten(value: &Value) -> Vec<(String, f64)> {
    fn walk(prefix: &str, value: &Value, out: &mut Vec<(String, f64)>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            Value::Number(n) => out.push((prefix.to_string(), n.as_f64().unwrap_or(f64::NAN))),
            Value::Null => out.push((prefix.to_string(), f64::NAN)),
            // Strings, booleans and lists are not scalars to draw.
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out.retain(|(k, _)| k != "step");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flatten_names_nested_values_with_dots() {
        let v = json!({"step": 200, "loss": 1.5, "bad": null, "note": "x",
                       "matching": {"itm_acc": 0.5, "pairs": 600}});
        let got = flatten(&v);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].0, "bad");
        assert!(got[0].1.is_nan());
        assert_eq!(
            &got[1..],
            &[
                ("loss".to_string(), 1.5),
                ("matching.itm_acc".to_string(), 0.5),
                ("matching.pairs".to_string(), 600.0),
            ]
        );
    }
}
