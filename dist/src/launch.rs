//! Who started this process, as which rank: `torchrun`'s or Slurm's
//! environment, read into a [`LaunchEnv`].
//!
//! - torchrun (and launchers that mimic it) sets `RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. It wins when `RANK` or
//!   `WORLD_SIZE` is set, also inside a Slurm job (`srun torchrun ...`).
//!   torchrun's agent also sets `TORCHELASTIC_USE_AGENT_STORE=True` when it
//!   serves the store at `MASTER_ADDR:MASTER_PORT` itself (every rank then
//!   connects as a client), and `TORCHELASTIC_RESTART_COUNT`, the attempt
//!   number after failures, which scopes the store keys.
//! - Slurm's `srun` sets `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` and
//!   the node list. Only a job *step* counts (`SLURM_STEP_ID` set): a batch
//!   script or an `salloc` shell also carries `SLURM_PROCID=0` and the job's
//!   `SLURM_NTASKS`, and a program run there directly is one process, not
//!   rank 0 of many. The rendezvous host is `MASTER_ADDR` if set, else the
//!   first host of `SLURM_STEP_NODELIST` (where task 0 of the step runs;
//!   `SLURM_JOB_NODELIST` when that is unset). The port is `MASTER_PORT` if
//!   set, else `15000 + SLURM_JOB_ID % 20000`, the same on every rank.
//!
//! The parsers take a lookup closure, so tests need no process environment.

use std::fmt;

/// Where the port comes from when Slurm starts us without `MASTER_PORT`.
pub const SLURM_PORT_BASE: u16 = 15000;
/// The span of ports derived from `SLURM_JOB_ID`.
pub const SLURM_PORT_SPAN: u64 = 20000;

/// The launcher that set the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Torchrun,
    Slurm,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "slurm",
        })
    }
}

/// This process's place in a multi-process launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Index of this process on its machine (picks the GPU).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous store.
    pub master_addr: String,
    /// Port of rank 0's rendezvous store.
    pub master_port: u16,
    /// Which launcher's variables these came from.
    pub launcher: Launcher,
    /// The launcher's agent serves the store (torchrun's
    /// `TORCHELASTIC_USE_AGENT_STORE=True`): rank 0 connects to it rather
    /// than serving one.
    pub agent_store: bool,
    /// torchrun's `TORCHELASTIC_RESTART_COUNT`: how many times the agent
    /// has restarted the ranks.
    pub restart_count: Option<u64>,
}

/// A launcher variable that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("environment variable {var} is not set, but {context}; set {var} too, or unset them")]
    Missing { var: &'static str, context: String },
}

impl LaunchEnv {
    /// Reads the process environment; `Ok(None)` when neither torchrun nor
    /// an srun job step started this process.
    pub fn from_env() -> Result<Option<LaunchEnv>, LaunchError> {
        LaunchEnv::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into()))
    }

    /// Like [`LaunchEnv::from_env`], with `get(name)` giving each variable.
    pub fn from_lookup<F>(get: F) -> Result<Option<LaunchEnv>, LaunchError>
    where
        F: Fn(&str) -> Option<String>,
    {
        if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            return torchrun(&get).map(Some);
        }
        let slurm_step = get("SLURM_STEP_ID").is_some() || get("SLURM_STEPID").is_some();
        if get("SLURM_PROCID").is_some() && slurm_step {
            return slurm(&get).map(Some);
        }
        Ok(None)
    }

    /// Whether this is rank 0 (which serves the store and writes outputs).
    pub fn is_master(&self) -> bool {
        self.rank == 0
    }
}

fn required<F>(get: &F, var: &'static str, context: &str) -> Result<String, LaunchError>
where
    F: Fn(&str) -> Option<String>,
{
    get(var).ok_or_else(|| LaunchError::Missing {
        var,
        context: context.to_string(),
    })
}

fn parse_usize(var: &'static str, value: &str) -> Result<usize, LaunchError> {
    value
        .trim()
        .parse::<usize>()
        .map_err(|_| LaunchError::Invalid {
            var,
            value: value.to_string(),
            reason: "expected a non-negative integer".into(),
        })
}

fn parse_port(var: &'static str, value: &str) -> Result<u16, LaunchError> {
    match value.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(LaunchError::Invalid {
            var,
            value: value.to_string(),
            reason: "expected a TCP port in 1..=65535".into(),
        }),
    }
}

fn check_host(var: &'static str, value: &str) -> Result<String, LaunchError> {
    let host = value.trim();
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(LaunchError::Invalid {
            var,
            value: value.to_string(),
            reason: "expected a host name or IP address".into(),
        });
    }
    Ok(host.to_string())
}

