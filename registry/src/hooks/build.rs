//! [`build_hooks`]: the registered hooks a run turns on, built and ordered.

use super::HookContext;
use crate::{Factory, Kind, Registry};
use vlmatch_core::{Error, Hook, Result};

/// A hook built for a run, with where it runs among the others.
pub struct BuiltHook {
    pub name: String,
    pub priority: i32,
    pub hook: Box<dyn Hook>,
}

/// Every registered hook the run turns on, lowest priority first (ties by
/// name). `ctx` is the context with any `name`; each factory gets it with
/// its own.
pub fn build_hooks(registry: &Registry, ctx: &HookContext<'_>) -> Result<Vec<BuiltHook>> {
    let names = registry.names(Kind::Hook);
    for name in ctx.loaded.config.hooks.keys() {
        if !names.contains(&name.as_str()) {
            return Err(Error::Config(format!(
                "config key `hooks.{name}`: unknown hook `{name}`; registered hooks: {}",
                names.join(", ")
            )));
        }
    }
    let mut built = Vec::new();
    for name in names {
        let entry = registry.get(Kind::Hook, name, &format!("hooks.{name}"))?;
        let Factory::Hook(build) = entry.factory else {
            continue;
        };
        let own = HookContext {
            name,
            loaded: ctx.loaded,
            asm: ctx.asm,
            env: ctx.env,
            rank: ctx.rank,
            world: ctx.world,
            epoch_steps: ctx.epoch_steps,
            run_dir: ctx.run_dir,
            host: ctx.host,
        };
        if let Some(hook) = build(&own)? {
            let priority = own
                .section()
                .and_then(|s| s.priority)
                .unwrap_or_else(|| hook.priority());
            built.push(BuiltHook {
                name: name.to_string(),
                priority,
                hook,
            });
        }
    }
    built.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    Ok(built)
}
