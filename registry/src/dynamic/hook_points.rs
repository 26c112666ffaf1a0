//! What crosses the boundary for a hook in a library: the request `create`
//! reads, and one [`Point`] per call of its vtable's `call`, with the
//! tensors each point lends and what it answers. Scalars cross as JSON
//! numbers, a non-finite one as `null` (read back as NaN).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vlmatch_core::RunEnd;

/// What a hook's `create` gets.
#[derive(Serialize, Deserialize)]
pub struct HookRequest {
    /// The hook's registered name (its section is `hooks.<name>`).
    pub name: String,
    /// The run's merged configuration.
    pub config: Value,
    pub rank: usize,
    pub world: usize,
    pub epoch_steps: Option<i64>,
    pub run_dir: String,
    /// The run's device (`cpu`, `cuda:N`, `mps`).
    pub device: String,
    /// The model's encoders (`dynamic::view::ModelFacts`), for the proxy
    /// model `after_objectives` sees; `None` outside a training run.
    pub model: Option<Value>,
}

/// What `create` answers besides the state.
#[derive(Serialize, Deserialize)]
pub struct HookInfo {
    pub priority: i32,
}

/// A scalar as it crosses: `None` for a non-finite value.
pub type Scalars = Vec<(String, Option<f64>)>;

/// `line` with each non-finite value as `None`.
pub fn scalars_out(line: &[(String, f64)]) -> Scalars {
    line.iter()
        .map(|(k, v)| (k.clone(), v.is_finite().then_some(*v)))
        .collect()
}

/// The inverse of [`scalars_out`] (`None` as NaN).
pub fn scalars_in(line: Scalars) -> Vec<(String, f64)> {
    line.into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect()
}

/// One point of a hook's run (`vlmatch_core::Hook`'s methods).
#[derive(Serialize, Deserialize)]
#[serde(tag = "point", rename_all = "snake_case")]
pub enum Point {
    /// Answer: `{"tensors": [names], "counters": [[name, value]]}`, the
    /// tensors (live handles the host copies into and out of) in order.
    State,
    SetCounters {
        counters: Vec<(String, i64)>,
    },
    OnStart {
        step: i64,
        total_steps: i64,
        resumed: bool,
    },
    BeforeStep {
        step: i64,
    },
    /// Lends the loss; answer: one tensor, the loss to back-propagate.
    BeforeBackward {
        step: i64,
    },
    /// Lends `applied`, the guard's device bool.
    AfterOptimizerStep,
    /// Answer: the line, as the hook left it.
    OnLog {
        step: i64,
        line: Scalars,
    },
    OnRecord {
        step: i64,
        group: String,
        scalars: Scalars,
    },
    OnCheckpoint {
        step: i64,
        path: String,
    },
    OnStepEnd {
        step: i64,
    },
    /// `how`: `finished`, `stopped` or `halted`.
    OnEnd {
        how: String,
        step: i64,
    },
}

/// `on_end`'s point for `end`.
pub fn end_out(end: RunEnd) -> Point {
    let (how, step) = match end {
        RunEnd::Finished { step } => ("finished", step),
        RunEnd::Stopped { step } => ("stopped", step),
        RunEnd::Halted { step } => ("halted", step),
    };
    Point::OnEnd {
        how: how.into(),
        step,
    }
}

/// The inverse of [`end_out`], from `OnEnd`'s fields.
pub fn end_in(how: &str, step: i64) -> Result<RunEnd, String> {
    match how {
        "finished" => Ok(RunEnd::Finished { step }),
        "stopped" => Ok(RunEnd::Stopped { step }),
        "halted" => Ok(RunEnd::Halted { step }),
        other => Err(format!("unknown end `{other}`")),
    }
}

impl Point {
    /// The point's name as it crosses (its JSON's `point`: `on_start`,
    /// `before_backward`, ...), for messages.
    pub fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v["point"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_and_a_point_name_cross_and_come_back() {
        for end in [
            RunEnd::Finished { step: 7 },
            RunEnd::Stopped { step: 0 },
            RunEnd::Halted { step: -1 },
        ] {
            let point = end_out(end);
            assert_eq!(point.name(), "on_end");
            // Through JSON, as it crosses.
            let wire: Point =
                serde_json::from_str(&serde_json::to_string(&point).unwrap()).unwrap();
            let Point::OnEnd { how, step } = wire else {
                panic!("not on_end")
            };
            assert_eq!(end_in(&how, step), Ok(end));
        }
        assert_eq!(end_in("crashed", 3), Err("unknown end `crashed`".into()));
        assert_eq!(Point::BeforeBackward { step: 1 }.name(), "before_backward");
        assert_eq!(Point::AfterOptimizerStep.name(), "after_optimizer_step");
    }
}
