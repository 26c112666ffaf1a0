//! The non-finite guard: a step whose loss or gradient norm is NaN or
//! infinite is never applied.
//!
//! Everything is decided on the device, so the guard adds no host
//! synchronisation to a step: a non-finite loss poisons its own gradients
//! ([`Guard::gate`]), so the gradient norm (computed after the ranks'
//! gradients are averaged, hence the same on every rank) says for all ranks
//! at once whether the step is finite; [`AdamW::step_masked`] applies the
//! step or nothing; and the counters below are read back at logging steps
//! only ([`Guard::read`]), where the trainer synchronises anyway. With
//! `train.on_nonfinite = "stop"` the first non-finite step also halts every
//! later update, so the weights the run ends with are those before it; with
//! `"skip"`, updates halt after `train.max_skipped` non-finite steps in a
//! row.
//!
//! [`AdamW::step_masked`]: crate::optim::AdamW::step_masked

use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};
use vlmatch_core::Result;
use vlmatch_registry::config::{OnNonFinite, TrainConfig};

pub struct Guard {
    mode: OnNonFinite,
    max_skipped: i64,
    device: Device,
    /// bool: no update from now on.
    halted: Tensor,
    /// i64: non-finite steps in a row, ending at the latest step.
    in_a_row: Tensor,
    /// i64: the most non-finite steps in a row seen since the last read.
    most_in_a_row: Tensor,
    /// i64: non-finite steps since the last read.
    count: Tensor,
    /// i64: the first and the last non-finite step since the last read
    /// (-1: none), counted from 1 like logged steps.
    first: Tensor,
    last: Tensor,
    /// The losses and the gradient norm of `first`.
    first_values: BTreeMap<String, Tensor>,
}

/// What the guard saw since its last read.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Non-finite steps (none applied).
    pub count: i64,
    /// The first and last of them (steps counted from 1).
    pub first: i64,
    pub last: i64,
    pub most_in_a_row: i64,
    /// Whether updates have halted: the run must stop.
    pub halted: bool,
    /// The losses and `grad_norm` at `first`.
    pub first_values: BTreeMap<String, f64>,
}

impl Guard {
    pub fn new(tc: &TrainConfig, device: Device) -> Guard {
        // Scalars filled on the device, not copied from the host (a copy to
        // a GPU synchronises).
        let int = |x: i64| Tensor::full([], x, (Kind::Int64, device));
        Guard {
            mode: tc.on_nonfinite,
            max_skipped: i64::from(tc.max_skipped.max(1)),
            device,
            halted: Tensor::zeros([], (Kind::Bool, device)),
            in_a_row: int(0),
            most_in_a_row: int(0),
            count: int(0),
            first: int(-1),
            last: int(-1),
            first_values: BTreeMap::new(),
        }
    }

    /// The loss to back-propagate: `total` itself where it is finite, and
    /// NaN otherwise, so that a non-finite loss makes every gradient, and
    /// after the all-reduce every rank's gradient norm, NaN (a loss can be
    /// infinite with finite gradients; this makes the norm say so).
    pub fn gate(&self, total: &Tensor) -> Tensor {
        let factor = total
            .ones_like()
            .where_scalarother(&total.detach().isfinite(), f64::NAN);
        total * factor
    }

