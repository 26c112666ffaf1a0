//! The library side of hooks: their vtables, `create` (the hook's own
//! factory on a [`HookContext`] rebuilt from the run's merged config,
//! without the model), `call` (one [`Point`] of the run) and
//! `after_objectives` (a `Forward` over the host's micro-batch whose model
//! calls back into the host, as an objective's), panics caught.

use super::super::abi::{
    destroy_boxed, error_string, static_c, status, text, ForwardHost, HookVTable, TensorHandle,
    TensorSink,
};
use super::super::hook_points::{end_in, scalars_in, scalars_out, HookInfo, HookRequest, Point};
use super::super::json_call;
use super::super::view::{proxy_model, with_forward, ModelFacts};
use crate::config::{Config, LoadedConfig};
use crate::hooks::HookContext;
use crate::registration::HookFactory;
use serde_json::{json, Value};
use std::cell::Cell;
use std::ffi::{c_char, c_void};
use std::path::Path;
use std::rc::Rc;
use tch::{nn, Tensor};
use vlmatch_core::{Hook, Record, RunStart, VlModel};

/// The vtable of hook `name`, built by `factory`.
pub(super) fn hook_vtable(name: &str, factory: HookFactory) -> HookVTable {
    HookVTable {
        name: static_c(name),
        data: Box::leak(Box::new(factory)) as *const HookFactory as *const c_void,
        create: Some(create_hook),
        call: Some(hook_call),
        after_objectives: Some(hook_after_objectives),
        destroy: Some(destroy_boxed::<GuestHook>),
    }
}

/// A hook's state: the hook, and the proxy model its `after_objectives`
/// sees (with the slot of the current forward's host table).
struct GuestHook {
    hook: Box<dyn Hook>,
    model: Option<VlModel>,
    view: Rc<Cell<*const ForwardHost>>,
    _head: nn::VarStore,
}

unsafe extern "C" fn create_hook(
    data: *const c_void,
    request: *const c_char,
    state: *mut *mut c_void,
    info_json: *mut *mut c_char,
) -> *mut c_char {
    status(|| {
        // SAFETY: `data` is the factory this vtable was made with; the
        // host's request and out-pointers.
        let factory = unsafe { *(data as *const HookFactory) };
        let request = unsafe { text(request) }.ok_or("no request")?;
        if state.is_null() || info_json.is_null() {
            return Err("no out-pointer".into());
        }
        let req: HookRequest =
            serde_json::from_str(&request).map_err(|e| format!("bad request: {e}"))?;
        let figment = figment::Figment::from(figment::providers::Serialized::defaults(req.config));
        let config: Config = figment
            .extract()
            .map_err(|e| format!("the run's config: {e}"))?;
        let loaded = LoadedConfig {
            figment,
            config,
            stale: Default::default(),
        };
        let ctx = HookContext {
            name: &req.name,
            loaded: &loaded,
            asm: None,
            env: None,
            rank: req.rank,
            world: req.world,
            epoch_steps: req.epoch_steps,
            run_dir: Path::new(&req.run_dir),
            host: &(),
        };
        let built = factory(&ctx).map_err(|e| e.to_string())?;
        let (out, priority) = match built {
            None => (std::ptr::null_mut(), 0),
            Some(hook) => {
                let priority = hook.priority();
                let view = Rc::new(Cell::new(std::ptr::null::<ForwardHost>()));
                let head = nn::VarStore::new(tch::Device::Cpu);
                let model = match &req.model {
                    None => None,
                    Some(facts) => {
                        let facts: ModelFacts = serde_json::from_value(facts.clone())
                            .map_err(|e| format!("bad model facts: {e}"))?;
                        let dev = super::request::device(&req.device)?;
                        Some(proxy_model(Some(&facts), &view, dev, &head)?)
                    }
                };
                let g = GuestHook {
                    hook,
                    model,
                    view,
                    _head: head,
                };
                (Box::into_raw(Box::new(g)) as *mut c_void, priority)
            }
        };
        let info = serde_json::to_string(&HookInfo { priority }).map_err(|e| e.to_string())?;
        // SAFETY: valid out-pointers (checked above).
        unsafe {
            *state = out;
            *info_json = error_string(&info);
        }
        Ok(())
    })
}

