//! The host side of hooks in a library: the factory the registry's entry
//! points to, and the [`Hook`] that sends each point of the run to the
//! library ([`Point`]; `after_objectives` with the micro-batch's forward
//! cache, as an objective's). A failure at a point that cannot return one
//! (`before_step`, `after_objectives`, `before_backward`,
//! `after_optimizer_step`, `on_log`, `state`) is kept and returned by the
//! next point that can (at the latest the step's `on_step_end`), so it
//! stops the run within the step.

use super::super::hook_points::{end_out, scalars_in, scalars_out, HookInfo, HookRequest, Point};
use super::super::json_call;
use super::super::load::HookSpec;
use super::create::{destroy, device_name, failed, library_error, loaded, model_facts, Loaded};
use super::forward::{forward_table, View};
use crate::hooks::HookContext;
use crate::Kind;
use serde_json::Value;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use tch::Tensor;
use vlmatch_core::{
    Error, Forward, Hook, HookState, ObjectiveOutput, Record, Result, RunEnd, RunStart,
};

/// The factory of every hook from a library: the library's factory
/// decides, from the run's config, whether the hook is on.
pub fn build_hook(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    let Loaded::Hook(spec) = loaded(Kind::Hook, ctx.name)? else {
        unreachable!("a hook entry")
    };
    let fail = |m: &str| failed(&spec.name, &spec.library, "create", m);
    let config: Value = ctx
        .loaded
        .figment
        .extract()
        .map_err(|e| fail(&format!("the run's config as JSON: {e}")))?;
    let request = HookRequest {
        name: ctx.name.to_string(),
        config,
        rank: ctx.rank,
        world: ctx.world,
        epoch_steps: ctx.epoch_steps,
        run_dir: ctx.run_dir.display().to_string(),
        device: ctx
            .asm
            .map_or_else(|| "cpu".into(), |a| device_name(a.model.device)),
        model: ctx.asm.map(|a| model_facts(&a.model)),
    };
    let request = serde_json::to_string(&request).map_err(|e| fail(&e.to_string()))?;
    let request = CString::new(request).map_err(|e| fail(&e.to_string()))?;
    let (mut state, mut info): (*mut c_void, *mut c_char) =
        (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the library's function with its data, a valid request and
    // out-pointers.
    let error = unsafe { (spec.create)(spec.data, request.as_ptr(), &mut state, &mut info) };
    // SAFETY: error and info are strings of this library, freed here.
    let error = unsafe { library_error(error, spec.free_string) };
    let info = unsafe { library_error(info, spec.free_string) };
    if let Some(message) = error {
        return Err(fail(&message));
    }
    if state.is_null() {
        return Ok(None);
    }
    // Owned first, so that a bad info still destroys the state.
    let mut hook = HostHook {
        spec,
        state,
        priority: 0,
        pending: RefCell::new(None),
        local_negatives: ctx.loaded.config.train.dist.hard_negatives
            == crate::config::HardNegatives::Local,
    };
    let info: HookInfo = info
        .as_deref()
        .ok_or_else(|| "no info".to_string())
        .and_then(|i| serde_json::from_str(i).map_err(|e| e.to_string()))
        .map_err(|m| fail(&format!("its info: {m}")))?;
    hook.priority = info.priority;
    Ok(Some(Box::new(hook)))
}

/// A hook of a library, as the trainer runs it.
struct HostHook {
    spec: &'static HookSpec,
    state: *mut c_void,
    priority: i32,
    /// The first failure at a point that could not return it.
    pending: RefCell<Option<Error>>,
    /// In-batch negatives from each rank's own pairs
    /// (`train.dist.hard_negatives = "local"`), as the forward cache says.
    local_negatives: bool,
}

impl Drop for HostHook {
    fn drop(&mut self) {
        let s = self.spec;
        destroy(self.state, s.destroy, s.free_string, &s.name, &s.library);
    }
}

impl HostHook {
    /// Send `point` with `tensors` lent; the answer and its tensors.
    fn send(&self, point: &Point, tensors: &[&Tensor]) -> Result<(Value, Vec<Tensor>)> {
        let s = self.spec;
        let (call, state) = (s.call, self.state);
        let raw = Box::new(move |req, n, handles, sink, out| {
            // SAFETY: the library's function on its own state; everything
            // lent lives through the call.
            unsafe { call(state, req, n, handles, sink, out) }
        });
        json_call::send(raw, s.free_string, point, tensors)
            .map_err(|m| failed(&s.name, &s.library, &point.name(), &m))
    }

    /// Keep `e` for [`HostHook::pending`], unless an earlier failure is
    /// kept already (the first one is reported).
    fn keep(&self, e: Error) {
        self.pending.borrow_mut().get_or_insert(e);
    }

    /// `send` at a point that cannot return an error; its failure kept.
    fn kept(&self, point: &Point, tensors: &[&Tensor]) -> Option<(Value, Vec<Tensor>)> {
        self.send(point, tensors).map_err(|e| self.keep(e)).ok()
    }

    /// A kept failure, or `Ok`.
    fn pending(&self) -> Result<()> {
        match self.pending.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `send` at a point that returns errors: a kept one first.
    fn checked(&self, point: &Point) -> Result<()> {
        self.pending()?;
        self.send(point, &[]).map(|_| ())
    }

    fn bad_answer(&self, point: &str, what: &str) -> Error {
        failed(&self.spec.name, &self.spec.library, point, what)
    }
}

impl Hook for HostHook {
    fn priority(&self) -> i32 {
        self.priority
    }

    fn state(&self) -> HookState {
        let Some((answer, tensors)) = self.kept(&Point::State, &[]) else {
            return HookState::default();
        };
        #[derive(serde::Deserialize)]
        struct Answer {
            tensors: Vec<String>,
            counters: Vec<(String, i64)>,
        }
        match serde_json::from_value::<Answer>(answer) {
            Ok(a) if a.tensors.len() == tensors.len() => HookState {
                tensors: a.tensors.into_iter().zip(tensors).collect(),
                counters: a.counters,
            },
            _ => {
                self.keep(self.bad_answer("state", "its answer does not name each tensor once"));
                HookState::default()
            }
        }
    }

    fn set_counters(&mut self, counters: &[(String, i64)]) -> Result<()> {
        self.checked(&Point::SetCounters {
            counters: counters.to_vec(),
        })
    }

    fn on_start(&mut self, start: RunStart) -> Result<()> {
        self.checked(&Point::OnStart {
            step: start.step,
            total_steps: start.total_steps,
            resumed: start.resumed,
        })
    }

    fn before_step(&self, step: i64) {
        self.kept(&Point::BeforeStep { step }, &[]);
    }

    fn after_objectives(&self, forward: &Forward<'_>) {
        let v = View {
            forward,
            output: RefCell::new(ObjectiveOutput::default()),
        };
        let host = forward_table(&v, self.local_negatives);
        let s = self.spec;
        // SAFETY: our state; `host` and the view live through the call.
        let error = unsafe { (s.after_objectives)(self.state, &host) };
        // SAFETY: an error string of this library.
        if let Some(message) = unsafe { library_error(error, s.free_string) } {
            self.keep(failed(&s.name, &s.library, "after_objectives", &message));
        }
    }

    fn before_backward(&self, step: i64, loss: Tensor) -> Tensor {
        match self.kept(&Point::BeforeBackward { step }, &[&loss]) {
            Some((_, mut out)) if out.len() == 1 => out.remove(0),
            Some(_) => {
                self.keep(self.bad_answer("before_backward", "it did not answer one loss tensor"));
                loss
            }
            None => loss,
        }
    }

    fn after_optimizer_step(&self, applied: &Tensor) {
        self.kept(&Point::AfterOptimizerStep, &[applied]);
    }

    fn on_log(&mut self, step: i64, line: &mut Vec<(String, f64)>) {
        let point = Point::OnLog {
            step,
            line: scalars_out(line),
        };
        if let Some((answer, _)) = self.kept(&point, &[]) {
            match serde_json::from_value(answer) {
                Ok(l) => *line = scalars_in(l),
                Err(e) => self.keep(self.bad_answer("on_log", &format!("its line: {e}"))),
            }
        }
    }

    fn on_record(&mut self, record: Record<'_>) -> Result<()> {
        self.checked(&Point::OnRecord {
            step: record.step,
            group: record.group.to_string(),
            scalars: scalars_out(record.scalars),
        })
    }

    fn on_checkpoint(&mut self, step: i64, path: &Path) -> Result<()> {
        self.checked(&Point::OnCheckpoint {
            step,
            path: path.display().to_string(),
        })
    }

    fn on_step_end(&mut self, step: i64) -> Result<()> {
        self.checked(&Point::OnStepEnd { step })
    }

    fn on_end(&mut self, end: RunEnd) -> Result<()> {
        self.checked(&end_out(end))
    }
}