    /// Step `step` (counted from 0) ended with this gradient norm (after
    /// the all-reduce) and these losses: whether to apply it (a bool on the
    /// device), updating the counters.
    pub fn decide(
        &mut self,
        step: i64,
        grad_norm: &Tensor,
        losses: &BTreeMap<String, Tensor>,
    ) -> Tensor {
        tch::no_grad(|| {
            let d = self.device;
            let finite = grad_norm.to_device(d).isfinite();
            let bad = finite.logical_not();
            let ok = finite.logical_and(&self.halted.logical_not());
            let bad_i = bad.to_kind(Kind::Int64);
            self.in_a_row = (&self.in_a_row + 1).where_scalarother(&bad, 0);
            self.most_in_a_row = self.most_in_a_row.maximum(&self.in_a_row);
            self.count = &self.count + &bad_i;
            let is_first = bad.logical_and(&self.first.lt(0));
            let here = Tensor::full([], step + 1, (Kind::Int64, d));
            self.first = here.where_self(&is_first, &self.first);
            self.last = here.where_self(&bad, &self.last);
            let norm = grad_norm.to_device(d).to_kind(Kind::Float);
            for (k, v) in losses
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .chain([("grad_norm", &norm)])
            {
                let v = v.to_device(d).to_kind(Kind::Float);
                let old = match self.first_values.remove(k) {
                    Some(old) => old,
                    None => v.zeros_like(),
                };
                self.first_values
                    .insert(k.to_string(), v.where_self(&is_first, &old));
            }
            let halt = match self.mode {
                OnNonFinite::Stop => bad,
                OnNonFinite::Skip => self.in_a_row.ge(self.max_skipped),
            };
            self.halted = self.halted.logical_or(&halt);
            ok
        })
    }

    /// Read the counters back (one synchronisation) and restart them; the
    /// halt and the run of non-finite steps in a row carry on.
    pub fn read(&mut self) -> Result<Report> {
        let head = Tensor::stack(
            &[
                &self.count,
                &self.first,
                &self.last,
                &self.most_in_a_row,
                &self.halted.to_kind(Kind::Int64),
            ],
            0,
        );
        let head = Vec::<i64>::try_from(head.to_device(Device::Cpu))?;
        let mut first_values = BTreeMap::new();
        if head[0] > 0 {
            for (k, v) in &self.first_values {
                first_values.insert(k.clone(), v.to_device(Device::Cpu).double_value(&[]));
            }
        }
        let report = Report {
            count: head[0],
            first: head[1],
            last: head[2],
            most_in_a_row: head[3],
            halted: head[4] != 0,
            first_values,
        };
        let d = self.device;
        let int = |x: i64| Tensor::full([], x, (Kind::Int64, d));
        self.count = int(0);
        self.first = int(-1);
        self.last = int(-1);
        self.most_in_a_row = self.in_a_row.copy();
        Ok(report)
    }

    pub fn mode(&self) -> OnNonFinite {
        self.mode
    }

    pub fn max_skipped(&self) -> i64 {
        self.max_skipped
    }
}

/// What the trainer does with a [`Report`] read after step `step`: a
/// non-finite step stops the run (`stop`), or is dropped with a warning
/// until too many come in a row (`skip`). The error names the step, its
/// losses and gradient norm, and the last good checkpoint.
pub fn act(
    report: &Report,
    guard: &Guard,
    step: i64,
    last_good: Option<&std::path::Path>,
) -> Result<()> {
    if report.count == 0 && !report.halted {
        return Ok(());
    }
    let checkpoint = match last_good {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written before it".to_string(),
    };
    let hint = "lower train.lr, raise train.warmup_steps or set train.grad_clip";
    match guard.mode() {
        OnNonFinite::Stop => Err(vlmatch_core::Error::NonFinite(format!(
            "step {} is not finite ({}); it was not applied and training stopped{}; {checkpoint}; \
             {hint}, or set train.on_nonfinite = \"skip\" to drop such steps",
            report.first,
            report.values_line(),
            seen_at(report.first, step)
        ))),
        OnNonFinite::Skip if report.halted => Err(vlmatch_core::Error::NonFinite(format!(
            "{} non-finite steps in a row (train.max_skipped = {}); none was applied, the last \
             was step {}, and training stopped{}; the first since the last log was step {} \
             ({}); {checkpoint}; {hint}",
            report.most_in_a_row,
            guard.max_skipped(),
            report.last,
            seen_at(report.last, step),
            report.first,
            report.values_line()
        ))),
        OnNonFinite::Skip => {
            tracing::warn!(
                "skipped {} non-finite step{} ({}{}; first: {})",
                report.count,
                if report.count == 1 { "" } else { "s" },
                report.first,
                if report.last != report.first {
                    format!("-{}", report.last)
                } else {
                    String::new()
                },
                report.values_line()
            );
            Ok(())
        }
    }
}

