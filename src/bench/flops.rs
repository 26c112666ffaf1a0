//! FLOPs of one training step, per module, counted by
//! [`vlmatch_core::flops`] from the shapes of what runs: once as vlmatch
//! executes the step, once on the plain path (every ITM pair fused in full
//! with its own copy of the image, as ALBEF and the PyTorch reference compute
//! it), the model's nominal FLOPs that MFU is conventionally computed from.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use vlmatch_core::flops::{self, Flops};
use vlmatch_core::Result;

/// Run `step` once counted as executed and once on the plain path, each
/// from libtorch's generator seeded with `seed` (the same draws, so the
/// same negatives and lengths), and return `{"executed": .., "nominal": ..}`, each with per-module counts and
/// totals (`total`, and `matmul`, which leaves attention out as PyTorch's
/// counter does on CPUs).
pub fn count(seed: i64, mut step: impl FnMut() -> Result<()>) -> Result<Value> {
    let mut once = |plain: bool| -> Result<BTreeMap<String, Flops>> {
        tch::manual_seed(seed);
        flops::set_plain(plain);
        flops::enable(true);
        let _ = flops::take();
        let outcome = step();
        flops::enable(false);
        flops::set_plain(false);
        outcome?;
        Ok(flops::take())
    };
    let executed = once(false)?;
    let nominal = once(true)?;
    Ok(json!({
        "executed": summary(&executed),
        "nominal": summary(&nominal),
    }))
}

fn summary(modules: &BTreeMap<String, Flops>) -> Value {
    let mut per = Map::new();
    for (name, f) in modules {
        per.insert(
            name.clone(),
            json!({
                "total": f.total(),
                "matmul_forward": f.matmul_forward,
                "matmul_backward": f.matmul_backward,
                "attention_forward": f.attention_forward,
                "attention_backward": f.attention_backward,
            }),
        );
    }
    let all = flops::sum(modules.values());
    json!({"modules": per, "total": all.total(), "matmul": all.matmul()})
}

/// The table's FLOP lines: per module executed / nominal GFLOP, totals,
/// and the step's model TFLOP/s (nominal FLOPs over its time).
pub fn lines(r: &Value) -> String {
    let Some(f) = r.get("flops") else {
        return String::new();
    };
    let g = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / 1e9;
    let mut s = format!(
        "{:<34} {:>12} {:>12} {:>22}\n",
        "FLOPs per step (GFLOP)", "executed", "nominal", "executed / nominal"
    );
    let empty = Map::new();
    let nominal = f["nominal"]["modules"].as_object().unwrap_or(&empty);
    for (name, n) in nominal {
        let e = &f["executed"]["modules"][name.as_str()]["total"];
        let (e, n) = (g(e), g(&n["total"]));
        s += &format!(
            "{:<34} {:>12.3} {:>12.3} {:>21.2}x\n",
            format!("  {name}"),
            e,
            n,
            e / n
        );
    }
    let (e, n) = (g(&f["executed"]["total"]), g(&f["nominal"]["total"]));
    s += &format!(
        "{:<34} {:>12.3} {:>12.3} {:>21.2}x\n",
        "  all modules",
        e,
        n,
        e / n
    );
    let (e, n) = (g(&f["executed"]["matmul"]), g(&f["nominal"]["matmul"]));
    s += &format!(
        "{:<34} {:>12.3} {:>12.3}   (PyTorch's CPU counter's convention)\n",
        "  without attention", e, n
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_list_every_module_with_its_ratio() {
        let r = json!({"flops": {
            "executed": {"modules": {"fusion": {"total": 1e9}, "itc": {"total": 2e9}},
                         "total": 3e9, "matmul": 2.5e9},
            "nominal": {"modules": {"fusion": {"total": 4e9}, "itc": {"total": 2e9}},
                        "total": 6e9, "matmul": 5e9},
        }});
        let t = lines(&r);
        assert!(t.contains("fusion") && t.contains("0.25x"), "{t}");
        assert!(t.contains("itc") && t.contains("1.00x"), "{t}");
        assert!(t.contains("all modules") && t.contains("0.50x"), "{t}");
        assert_eq!(lines(&json!({})), "");
    }
}