/// The rank, world size and local rank in the variables `vars` (in that
/// order), each required ([`required`] with `context`), parsed and checked
/// ([`check_ranks`]).
fn ranks<F>(get: &F, vars: [&'static str; 3], context: &str) -> Result<[usize; 3], LaunchError>
where
    F: Fn(&str) -> Option<String>,
{
    let mut values = [0; 3];
    for (value, var) in values.iter_mut().zip(vars) {
        *value = parse_usize(var, &required(get, var, context)?)?;
    }
    let [rank, world, local] = values;
    check_ranks((vars[0], rank), (vars[1], world), (vars[2], local))?;
    Ok(values)
}

/// Checks the ranks against the world size, naming the variables.
fn check_ranks(
    (rank_var, rank): (&'static str, usize),
    (world_var, world): (&'static str, usize),
    (local_var, local): (&'static str, usize),
) -> Result<(), LaunchError> {
    if world == 0 {
        return Err(LaunchError::Invalid {
            var: world_var,
            value: "0".into(),
            reason: "the world size must be at least 1".into(),
        });
    }
    if rank >= world {
        return Err(LaunchError::Invalid {
            var: rank_var,
            value: rank.to_string(),
            reason: format!("must be below {world_var}={world}"),
        });
    }
    if local >= world {
        return Err(LaunchError::Invalid {
            var: local_var,
            value: local.to_string(),
            reason: format!("must be below {world_var}={world}"),
        });
    }
    Ok(())
}

fn torchrun<F>(get: &F) -> Result<LaunchEnv, LaunchError>
where
    F: Fn(&str) -> Option<String>,
{
    let context = "RANK or WORLD_SIZE is (a torchrun-style launch)";
    let [rank, world_size, local_rank] = ranks(get, ["RANK", "WORLD_SIZE", "LOCAL_RANK"], context)?;
    let master_addr = check_host("MASTER_ADDR", &required(get, "MASTER_ADDR", context)?)?;
    let master_port = parse_port("MASTER_PORT", &required(get, "MASTER_PORT", context)?)?;
    // Python's torch.distributed compares with str(True).
    let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
        .is_some_and(|v| matches!(v.trim(), "True" | "true" | "1"));
    let restart_count = get("TORCHELASTIC_RESTART_COUNT")
        .map(|v| parse_usize("TORCHELASTIC_RESTART_COUNT", &v).map(|n| n as u64))
        .transpose()?;
    Ok(LaunchEnv {
        rank,
        world_size,
        local_rank,
        master_addr,
        master_port,
        launcher: Launcher::Torchrun,
        agent_store,
        restart_count,
    })
}

fn slurm<F>(get: &F) -> Result<LaunchEnv, LaunchError>
where
    F: Fn(&str) -> Option<String>,
{
    let context = "SLURM_PROCID and SLURM_STEP_ID are (an srun job step)";
    let [rank, world_size, local_rank] = ranks(
        get,
        ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
        context,
    )?;
    let master_addr = match get("MASTER_ADDR") {
        Some(addr) => check_host("MASTER_ADDR", &addr)?,
        None => {
            let (var, list) = [
                "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST",
                "SLURM_NODELIST",
            ]
            .into_iter()
            .find_map(|var| get(var).map(|v| (var, v)))
            .ok_or_else(|| LaunchError::Missing {
                var: "SLURM_JOB_NODELIST",
                context: format!("{context} and MASTER_ADDR is not"),
            })?;
            first_host(&list).map_err(|reason| LaunchError::Invalid {
                var,
                value: list.clone(),
                reason,
            })?
        }
    };
    let master_port = match get("MASTER_PORT") {
        Some(port) => parse_port("MASTER_PORT", &port)?,
        None => {
            let job = required(
                get,
                "SLURM_JOB_ID",
                &format!("{context} and MASTER_PORT is not (the port is derived from the job id)"),
            )?;
            let id = job
                .trim()
                .parse::<u64>()
                .map_err(|_| LaunchError::Invalid {
                    var: "SLURM_JOB_ID",
                    value: job.clone(),
                    reason: "expected a non-negative integer; or set MASTER_PORT".into(),
                })?;
            slurm_port(id)
        }
    };
    Ok(LaunchEnv {
        rank,
        world_size,
        local_rank,
        master_addr,
        master_port,
        launcher: Launcher::Slurm,
        agent_store: false,
        restart_count: None,
    })
}

/// The rendezvous port for a Slurm job without `MASTER_PORT`:
/// `15000 + job_id % 20000`, so concurrent jobs on one node rarely collide.
pub fn slurm_port(job_id: u64) -> u16 {
    SLURM_PORT_BASE + (job_id % SLURM_PORT_SPAN) as u16
}

/// The first host of a Slurm host list such as `node[03-05,07],gpu1` (here
/// `node03`). Bracket groups hold comma-separated numbers and `lo-hi`
/// ranges, zero padding kept; a name may have several groups
/// (`rack[1-2]-n[01-04]` gives `rack1-n01`). The error says what is wrong.
pub fn first_host(nodelist: &str) -> Result<String, String> {
    let list = nodelist.trim();
    if list.is_empty() {
        return Err("the host list is empty".into());
    }
    let mut host = String::new();
    let mut chars = list.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let rest = &list[i + 1..];
                let close = rest
                    .find(']')
                    .ok_or_else(|| format!("`[` at byte {i} is never closed"))?;
                let group = &rest[..close];
                host.push_str(&first_of_group(group)?);
                // Skip past the group.
                for _ in 0..group.chars().count() + 1 {
                    chars.next();
                }
            }
            ']' => return Err(format!("`]` at byte {i} has no matching `[`")),
            c if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') => host.push(c),
            c => return Err(format!("unexpected character {c:?} at byte {i}")),
        }
    }
    if host.is_empty() {
        return Err("the first entry of the host list is empty".into());
    }
    Ok(host)
}

/// The first number of a bracket group like `03-05,07`, validating all of
/// it.
fn first_of_group(group: &str) -> Result<String, String> {
    if group.is_empty() {
        return Err("empty `[]` in the host list".into());
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut first = None;
    for item in group.split(',') {
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (lo, Some(hi)),
            None => (item, None),
        };
        if !digits(lo) || hi.is_some_and(|h| !digits(h)) {
            return Err(format!(
                "`{item}` in `[{group}]` is not a number or a range like 01-04"
            ));
        }
        if let Some(hi) = hi {
            let (a, b) = (lo.parse::<u128>(), hi.parse::<u128>());
            if let (Ok(a), Ok(b)) = (a, b) {
                if a > b {
                    return Err(format!("range `{item}` in `[{group}]` runs backwards"));
                }
            }
        }
        first.get_or_insert_with(|| lo.to_string());
    }
    first.ok_or_else(|| format!("empty `[{group}]` in the host list"))
}

#[cfg(test)]
mod tests;