/// ` (seen at step N)` when the guard was read after the step it reports.
fn seen_at(bad: i64, read: i64) -> String {
    if bad == read {
        String::new()
    } else {
        format!(" (seen at step {read})")
    }
}

impl Report {
    /// `loss = nan, itc = 0.4173, ..., grad_norm = nan`: the total first.
    pub fn values_line(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let fmt = |k: &str, v: f64| format!("{k} = {v:.4}");
        if let Some(&v) = self.first_values.get("loss") {
            parts.push(fmt("loss", v));
        }
        for (k, &v) in &self.first_values {
            if k != "loss" && k != "grad_norm" {
                parts.push(fmt(k, v));
            }
        }
        if let Some(&v) = self.first_values.get("grad_norm") {
            parts.push(fmt("grad_norm", v));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: OnNonFinite, max_skipped: u32) -> TrainConfig {
        let mut tc: TrainConfig = serde_json::from_value(serde_json::json!({
            "steps": 10, "batch_size": 2, "lr": 1e-3, "seed": 1
        }))
        .unwrap();
        tc.on_nonfinite = mode;
        tc.max_skipped = max_skipped;
        tc
    }

    fn losses(x: f32) -> BTreeMap<String, Tensor> {
        BTreeMap::from([("loss".to_string(), Tensor::from(x))])
    }

    #[test]
    fn stop_halts_at_the_first_nonfinite_step_and_keeps_its_values() {
        let mut g = Guard::new(&config(OnNonFinite::Stop, 5), Device::Cpu);
        let ok = |t: Tensor| bool::try_from(t).unwrap();
        assert!(ok(g.decide(0, &Tensor::from(1.5f32), &losses(0.7))));
        assert!(!ok(g.decide(
            1,
            &Tensor::from(f32::NAN),
            &losses(f32::INFINITY)
        )));
        // Finite again, but the run has halted: nothing more is applied.
        assert!(!ok(g.decide(2, &Tensor::from(1.0f32), &losses(0.6))));
        let r = g.read().unwrap();
        assert_eq!((r.count, r.first, r.last, r.halted), (1, 2, 2, true));
        assert_eq!(r.first_values["loss"], f64::INFINITY);
        assert!(r.first_values["grad_norm"].is_nan());
        assert!(
            r.values_line().starts_with("loss = inf"),
            "{}",
            r.values_line()
        );
    }

    #[test]
    fn skip_goes_on_until_too_many_in_a_row() {
        let mut g = Guard::new(&config(OnNonFinite::Skip, 2), Device::Cpu);
        let ok = |t: Tensor| bool::try_from(t).unwrap();
        let nan = Tensor::from(f32::NAN);
        let one = Tensor::from(1.0f32);
        assert!(!ok(g.decide(0, &nan, &losses(f32::NAN))));
        assert!(ok(g.decide(1, &one, &losses(0.5))));
        let r = g.read().unwrap();
        assert_eq!(
            (r.count, r.first, r.most_in_a_row, r.halted),
            (1, 1, 1, false)
        );
        assert!(!ok(g.decide(2, &nan, &losses(f32::NAN))));
        assert!(!ok(g.decide(3, &nan, &losses(f32::NAN))));
        assert!(
            !ok(g.decide(4, &one, &losses(0.5))),
            "halted after 2 in a row"
        );
        let r = g.read().unwrap();
        assert_eq!((r.count, r.first, r.last, r.most_in_a_row), (2, 3, 4, 2));
        assert!(r.halted);
    }

    #[test]
    fn the_gate_makes_a_nonfinite_loss_poison_every_gradient() {
        let g = Guard::new(&config(OnNonFinite::Stop, 5), Device::Cpu);
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        // An infinite loss whose own gradient would be finite.
        let loss = w.sum(Kind::Float) + Tensor::from(f32::INFINITY);
        g.gate(&loss).backward();
        assert!(bool::try_from(w.grad().isnan().all()).unwrap());
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        g.gate(&(&w * 3.0).sum(Kind::Float)).backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [3.0, 3.0]);
    }
}