unsafe extern "C" fn hook_after_objectives(
    state: *mut c_void,
    view: *const ForwardHost,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state from `create_hook`; the host's table for this call.
        let g = unsafe { (state as *const GuestHook).as_ref() }.ok_or("no state")?;
        let host = unsafe { view.as_ref() }.ok_or("no forward table")?;
        let model = g
            .model
            .as_ref()
            .ok_or("the host did not describe the model")?;
        with_forward(model, &g.view, host, |f| {
            g.hook.after_objectives(f);
            Ok(())
        })
    })
}

unsafe extern "C" fn hook_call(
    state: *mut c_void,
    request: *const c_char,
    n: usize,
    tensors: *const TensorHandle,
    sink: *const TensorSink,
    out_json: *mut *mut c_char,
) -> *mut c_char {
    if state.is_null() {
        return error_string("no state");
    }
    // SAFETY: our state from `create_hook`; the host calls one point at a
    // time, so this is the only reference while the call runs.
    let g = unsafe { &mut *(state as *mut GuestHook) };
    // SAFETY: the rest as the host passes them (`json_call::send`).
    unsafe {
        json_call::answer(request, n, tensors, sink, out_json, |p, t| {
            point(g.hook.as_mut(), p, t)
        })
    }
}

fn lent(tensors: &[Tensor], what: &str) -> Result<Tensor, String> {
    tensors
        .first()
        .map(Tensor::shallow_clone)
        .ok_or_else(|| format!("no {what} tensor"))
}

/// Run one point on the hook; its answer and tensors.
fn point(
    hook: &mut dyn Hook,
    point: Point,
    tensors: Vec<Tensor>,
) -> Result<(Value, Vec<Tensor>), String> {
    let e = |e: vlmatch_core::Error| e.to_string();
    let none = Ok((Value::Null, Vec::new()));
    match point {
        Point::State => {
            let s = hook.state();
            let (names, tensors): (Vec<String>, Vec<Tensor>) = s.tensors.into_iter().unzip();
            Ok((json!({"tensors": names, "counters": s.counters}), tensors))
        }
        Point::SetCounters { counters } => hook.set_counters(&counters).map_err(e).and(none),
        Point::OnStart {
            step,
            total_steps,
            resumed,
        } => hook
            .on_start(RunStart {
                step,
                total_steps,
                resumed,
            })
            .map_err(e)
            .and(none),
        Point::BeforeStep { step } => {
            hook.before_step(step);
            none
        }
        Point::BeforeBackward { step } => {
            let loss = hook.before_backward(step, lent(&tensors, "loss")?);
            Ok((Value::Null, vec![loss]))
        }
        Point::AfterOptimizerStep => {
            hook.after_optimizer_step(&lent(&tensors, "applied")?);
            none
        }
        Point::OnLog { step, line } => {
            let mut line = scalars_in(line);
            hook.on_log(step, &mut line);
            Ok((json!(scalars_out(&line)), Vec::new()))
        }
        Point::OnRecord {
            step,
            group,
            scalars,
        } => {
            let scalars = scalars_in(scalars);
            let record = Record {
                step,
                group: &group,
                scalars: &scalars,
            };
            hook.on_record(record).map_err(e).and(none)
        }
        Point::OnCheckpoint { step, path } => hook
            .on_checkpoint(step, Path::new(&path))
            .map_err(e)
            .and(none),
        Point::OnStepEnd { step } => hook.on_step_end(step).map_err(e).and(none),
        Point::OnEnd { how, step } => hook.on_end(end_in(&how, step)?).map_err(e).and(none),
    }
}
