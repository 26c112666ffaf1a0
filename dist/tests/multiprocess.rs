//! Multi-process tests of the c10d layer over Gloo on loopback.
//!
//! This binary has no libtest harness: run plainly it is the parent, which
//! runs each scenario by starting itself again as 2 or 3 rank processes
//! (`DIST_TEST_ROLE` set, torchrun's variables for the rank, a free port),
//! waits for them with a 30 s limit (killing them past it), and checks
//! their exit codes, timings and messages. Run as a rank, it executes that
//! role and exits 0 when every check passed.
//!
//! `cargo test -p vlmatch-dist --test multiprocess -- NAME` runs the
//! scenarios whose name contains NAME (`--exact`, `--skip` and `--list` work
//! as with libtest).

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use vlmatch_core::Collective;
use vlmatch_dist::{
    agree_any, broadcast_parameters, diagnose, DistCollective, DistError, GradReducer, Heartbeat,
    LaunchEnv, Op, ProcessGroup, Store, StoreServer,
};

const ROLE: &str = "DIST_TEST_ROLE";
/// Kill a scenario's ranks after this long: a hang is a failure, not a
/// stuck test run.
const SCENARIO_LIMIT: Duration = Duration::from_secs(30);
/// Group timeout where every rank takes part (never reached when all is well).
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(20);
/// Group timeout in the failure scenarios.
const FAULT_TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let code = match run_role(&role) {
            Ok(()) => 0,
            Err(msg) => {
                eprintln!("[{role}] FAILED: {msg}");
                1
            }
        };
        std::process::exit(code);
    }

    let args = Args::parse();
    /// Name, body, and whether it is ignored (a measurement, run with
    /// `--ignored` or `--include-ignored`).
    type Scenario = (&'static str, fn() -> Result<(), String>, bool);
    let scenarios: &[Scenario] = &[
        ("collectives_2_ranks", || collectives(2), false),
        ("collectives_3_ranks", || collectives(3), false),
        ("async_all_reduces_3_ranks", async_all_reduces, false),
        ("gather_with_grad_2_ranks", || gather_with_grad(2), false),
        ("gather_with_grad_3_ranks", || gather_with_grad(3), false),
        ("grad_reducer_2_ranks", || grad_reducer(2), false),
        ("grad_reducer_3_ranks", || grad_reducer(3), false),
        ("unused_parameters_2_ranks", unused_parameters, false),
        ("checkpoint_reducer_2_ranks", checkpoint_reducer, false),
        (
            "broadcast_parameters_and_agree_any_3_ranks",
            broadcast_and_agree,
            false,
        ),
        ("dead_worker_fails_the_master_wait", || dead_rank(1), false),
        ("dead_master_fails_the_worker_wait", || dead_rank(0), false),
        ("diagnose_names_the_dead_worker", || diagnose_dead(1), false),
        ("diagnose_names_the_dead_master", || diagnose_dead(0), false),
        ("hung_rank_times_out", hung_rank, false),
        ("diagnose_names_the_hung_rank_3_ranks", diagnose_hung, false),
        ("agent_store_and_restart_prefix", agent_store, false),
        ("missing_rank_fails_rendezvous", missing_rank, false),
        ("nccl_group", nccl_group, false),
        ("overlap_timing", overlap_timing, true),
    ];
    let chosen: Vec<&Scenario> = scenarios
        .iter()
        .filter(|(name, _, ignored)| args.selects(name, *ignored))
        .collect();
    if args.list {
        for (name, _, _) in &chosen {
            println!("{name}: test");
        }
        return;
    }
    println!("\nrunning {} multi-process scenarios", chosen.len());
    let mut failed = Vec::new();
    let all = Instant::now();
    for (name, scenario, _) in chosen {
        let start = Instant::now();
        let result = scenario();
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => println!("test {name} ... ok ({secs:.2} s)"),
            Err(msg) => {
                println!("test {name} ... FAILED ({secs:.2} s)\n{msg}\n");
                failed.push(*name);
            }
        }
    }
    println!(
        "\ntest result: {}. {} failed; finished in {:.2} s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        all.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        println!("failures: {failed:?}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

/// The libtest arguments that matter here (`cargo test -- ...` passes them
/// on): name filters, `--exact`, `--skip`, `--list`, `--ignored` (only the
/// ignored scenarios: measurements) and `--include-ignored`. Other flags
/// are accepted and ignored, with their values.
#[derive(Default)]
struct Args {
    filters: Vec<String>,
    skip: Vec<String>,
    exact: bool,
    list: bool,
    ignored_only: bool,
    include_ignored: bool,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args::default();
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--exact" => args.exact = true,
                "--list" => args.list = true,
                "--ignored" => args.ignored_only = true,
                "--include-ignored" => args.include_ignored = true,
                "--skip" => args.skip.extend(it.next()),
                "--test-threads" | "--color" | "--format" | "--logfile" | "-Z"
                | "--shuffle-seed" => {
                    it.next();
                }
                flag if flag.starts_with('-') => {}
                filter => args.filters.push(filter.to_string()),
            }
        }
        args
    }

    fn selects(&self, name: &str, ignored: bool) -> bool {
        let hit = |f: &String| {
            if self.exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        };
        let run = if self.ignored_only {
            ignored
        } else {
            self.include_ignored || !ignored
        };
        run && (self.filters.is_empty() || self.filters.iter().any(hit))
            && !self.skip.iter().any(|s| name.contains(s.as_str()))
    }
}

/// A port nothing listens on right now, for rank 0's store.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

struct Rank {
    rank: usize,
    child: Child,
    started: Instant,
    out: thread::JoinHandle<String>,
    err: thread::JoinHandle<String>,
}

struct Finished {
    rank: usize,
    status: ExitStatus,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn log(&self) -> String {
        format!(
            "--- rank {} ({}, {:.2} s) stdout:\n{}--- stderr:\n{}",
            self.rank,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Starts `ranks` of a `world`-rank job in `role`, the way torchrun would.
fn spawn(role: &str, world: usize, ranks: &[usize], port: u16) -> Result<Vec<Rank>, String> {
    spawn_with(role, world, ranks, port, &[])
}

/// [`spawn`] with more environment variables.
fn spawn_with(
    role: &str,
    world: usize,
    ranks: &[usize],
    port: u16,
    env: &[(&str, &str)],
) -> Result<Vec<Rank>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    ranks
        .iter()
        .map(|&rank| {
            let mut child = Command::new(&exe)
                .envs(env.iter().copied())
                .env(ROLE, role)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                // Gloo binds to the loopback interface.
                .env("GLOO_SOCKET_IFNAME", "lo")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start rank {rank}: {e}"))?;
            let out = drain(child.stdout.take().expect("piped stdout"));
            let err = drain(child.stderr.take().expect("piped stderr"));
            Ok(Rank {
                rank,
                child,
                started: Instant::now(),
                out,
                err,
            })
        })
        .collect()
}

/// Waits for every rank, killing all of them once `SCENARIO_LIMIT` has
/// passed (then the error holds their output).
fn finish(mut ranks: Vec<Rank>) -> Result<Vec<Finished>, String> {
    let start = Instant::now();
    let mut statuses: Vec<Option<(ExitStatus, Duration)>> = vec![None; ranks.len()];
    let mut timed_out = false;
    while statuses.iter().any(Option::is_none) {
        for (r, status) in ranks.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                if let Some(s) = r.child.try_wait().map_err(|e| e.to_string())? {
                    *status = Some((s, r.started.elapsed()));
                }
            }
        }
        if start.elapsed() > SCENARIO_LIMIT && statuses.iter().any(Option::is_none) {
            timed_out = true;
            for r in ranks.iter_mut() {
                let _ = r.child.kill();
            }
            for (r, status) in ranks.iter_mut().zip(statuses.iter_mut()) {
                if status.is_none() {
                    let s = r.child.wait().map_err(|e| e.to_string())?;
                    *status = Some((s, r.started.elapsed()));
                }
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let finished: Vec<Finished> = ranks
        .into_iter()
        .zip(statuses)
        .map(|(r, s)| {
            let (status, elapsed) = s.expect("every rank has an exit status");
            Finished {
                rank: r.rank,
                status,
                elapsed,
                stdout: r.out.join().unwrap_or_default(),
                stderr: r.err.join().unwrap_or_default(),
            }
        })
        .collect();
    if timed_out {
        let logs: Vec<String> = finished.iter().map(Finished::log).collect();
        return Err(format!(
            "ranks still running after {SCENARIO_LIMIT:?}: killed (a hang)\n{}",
            logs.join("\n")
        ));
    }
    Ok(finished)
}

/// Runs `role` on all ranks of a `world`-rank job; all must exit 0.
fn run_all(role: &str, world: usize) -> Result<Vec<Finished>, String> {
    let ranks: Vec<usize> = (0..world).collect();
    let finished = finish(spawn(role, world, &ranks, free_port())?)?;
    if finished.iter().any(|f| !f.status.success()) {
        let logs: Vec<String> = finished.iter().map(Finished::log).collect();
        return Err(logs.join("\n"));
    }
    Ok(finished)
}

/// The one line a rank printed after `prefix`.
fn reported<'a>(f: &'a Finished, prefix: &str) -> Option<&'a str> {
    f.stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::trim)
}

fn collectives(world: usize) -> Result<(), String> {
    for f in run_all("collectives", world)? {
        println!(
            "    rank {}: {:.2} s, collectives took {}",
            f.rank,
            f.elapsed.as_secs_f64(),
            reported(&f, "collectives:").unwrap_or("?")
        );
    }
    Ok(())
}

fn async_all_reduces() -> Result<(), String> {
    run_all("async", 3).map(|_| ())
}

/// Rank `dead` exits after one good all-reduce; the survivor's next wait
/// must fail, with a message naming its rank and the operation, well within
/// the group's timeout plus start-up.
fn dead_rank(dead: usize) -> Result<(), String> {
    let finished = run_all(if dead == 0 { "dead0" } else { "dead1" }, 2)?;
    let survivor = &finished[1 - dead];
    let failed_after = reported(survivor, "failed after:").ok_or_else(|| survivor.log())?;
    println!(
        "    survivor rank {}: exited after {:.2} s; its wait failed after {failed_after}: {}",
        survivor.rank,
        survivor.elapsed.as_secs_f64(),
        reported(survivor, "error:").unwrap_or("?")
    );
    if survivor.elapsed > Duration::from_secs(15) {
        return Err(format!("the survivor took too long\n{}", survivor.log()));
    }
    Ok(())
}

fn gather_with_grad(world: usize) -> Result<(), String> {
    for f in run_all("gather", world)? {
        println!(
            "    rank {}: max |grad - single-process grad| = {}",
            f.rank,
            reported(&f, "max grad error:").unwrap_or("?")
        );
    }
    Ok(())
}

fn grad_reducer(world: usize) -> Result<(), String> {
    for f in run_all("reducer", world)? {
        if f.rank == 0 {
            println!(
                "    rank 0: {}",
                reported(&f, "reducer:").unwrap_or("(no report)")
            );
        }
    }
    Ok(())
}

/// Parameters no rank used keep no gradient; one used on one rank only
/// gets (g + 0) / 2 on both.
fn unused_parameters() -> Result<(), String> {
    for f in run_all("unused", 2)? {
        if f.rank == 0 {
            println!("    rank 0: {}", reported(&f, "unused:").unwrap_or("?"));
        }
    }
    Ok(())
}

/// Checkpointed layers under the reducer's hooks: the same averaged
/// gradients as plain layers, and at least as many buckets started during
/// backward.
fn checkpoint_reducer() -> Result<(), String> {
    for f in run_all("checkpoint", 2)? {
        if f.rank == 0 {
            println!("    rank 0: {}", reported(&f, "checkpoint:").unwrap_or("?"));
        }
    }
    Ok(())
}

fn broadcast_and_agree() -> Result<(), String> {
    run_all("broadcast", 3).map(|_| ())
}

/// Rank `dead` exits without a word after a good all-reduce; the survivor's
/// collective fails and [`vlmatch_dist::diagnose`] must name the dead rank.
fn diagnose_dead(dead: usize) -> Result<(), String> {
    let finished = run_all(if dead == 0 { "hb_dead0" } else { "hb_dead1" }, 2)?;
    let survivor = &finished[1 - dead];
    let line = reported(survivor, "diagnosed:").ok_or_else(|| survivor.log())?;
    // The store calls that fail once rank 0 is gone report it in our error,
    // not in c10d warnings with C++ backtraces.
    if survivor.stderr.contains("TCPStore.cpp") || survivor.stderr.contains("frame #") {
        return Err(format!("c10d warnings on stderr\n{}", survivor.log()));
    }
    println!(
        "    survivor rank {} after {:.2} s: {line}",
        survivor.rank,
        survivor.elapsed.as_secs_f64()
    );
    Ok(())
}

/// Rank 2 of 3 stays alive but stops calling collectives (stuck in its
/// step); ranks 0 and 1 time out in the next all_reduce, and
/// [`vlmatch_dist::diagnose`] on both must name rank 2 as the rank behind,
/// with the collective it has not joined.
fn diagnose_hung() -> Result<(), String> {
    let finished = run_all("hb_hung", 3)?;
    for f in finished.iter().filter(|f| f.rank < 2) {
        let line = reported(f, "diagnosed:").ok_or_else(|| f.log())?;
        println!(
            "    rank {} after {:.2} s: {line}",
            f.rank,
            f.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// torchrun's agent store: this process serves the store, as torchrun's
/// agent does, holding keys of a failed attempt 0; 2 ranks started with
/// `TORCHELASTIC_USE_AGENT_STORE=True` and `TORCHELASTIC_RESTART_COUNT=1`
/// must all connect as clients (rank 0 serving would fail to bind), keep
/// their keys under `attempt_1/`, and not see attempt 0's.
fn agent_store() -> Result<(), String> {
    let port = free_port();
    let agent =
        Store::connect("127.0.0.1", port, 0, 1, HEALTHY_TIMEOUT).map_err(|e| e.to_string())?;
    let err = |e: DistError| e.to_string();
    // Attempt 0 left rank 1 "stopped" and a stale rendezvous key.
    agent
        .set(
            "attempt_0/alive/1",
            b"count=3 time_ms=1 step=2 step_time_ms=1 state=stopped",
        )
        .map_err(err)?;
    agent.set("attempt_0/stale", b"1").map_err(err)?;
    let ranks = spawn_with(
        "agent",
        2,
        &[0, 1],
        port,
        &[
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "1"),
        ],
    )?;
    let finished = finish(ranks)?;
    if finished.iter().any(|f| !f.status.success()) {
        let logs: Vec<String> = finished.iter().map(Finished::log).collect();
        return Err(logs.join("\n"));
    }
    for f in &finished {
        if f.stderr.contains("[E") || f.stderr.contains("failed to bind") {
            return Err(format!("a rank tried to serve the store\n{}", f.log()));
        }
    }
    let keys = ["attempt_1/alive/0", "attempt_1/alive/1", "attempt_1/done/0"];
    if !agent.check(&keys).map_err(err)? || agent.check(&["alive/0"]).map_err(err)? {
        return Err("the ranks' keys are not (only) under attempt_1/".into());
    }
    println!(
        "    rank 0: {}",
        reported(&finished[0], "agent:").unwrap_or("?")
    );
    Ok(())
}

/// A measurement, not a check: 2 ranks (`TIMING_RANKS`) reduce ~10.5 M fp32
/// gradients of a chain of linear layers, after backward and overlapped
/// with it (`BUCKET_MB`, `REPS`), and count the bytes on loopback; with
/// `BASE_PARAMS=N` also one all-reduce of N floats.
fn overlap_timing() -> Result<(), String> {
    let ranks = std::env::var("TIMING_RANKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let finished = run_all("timing", ranks)?;
    for f in &finished {
        println!("    --- rank {}", f.rank);
        for line in f.stdout.lines().filter(|l| l.starts_with("timing")) {
            println!("    {line}");
        }
    }
    Ok(())
}

/// Rank 1 stays alive but stops calling collectives: rank 0's wait must
/// end with a timeout error after about the group's timeout.
fn hung_rank() -> Result<(), String> {
    let port = free_port();
    let mut ranks = spawn("hung", 2, &[0, 1], port)?;
    let hung = ranks.pop().expect("rank 1");
    let master = finish(ranks)?.pop().expect("rank 0");
    let mut hung_child = hung.child;
    let _ = hung_child.kill();
    let _ = hung_child.wait();
    if !master.status.success() {
        return Err(master.log());
    }
    let failed_after = reported(&master, "failed after:").unwrap_or("?");
    println!(
        "    rank 0: exited after {:.2} s; its wait timed out after {failed_after} (timeout {FAULT_TIMEOUT:?}): {}",
        master.elapsed.as_secs_f64(),
        reported(&master, "error:").unwrap_or("?")
    );
    if master.elapsed > Duration::from_secs(15) {
        return Err(format!("rank 0 took too long\n{}", master.log()));
    }
    Ok(())
}

/// Only rank 0 of 2 starts: setting up the store fails after the timeout
/// with an error that says which rank, where and how long.
fn missing_rank() -> Result<(), String> {
    let finished = finish(spawn("alone", 2, &[0], free_port())?)?;
    let master = &finished[0];
    if !master.status.success() {
        return Err(master.log());
    }
    println!(
        "    rank 0: exited after {:.2} s: {}",
        master.elapsed.as_secs_f64(),
        reported(master, "error:").unwrap_or("?")
    );
    Ok(())
}

/// One rank: NCCL where a GPU is, else a clear error (never a crash).
fn nccl_group() -> Result<(), String> {
    let finished = run_all("nccl", 1)?;
    println!(
        "    {}",
        reported(&finished[0], "nccl:").unwrap_or("(no report)")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Rank side
// ---------------------------------------------------------------------------

fn run_role(role: &str) -> Result<(), String> {
    tch::set_num_threads(1);
    let env = LaunchEnv::from_env()
        .map_err(|e| e.to_string())?
        .ok_or("no RANK/WORLD_SIZE in the environment")?;
    match role {
        "collectives" => role_collectives(&env),
        "async" => role_async(&env),
        "dead0" => role_dead(&env, 0),
        "dead1" => role_dead(&env, 1),
        "hung" => role_hung(&env),
        "alone" => role_alone(&env),
        "nccl" => role_nccl(&env),
        "gather" => role_gather(&env),
        "reducer" => role_reducer(&env),
        "unused" => role_unused(&env),
        "checkpoint" => role_checkpoint(&env),
        "broadcast" => role_broadcast(&env),
        "hb_dead0" => role_heartbeat_dead(&env, 0),
        "hb_dead1" => role_heartbeat_dead(&env, 1),
        "hb_hung" => role_heartbeat_hung(&env),
        "agent" => role_agent(&env),
        "timing" => role_timing(&env),
        other => Err(format!("unknown role {other}")),
    }
}

/// The store (with a lenient timeout, so a slow process start is no
/// failure; rank 0 returns once every rank has connected) and a Gloo group
/// with `timeout`.
fn setup(env: &LaunchEnv, timeout: Duration) -> Result<(Store, ProcessGroup), String> {
    let store = Store::from_launch(env, HEALTHY_TIMEOUT).map_err(|e| e.to_string())?;
    let pg =
        ProcessGroup::gloo(&store, env.rank, env.world_size, timeout).map_err(|e| e.to_string())?;
    if (pg.rank(), pg.size()) != (env.rank, env.world_size) {
        return Err(format!("group says rank {} of {}", pg.rank(), pg.size()));
    }
    Ok((store, pg))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.flatten(0, -1)).expect("f32 tensor")
}

fn i64s(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.flatten(0, -1)).expect("i64 tensor")
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

fn role_collectives(env: &LaunchEnv) -> Result<(), String> {
    let (store, pg) = setup(env, HEALTHY_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let (r, n) = (env.rank as i64, env.world_size as i64);
    let start = Instant::now();

    // All-reduce: one f32 tensor, then a bucket of two (different shapes),
    // then an i64 tensor. Rank r holds arange + r.
    let mut one = [Tensor::arange(6, cpu(Kind::Float)) + r as f64];
    pg.all_reduce_sum(&mut one)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    let want: Vec<f32> = (0..6).map(|i| (n * i + n * (n - 1) / 2) as f32).collect();
    expect_eq("all_reduce of arange + rank", f32s(&one[0]), want.clone())?;

    let mut bucket = [
        Tensor::arange(6, cpu(Kind::Float)).reshape([2, 3]) + r as f64,
        Tensor::full([4], (r + 1) as f64, cpu(Kind::Float)),
    ];
    pg.all_reduce_sum(&mut bucket)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    expect_eq(
        "bucket[0] of a coalesced all_reduce",
        f32s(&bucket[0]),
        want,
    )?;
    expect_eq("bucket[0] keeps its shape", bucket[0].size(), vec![2, 3])?;
    expect_eq(
        "bucket[1] of a coalesced all_reduce",
        f32s(&bucket[1]),
        vec![(n * (n + 1) / 2) as f32; 4],
    )?;

    let mut ints = [Tensor::from_slice(&[r, 1, 1000 * r])];
    pg.all_reduce_sum(&mut ints)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    expect_eq(
        "i64 all_reduce",
        i64s(&ints[0]),
        vec![n * (n - 1) / 2, n, 1000 * n * (n - 1) / 2],
    )?;

    // All-gather: rank r holds [[10r, 10r+1], [10r+2, 10r+3]].
    let mine = (Tensor::arange(4, cpu(Kind::Float)) + 10.0 * r as f64).reshape([2, 2]);
    let gathered = pg.all_gather(&mine).map_err(err)?;
    expect_eq("all_gather shape", gathered.size(), vec![2 * n, 2])?;
    let want: Vec<f32> = (0..n)
        .flat_map(|q| (0..4).map(move |i| (10 * q + i) as f32))
        .collect();
    expect_eq("all_gather values", f32s(&gathered), want)?;
    let scalars = pg.all_gather(&Tensor::from(r)).map_err(err)?;
    expect_eq("all_gather of scalars", i64s(&scalars), (0..n).collect())?;

    // Reduce-scatter: rank r's input is n parts of 3 rows x 2, element i
    // of the whole input being i + 100r; rank r gets part r of the sum.
    let input = (Tensor::arange(n * 6, cpu(Kind::Float)) + 100.0 * r as f64).reshape([3 * n, 2]);
    let mut part = Tensor::zeros([3, 2], cpu(Kind::Float));
    pg.reduce_scatter_sum(&mut part, &input)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    let want: Vec<f32> = (0..6)
        .map(|i| (n * (6 * r + i) + 100 * n * (n - 1) / 2) as f32)
        .collect();
    expect_eq("reduce_scatter part", f32s(&part), want)?;
    expect_eq(
        "reduce_scatter leaves its input alone",
        f32s(&input)[0],
        100.0 * r as f32,
    )?;
    let mut wrong = Tensor::zeros([2, 2], cpu(Kind::Float));
    match pg.reduce_scatter_sum(&mut wrong, &input) {
        Err(DistError::InvalidArgument { detail, .. }) if detail.contains("group size") => {}
        other => return Err(format!("a misshapen reduce_scatter gave {other:?}")),
    }

    // Broadcast from the last rank: rank r holds arange * (r + 1).
    let root = env.world_size - 1;
    let mut b = Tensor::arange(3, cpu(Kind::Float)) * (r + 1) as f64;
    pg.broadcast(&mut b, root)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    expect_eq(
        "broadcast from the last rank",
        f32s(&b),
        (0..3).map(|i| (i * n) as f32).collect(),
    )?;

    // The store: every rank sets a key and bumps a counter.
    store
        .set(&format!("hello/{r}"), format!("rank {r}").as_bytes())
        .map_err(err)?;
    store.add("arrived", 1).map_err(err)?;
    pg.barrier().map_err(err)?;
    let keys: Vec<String> = (0..n).map(|q| format!("hello/{q}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&keys, HEALTHY_TIMEOUT).map_err(err)?;
    expect_eq("check of set keys", store.check(&keys).map_err(err)?, true)?;
    expect_eq(
        "check of an unset key",
        store.check(&["nobody"]).map_err(err)?,
        false,
    )?;
    for q in 0..n {
        let v = store
            .get(&format!("hello/{q}"), HEALTHY_TIMEOUT)
            .map_err(err)?;
        expect_eq("store value", v, format!("rank {q}").into_bytes())?;
    }
    expect_eq(
        "counter after the barrier",
        store.add("arrived", 0).map_err(err)?,
        n,
    )?;
    // Nobody deletes until everyone has read.
    pg.barrier().map_err(err)?;
    if r == 0 {
        expect_eq("delete", store.delete("hello/0").map_err(err)?, true)?;
    }
    println!("collectives: {:.3} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn role_async(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, HEALTHY_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let (r, n) = (env.rank as i64, env.world_size as i64);

    // Start two all-reduces and a broadcast before waiting on any, then wait
    // in the opposite order. The second all-reduce goes through a handle
    // that is dropped at once: the backend keeps the storage alive.
    let mut a = [Tensor::full([1000], r as f64, cpu(Kind::Float))];
    let b = Tensor::full([10], (r + 1) as f64, cpu(Kind::Double));
    let mut c = Tensor::from_slice(&[r * 7]);
    let wa = pg.all_reduce_sum(&mut a).map_err(err)?;
    let wb = pg.all_reduce_sum(&mut [b.shallow_clone()]).map_err(err)?;
    let wc = pg.broadcast(&mut c, 1).map_err(err)?;
    wc.wait().map_err(err)?;
    wb.wait().map_err(err)?;
    let still_pending = !wa.is_completed();
    wa.wait().map_err(err)?;
    expect_eq(
        "first all_reduce",
        f32s(&a[0]),
        vec![(n * (n - 1) / 2) as f32; 1000],
    )?;
    expect_eq(
        "second all_reduce (f64)",
        Vec::<f64>::try_from(&b).expect("f64"),
        vec![(n * (n + 1) / 2) as f64; 10],
    )?;
    expect_eq("broadcast between them", i64s(&c), vec![7])?;
    println!("first still pending after the others: {still_pending}");
    Ok(())
}

fn role_dead(env: &LaunchEnv, dead: usize) -> Result<(), String> {
    let (_store, pg) = setup(env, FAULT_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let mut t = [Tensor::ones([8], cpu(Kind::Float))];
    pg.all_reduce_sum(&mut t)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    if env.rank == dead {
        // Exit without a word to the others, as a crash would.
        std::process::exit(0);
    }
    let start = Instant::now();
    let result = pg.all_reduce_sum(&mut t).and_then(|w| w.wait());
    let elapsed = start.elapsed();
    let e = match result {
        Ok(()) => return Err("the all_reduce with a dead peer succeeded".into()),
        Err(e) => e,
    };
    println!("failed after: {:.2} s", elapsed.as_secs_f64());
    println!("error: {e}");
    let msg = e.to_string();
    let me = format!("rank {} of 2", env.rank);
    if !matches!(
        e,
        DistError::Collective {
            op: Op::AllReduce,
            ..
        } | DistError::Timeout {
            op: Op::AllReduce,
            ..
        }
    ) || !msg.contains(&me)
        || !msg.contains("all_reduce")
    {
        return Err(format!("unexpected error: {e:?}"));
    }
    if elapsed > FAULT_TIMEOUT + Duration::from_secs(2) {
        return Err(format!("the failure took {elapsed:?}"));
    }
    // The group is now out of step and refuses more work.
    match pg.barrier() {
        Err(DistError::GroupFailed {
            op: Op::Barrier,
            failed: Op::AllReduce,
            ..
        }) => Ok(()),
        other => Err(format!("a barrier after the failure gave {other:?}")),
    }
}

fn role_hung(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, FAULT_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let mut t = [Tensor::ones([8], cpu(Kind::Float))];
    pg.all_reduce_sum(&mut t)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    if env.rank == 1 {
        // Alive, connected, and never calling the next collective.
        thread::sleep(SCENARIO_LIMIT);
        return Ok(());
    }
    let start = Instant::now();
    let result = pg.all_reduce_sum(&mut t).and_then(|w| w.wait());
    let elapsed = start.elapsed();
    let e = match result {
        Ok(()) => return Err("the all_reduce with a hung peer succeeded".into()),
        Err(e) => e,
    };
    println!("failed after: {:.2} s", elapsed.as_secs_f64());
    println!("error: {e}");
    match &e {
        DistError::Timeout {
            op: Op::AllReduce,
            rank: 0,
            size: 2,
            timeout,
            ..
        } if *timeout == FAULT_TIMEOUT => {}
        _ => return Err(format!("expected a timeout error, got {e:?}")),
    }
    if !e.to_string().contains(&format!("{FAULT_TIMEOUT:?}")) {
        return Err(format!("the message does not state the timeout: {e}"));
    }
    if elapsed + Duration::from_millis(100) < FAULT_TIMEOUT
        || elapsed > FAULT_TIMEOUT + Duration::from_secs(3)
    {
        return Err(format!(
            "timed out after {elapsed:?}, not about {FAULT_TIMEOUT:?}"
        ));
    }
    Ok(())
}

fn role_alone(env: &LaunchEnv) -> Result<(), String> {
    let timeout = Duration::from_secs(2);
    let start = Instant::now();
    match Store::from_launch(env, timeout) {
        Ok(_) => Err("the store came up with a rank missing".into()),
        Err(e @ DistError::Rendezvous { rank: 0, .. }) => {
            println!("error: {e}");
            let msg = e.to_string();
            let addr = format!("127.0.0.1:{}", env.master_port);
            if !msg.contains(&addr) || !msg.contains("2s") {
                return Err(format!("the message lacks the address or timeout: {msg}"));
            }
            if start.elapsed() > timeout + Duration::from_secs(5) {
                return Err(format!("took {:?}", start.elapsed()));
            }
            Ok(())
        }
        Err(e) => Err(format!("unexpected error: {e:?}")),
    }
}

fn role_nccl(env: &LaunchEnv) -> Result<(), String> {
    let store = Store::from_launch(env, HEALTHY_TIMEOUT).map_err(|e| e.to_string())?;
    let result = ProcessGroup::nccl(&store, 0, 1, HEALTHY_TIMEOUT);
    if !tch::Cuda::is_available() {
        return match result {
            Ok(_) => Err("an NCCL group came up without a GPU".into()),
            Err(e @ DistError::Init { .. }) => {
                println!(
                    "nccl: built in: {}; no GPU, so creating it fails cleanly: {e}",
                    vlmatch_dist::has_nccl()
                );
                Ok(())
            }
            Err(e) => Err(format!("unexpected error: {e:?}")),
        };
    }
    // A GPU machine: a one-rank NCCL all-reduce and all-gather on cuda:0.
    let pg = result.map_err(|e| e.to_string())?;
    let dev = Device::Cuda(0);
    let mut t = [Tensor::arange(5, (Kind::Float, dev))];
    pg.all_reduce_sum(&mut t)
        .map_err(|e| e.to_string())?
        .wait()
        .map_err(|e| e.to_string())?;
    expect_eq(
        "nccl all_reduce",
        f32s(&t[0].to_device(Device::Cpu)),
        vec![0., 1., 2., 3., 4.],
    )?;
    let g = pg.all_gather(&t[0]).map_err(|e| e.to_string())?;
    expect_eq("nccl all_gather shape", g.size(), vec![5])?;
    let mut part = Tensor::zeros([5], (Kind::Float, dev));
    pg.reduce_scatter_sum(&mut part, &t[0])
        .map_err(|e| e.to_string())?
        .wait()
        .map_err(|e| e.to_string())?;
    expect_eq(
        "nccl reduce_scatter",
        f32s(&part.to_device(Device::Cpu)),
        vec![0., 1., 2., 3., 4.],
    )?;
    println!("nccl: one-rank all_reduce, all_gather and reduce_scatter on cuda:0 ok");
    Ok(())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Rank q's input of the gather test: known to every rank, so each can
/// compute the single-process reference.
fn gather_input(q: usize, rows: i64, salt: f64) -> Tensor {
    ((Tensor::arange(rows * 4, cpu(Kind::Float)) + (q as i64 * rows * 4) as f64) * 0.1 + salt)
        .sin()
        .reshape([rows, 4])
}

/// Rank q's loss on the gathered tensors: nonlinear in every row, with
/// rank-dependent coefficients.
fn gather_loss(q: usize, g: &Tensor, h: &Tensor) -> Tensor {
    let n = g.size()[0];
    let w = (Tensor::arange(n * 4, cpu(Kind::Float)) * (0.37 * (q + 1) as f64))
        .cos()
        .reshape([n, 4]);
    let sim = g.matmul(&h.tr()) * (1.0 + q as f64);
    (g.tanh() * w).sum(Kind::Float)
        + (g.pow_tensor_scalar(2)
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            * (0.5 + q as f64))
            .log1p()
            .sum(Kind::Float)
        + sim.log_softmax(1, Kind::Float).diag(0).mean(Kind::Float) * -(q as f64 + 0.5)
}

fn role_gather(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, HEALTHY_TIMEOUT)?;
    let coll = DistCollective::new(pg);
    let err = |e: vlmatch_core::Error| e.to_string();
    let (r, n) = (env.rank, env.world_size);
    expect_eq("trait rank", coll.rank(), r)?;
    expect_eq("trait world size", coll.world_size(), n)?;

    // Two gathers in one graph (like image and text features for ITC):
    // their backward collectives must run in the same order on every rank.
    let x = gather_input(r, 3, 0.0).set_requires_grad(true);
    let y = gather_input(r, 3, 1.3).set_requires_grad(true);
    let gx = coll.all_gather_with_grad(&x).map_err(err)?;
    let gy = coll.all_gather_with_grad(&y).map_err(err)?;
    let want_x = Tensor::cat(
        &(0..n).map(|q| gather_input(q, 3, 0.0)).collect::<Vec<_>>(),
        0,
    );
    expect_eq("gathered shape", gx.size(), vec![3 * n as i64, 4])?;
    expect_eq("gathered values", f32s(&gx), f32s(&want_x))?;
    if !gx.requires_grad() {
        return Err("the gathered tensor does not require grad".into());
    }
    gather_loss(r, &gx, &gy)
        .f_backward()
        .map_err(|e| e.to_string())?;

    // The single-process reference: every rank's inputs as leaves, the sum
    // of every rank's loss.
    let xs: Vec<Tensor> = (0..n)
        .map(|q| gather_input(q, 3, 0.0).set_requires_grad(true))
        .collect();
    let ys: Vec<Tensor> = (0..n)
        .map(|q| gather_input(q, 3, 1.3).set_requires_grad(true))
        .collect();
    let (gx_ref, gy_ref) = (Tensor::cat(&xs, 0), Tensor::cat(&ys, 0));
    let total = (0..n)
        .map(|q| gather_loss(q, &gx_ref, &gy_ref))
        .reduce(|a, b| a + b)
        .expect("one rank at least");
    total.backward();
    let dx = max_abs_diff(&x.grad(), &xs[r].grad());
    let dy = max_abs_diff(&y.grad(), &ys[r].grad());
    println!("max grad error: x {dx:.2e}, y {dy:.2e}");
    if dx > 1e-6 || dy > 1e-6 {
        return Err(format!("gradients differ from one process: x {dx}, y {dy}"));
    }
    // Not trivially right: this rank's own loss alone gives another gradient.
    let x_own = gather_input(r, 3, 0.0).set_requires_grad(true);
    let mut parts: Vec<Tensor> = (0..n).map(|q| gather_input(q, 3, 0.0)).collect();
    parts[r] = x_own.shallow_clone();
    gather_loss(r, &Tensor::cat(&parts, 0), &gy_ref.detach()).backward();
    if max_abs_diff(&x_own.grad(), &x.grad()) < 1e-3 {
        return Err("the gradient equals the local loss's: no cross-rank sum".into());
    }

    // The trait's collectives without gradient.
    let plain = coll.all_gather(&x).map_err(err)?;
    if plain.requires_grad() {
        return Err("all_gather (no grad) returned a tensor that requires grad".into());
    }
    expect_eq("all_gather values", f32s(&plain), f32s(&want_x))?;
    let summed = coll.all_reduce_sum(&x).map_err(err)?;
    let want_sum = (0..n)
        .map(|q| gather_input(q, 3, 0.0))
        .reduce(|a, b| a + b)
        .expect("one rank at least");
    if max_abs_diff(&summed, &want_sum) > 1e-6 || summed.requires_grad() {
        return Err("all_reduce_sum through the trait is wrong".into());
    }
    expect_eq(
        "all_reduce_sum leaves its input alone",
        f32s(&x),
        f32s(&gather_input(r, 3, 0.0)),
    )?;
    let scalar = coll.all_reduce_sum(&Tensor::from(r as f64)).map_err(err)?;
    expect_eq(
        "scalar all_reduce_sum",
        scalar.double_value(&[]),
        (n * (n - 1) / 2) as f64,
    )?;
    Ok(())
}

/// The parameters of the reducer test: shapes, with parameter 2 unused on
/// rank 0 and parameter 3 unused everywhere; parameter 5 is fp64.
fn reducer_params() -> Vec<Tensor> {
    let f = |shape: &[i64]| Tensor::zeros(shape, cpu(Kind::Float)).set_requires_grad(true);
    vec![
        f(&[5]),
        f(&[3, 4]),
        f(&[7]),
        f(&[2]),
        f(&[1000]),
        Tensor::zeros([6], cpu(Kind::Double)).set_requires_grad(true),
    ]
}

/// Rank r's gradient of parameter i at micro-step k: multiples of 1/4, so
/// sums and halves are exact in fp32.
fn reducer_coeff(r: usize, i: usize, k: usize, p: &Tensor) -> Tensor {
    let base = ((r + 1) * (i + 1) + 3 * k) as f64;
    (Tensor::arange(p.numel() as i64, (p.kind(), Device::Cpu)) * 0.25 + base)
        .reshape(p.size().as_slice())
}

fn reducer_used(r: usize, i: usize) -> bool {
    i != 3 && !(i == 2 && r == 0)
}

/// Backward of rank r's loss at micro-step k: gradient `reducer_coeff`.
fn reducer_backward(r: usize, k: usize, params: &[Tensor]) -> Result<(), String> {
    let loss = params
        .iter()
        .enumerate()
        .filter(|(i, _)| reducer_used(r, *i))
        .map(|(i, p)| (p * reducer_coeff(r, i, k, p)).sum(Kind::Double))
        .reduce(|a, b| a + b)
        .expect("some parameter is used");
    loss.f_backward().map_err(|e| e.to_string())
}

/// The average over ranks of the gradients of micro-steps `ks`.
fn reducer_expected(n: usize, i: usize, ks: &[usize], p: &Tensor) -> Tensor {
    let mut sum = p.zeros_like();
    for q in 0..n {
        for &k in ks {
            if reducer_used(q, i) {
                sum += reducer_coeff(q, i, k, p);
            }
        }
    }
    sum / n as f64
}

/// Every gradient is the average over ranks, except parameter 3's, which no
/// rank used: it stays undefined on every rank.
fn check_grads(what: &str, n: usize, ks: &[usize], params: &[Tensor]) -> Result<(), String> {
    for (i, p) in params.iter().enumerate() {
        let g = p.grad();
        let used_somewhere = (0..n).any(|q| reducer_used(q, i));
        if !used_somewhere {
            if g.defined() {
                return Err(format!(
                    "{what}: parameter {i}, unused on every rank, got a gradient {g:?}"
                ));
            }
            continue;
        }
        if !g.defined() {
            return Err(format!("{what}: parameter {i} has no gradient"));
        }
        let want = reducer_expected(n, i, ks, p);
        let d = max_abs_diff(&g, &want);
        let exact = n == 2;
        if (exact && d != 0.0) || d > 1e-5 {
            return Err(format!(
                "{what}: parameter {i}'s gradient is off by {d}: {g:?} vs {want:?}"
            ));
        }
    }
    Ok(())
}

fn zero_grads(params: &mut [Tensor]) {
    for p in params.iter_mut() {
        p.zero_grad();
    }
}

fn role_reducer(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, HEALTHY_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let (r, n) = (env.rank, env.world_size);

    // Reduce after backward, buckets of about 64 bytes: several buckets,
    // one with the unused parameters.
    let params = reducer_params();
    let reducer = GradReducer::new(&params, 64.0 / (1024.0 * 1024.0)).map_err(err)?;
    let buckets = reducer.buckets().to_vec();
    if buckets.len() < 3 || buckets[0][0] != params.len() - 1 {
        return Err(format!("unexpected buckets {buckets:?}"));
    }
    reducer_backward(r, 0, &params)?;
    if params[3].grad().defined() {
        return Err("an unused parameter has a gradient before reduce".into());
    }
    reducer.reduce(&pg).map_err(err)?;
    check_grads("reduce after backward", n, &[0], &params)?;

    // Overlapped with backward, on fresh parameters (undefined gradients
    // again), for two steps, the second accumulating two micro-steps.
    let mut params = reducer_params();
    let mut reducer = GradReducer::new(&params, 64.0 / (1024.0 * 1024.0)).map_err(err)?;
    reducer.overlap_with_backward(&pg).map_err(err)?;
    reducer_backward(r, 0, &params)?;
    reducer.reduce(&pg).map_err(err)?;
    check_grads("overlapped, step 1", n, &[0], &params)?;
    let overlapped = reducer.last_overlapped_buckets();
    // Buckets up to the one holding parameter 2 (unused on rank 0) start
    // during backward on every rank; that and later ones in reduce().
    if overlapped == 0 {
        return Err("no bucket started during backward".into());
    }
    zero_grads(&mut params);
    reducer.set_sync(false);
    reducer_backward(r, 1, &params)?;
    reducer.set_sync(true);
    reducer_backward(r, 2, &params)?;
    reducer.reduce(&pg).map_err(err)?;
    check_grads("overlapped, step 2 (2 micro-steps)", n, &[1, 2], &params)?;
    // Without the hooks, the same reducer reduces after backward again.
    reducer.stop_overlap();
    zero_grads(&mut params);
    reducer_backward(r, 4, &params)?;
    reducer.reduce(&pg).map_err(err)?;
    check_grads("after stop_overlap", n, &[4], &params)?;
    if reducer.last_overlapped_buckets() != 0 {
        return Err("buckets started without hooks".into());
    }
    println!(
        "reducer: {} buckets {:?}; with hooks {} of them started during backward",
        buckets.len(),
        buckets,
        overlapped
    );
    Ok(())
}

/// Three parameters: `a` used on both ranks, `b` on none, `c` on rank 1
/// only. In each mode (after backward, overlapped), with a bucket per
/// parameter and with one bucket for all, for two steps: `b` keeps an
/// undefined gradient on both ranks, `c` gets rank 1's gradient over 2 on
/// both (rank 0's missing one counts as zeros), `a` the plain average.
fn role_unused(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, HEALTHY_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let r = env.rank;
    if env.world_size != 2 {
        return Err("the unused-parameter role runs on 2 ranks".into());
    }
    let ga = |q: usize| Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0]) * (q + 1) as f64;
    let gc = Tensor::from_slice(&[5f32, 7.0]);
    let mut modes = Vec::new();
    for (overlap, bucket_mb) in [(false, 1e-9), (false, 25.0), (true, 1e-9), (true, 25.0)] {
        let f = |len: i64| Tensor::zeros([len], cpu(Kind::Float)).set_requires_grad(true);
        let mut params = vec![f(4), f(3), f(2)];
        let mut reducer = GradReducer::new(&params, bucket_mb).map_err(err)?;
        if overlap {
            reducer.overlap_with_backward(&pg).map_err(err)?;
        }
        let what = format!(
            "{}, {} bucket(s)",
            if overlap {
                "overlapped"
            } else {
                "after backward"
            },
            reducer.buckets().len()
        );
        for step in 1..=2 {
            zero_grads(&mut params);
            let mut loss = (&params[0] * ga(r)).sum(Kind::Float);
            if r == 1 {
                loss += (&params[2] * &gc).sum(Kind::Float);
            }
            loss.f_backward().map_err(|e| e.to_string())?;
            if r == 0 && params[2].grad().defined() && step == 1 {
                return Err(format!("{what}: rank 0 has c's gradient before reduce"));
            }
            reducer.reduce(&pg).map_err(err)?;
            let at = format!("{what}, step {step}");
            let (a, b, c) = (params[0].grad(), params[1].grad(), params[2].grad());
            if b.defined() {
                return Err(format!(
                    "{at}: b, unused on both ranks, got a gradient {b:?}"
                ));
            }
            if !a.defined() || !c.defined() {
                return Err(format!("{at}: a or c has no gradient"));
            }
            expect_eq(
                &format!("{at}: a"),
                f32s(&a),
                f32s(&((ga(0) + ga(1)) / 2.0)),
            )?;
            expect_eq(&format!("{at}: c = (0 + g) / 2"), f32s(&c), vec![2.5, 3.5])?;
        }
        modes.push(what);
    }
    println!(
        "unused: b stays undefined, c = (0 + g) / 2 in {}",
        modes.join("; ")
    );
    Ok(())
}

fn role_broadcast(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, HEALTHY_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let r = env.rank as i64;
    let a = Tensor::full([3, 4], r as f64, cpu(Kind::Float)).set_requires_grad(true);
    let b = (Tensor::arange(5, cpu(Kind::Double)) * (r + 1) as f64).set_requires_grad(true);
    let c = Tensor::from_slice(&[r, r, r]);
    // A non-contiguous view (a transposed buffer).
    let d_storage = Tensor::full([4, 3], r as f64, cpu(Kind::Float));
    let d = d_storage.tr();
    let params = [a.shallow_clone(), b.shallow_clone(), c.shallow_clone(), d];
    broadcast_parameters(&pg, &params).map_err(err)?;
    expect_eq("a from rank 0", f32s(&a), vec![0.0; 12])?;
    expect_eq(
        "b from rank 0",
        Vec::<f64>::try_from(&b).expect("f64"),
        vec![0.0, 1.0, 2.0, 3.0, 4.0],
    )?;
    expect_eq("c from rank 0", i64s(&c), vec![0, 0, 0])?;
    expect_eq("d from rank 0", f32s(&d_storage), vec![0.0; 12])?;
    if !a.requires_grad() || !a.is_leaf() || a.grad().defined() {
        return Err("a is no longer a leaf parameter without gradient".into());
    }

    let me_only = agree_any(&pg, r == 1).map_err(err)?;
    let nobody = agree_any(&pg, false).map_err(err)?;
    let everyone = agree_any(&pg, true).map_err(err)?;
    expect_eq("agree_any (rank 1 only)", me_only, true)?;
    expect_eq("agree_any (nobody)", nobody, false)?;
    expect_eq("agree_any (everyone)", everyone, true)?;
    Ok(())
}

fn role_heartbeat_dead(env: &LaunchEnv, dead: usize) -> Result<(), String> {
    let (store, pg) = setup(env, FAULT_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let beat = Heartbeat::start(&store, env.rank, Duration::from_millis(100)).map_err(err)?;
    beat.progress(7);
    let mut t = [Tensor::ones([8], cpu(Kind::Float))];
    pg.all_reduce_sum(&mut t)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    // Both heartbeats are up, and have published step 7 (the beat after
    // `progress`, which a loaded machine may delay), before anyone leaves.
    store
        .wait(&["alive/0", "alive/1"], HEALTHY_TIMEOUT)
        .map_err(err)?;
    let published = Instant::now();
    for rank in 0..2 {
        let key = format!("alive/{rank}");
        while !String::from_utf8_lossy(&store.get(&key, HEALTHY_TIMEOUT).map_err(err)?)
            .contains("step=7 ")
        {
            if published.elapsed() > HEALTHY_TIMEOUT {
                return Err(format!("rank {rank}'s heartbeat never published step 7"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    pg.barrier().map_err(err)?;
    if env.rank == dead {
        std::process::exit(0);
    }
    let failure = match pg.all_reduce_sum(&mut t).and_then(|w| w.wait()) {
        Ok(()) => return Err("the all_reduce with a dead peer succeeded".into()),
        Err(e) => e,
    };
    // A stale limit of 1 s: poll until the dead rank's beat is that old.
    let start = Instant::now();
    let stale = Duration::from_secs(1);
    let want = if dead == 0 {
        "rank 0 has probably exited"
    } else {
        "rank 1 stopped responding"
    };
    loop {
        let diagnosis = diagnose(&store, 2, stale);
        if diagnosis.contains(want) {
            if dead == 1 && (diagnosis.contains("rank 0") || !diagnosis.contains("step 7")) {
                return Err(format!(
                    "the diagnosis also blames rank 0 or lacks the step: {diagnosis}"
                ));
            }
            println!("diagnosed: {failure}; {diagnosis}");
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(8) {
            return Err(format!(
                "the diagnosis never named rank {dead}: {diagnosis}"
            ));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn role_heartbeat_hung(env: &LaunchEnv) -> Result<(), String> {
    let (store, pg) = setup(env, FAULT_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let beat = Heartbeat::start(&store, env.rank, Duration::from_millis(100)).map_err(err)?;
    beat.progress(7);
    let mut t = [Tensor::ones([8], cpu(Kind::Float))];
    // Collectives #1 and #2.
    pg.all_reduce_sum(&mut t)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    pg.barrier().map_err(err)?;
    let act = pg.activity();
    if act.entered != 2 || act.waiting.is_some() || act.last.map(|l| l.op) != Some(Op::Barrier) {
        return Err(format!("activity after a barrier: {act:?}"));
    }
    if env.rank == 2 {
        // Alive, beating, and stuck "in compute" (no collective) until the
        // others have diagnosed.
        let _ = store.wait(&["diagnosed/0", "diagnosed/1"], HEALTHY_TIMEOUT);
        std::process::exit(0);
    }
    // #3, which rank 2 never joins.
    let failure = match pg.all_reduce_sum(&mut t).and_then(|w| w.wait()) {
        Ok(()) => return Err("the all_reduce with a hung peer succeeded".into()),
        Err(e) => e,
    };
    let act = pg.activity();
    match act.waiting {
        Some(w) if w.seq == 3 && w.op == Op::AllReduce && act.entered == 3 => {}
        _ => return Err(format!("activity after the timeout: {act:?}")),
    }
    // The heartbeats publish the counts within one interval.
    thread::sleep(Duration::from_millis(300));
    let diagnosis = diagnose(&store, 3, Duration::from_secs(1));
    let want = "rank 2 is alive but has not joined all_reduce #3 that the other ranks are \
                waiting in (waiting for ";
    if !diagnosis.starts_with(want)
        || !diagnosis.contains("it is 1 collective behind; its last was barrier #2")
        || !diagnosis.contains("last finished step 7")
        || diagnosis.contains("rank 0 ")
        || diagnosis.contains("rank 1 ")
    {
        return Err(format!("unexpected diagnosis: {diagnosis}"));
    }
    println!("diagnosed: {failure}; {diagnosis}");
    // Both keep beating until both have diagnosed (a stopped heartbeat
    // reads as "has left"); rank 0, which serves the store, leaves last.
    store
        .set(&format!("diagnosed/{}", env.rank), b"1")
        .map_err(err)?;
    store
        .wait(&["diagnosed/0", "diagnosed/1"], HEALTHY_TIMEOUT)
        .map_err(err)?;
    if env.rank == 0 {
        thread::sleep(Duration::from_millis(300));
    }
    drop(beat);
    Ok(())
}

fn role_agent(env: &LaunchEnv) -> Result<(), String> {
    let err = |e: DistError| e.to_string();
    if !env.agent_store || env.restart_count != Some(1) {
        return Err(format!(
            "the launch environment misses the agent store: {env:?}"
        ));
    }
    let store = Store::from_launch(env, HEALTHY_TIMEOUT).map_err(err)?;
    if store.server() != StoreServer::External {
        return Err("rank connected as if rank 0 served the store".into());
    }
    if store.check(&["stale"]).map_err(err)? {
        return Err("attempt 0's keys are visible".into());
    }
    let pg = ProcessGroup::gloo(&store, env.rank, env.world_size, HEALTHY_TIMEOUT).map_err(err)?;
    let beat = Heartbeat::start(&store, env.rank, Duration::from_millis(100)).map_err(err)?;
    let mut t = [Tensor::ones([4], cpu(Kind::Float))];
    pg.all_reduce_sum(&mut t)
        .map_err(err)?
        .wait()
        .map_err(err)?;
    expect_eq("all_reduce", f32s(&t[0]), vec![2.0; 4])?;
    // Both heartbeats of this attempt are up: nobody has "left".
    store
        .wait(&["alive/0", "alive/1"], HEALTHY_TIMEOUT)
        .map_err(err)?;
    let diagnosis = diagnose(&store, 2, Duration::from_secs(5));
    if !diagnosis.starts_with("every rank's heartbeat is fresh") {
        return Err(format!(
            "attempt 0's keys leak into the diagnosis: {diagnosis}"
        ));
    }
    pg.barrier().map_err(err)?;
    store
        .set(&format!("done/{}", env.rank), b"1")
        .map_err(err)?;
    drop(beat);
    println!("agent: {diagnosis}");
    Ok(())
}

/// Bytes received on the loopback interface so far (Linux), to count what
/// the collectives really move.
fn loopback_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    line.split_once(':')?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn role_timing(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, Duration::from_secs(120))?;
    let err = |e: DistError| e.to_string();
    let (layers, width, batch) = (10i64, 1024i64, 16i64);
    let env_or = |var: &str, default: f64| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(default)
    };
    let reps = env_or("REPS", 5.0) as usize;
    let bucket_mb = env_or("BUCKET_MB", 25.0);
    tch::manual_seed(0);
    let mut params = Vec::new();
    for _ in 0..layers {
        params
            .push((Tensor::randn([width, width], cpu(Kind::Float)) * 0.03).set_requires_grad(true));
        params.push(Tensor::zeros([width], cpu(Kind::Float)).set_requires_grad(true));
    }
    let numel: i64 = params.iter().map(|p| p.numel() as i64).sum();
    let input = Tensor::randn([batch, width], cpu(Kind::Float));
    let backward = |params: &[Tensor]| -> Result<(), String> {
        let mut h = input.shallow_clone();
        for l in 0..layers as usize {
            h = (h.matmul(&params[2 * l]) + &params[2 * l + 1]).tanh();
        }
        h.sum(Kind::Float).f_backward().map_err(|e| e.to_string())
    };
    let mut reducer = GradReducer::new(&params, bucket_mb).map_err(err)?;
    let secs = |t: Instant| t.elapsed().as_secs_f64();
    let run = |reducer: &GradReducer, params: &mut [Tensor]| -> Result<(f64, f64), String> {
        zero_grads(params);
        pg.barrier().map_err(err)?;
        let t = Instant::now();
        backward(params)?;
        let b = secs(t);
        let t = Instant::now();
        reducer.reduce(&pg).map_err(err)?;
        Ok((b, secs(t)))
    };
    run(&reducer, &mut params)?; // warm-up
    let (mut ab, mut ar) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let (b, r) = run(&reducer, &mut params)?;
        ab.push(b);
        ar.push(r);
    }
    reducer.overlap_with_backward(&pg).map_err(err)?;
    run(&reducer, &mut params)?; // warm-up
    let (mut ob, mut or) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let (b, r) = run(&reducer, &mut params)?;
        ob.push(b);
        or.push(r);
    }
    let overlapped = reducer.last_overlapped_buckets();
    reducer.stop_overlap();
    // Backward alone, with nothing reducing.
    let mut bare = Vec::new();
    for _ in 0..reps {
        zero_grads(&mut params);
        pg.barrier().map_err(err)?;
        let t = Instant::now();
        backward(&params)?;
        bare.push(secs(t));
    }
    // A plain all-reduce of the same bytes in one buffer, and of the base
    // preset's gradient bytes (BASE_PARAMS floats, if set).
    let mut one = [Tensor::ones([numel], cpu(Kind::Float))];
    let mut flat = Vec::new();
    let mut wire = Vec::new();
    for _ in 0..reps {
        pg.barrier().map_err(err)?;
        let before = loopback_bytes();
        let t = Instant::now();
        pg.all_reduce_sum(&mut one)
            .map_err(err)?
            .wait()
            .map_err(err)?;
        flat.push(secs(t));
        // Both ranks have finished sending once the next barrier passes.
        pg.barrier().map_err(err)?;
        if let (Some(a), Some(b)) = (before, loopback_bytes()) {
            wire.push(b.saturating_sub(a) as f64);
        }
    }
    let ms = |v: f64| v * 1e3;
    let mb = numel as f64 * 4.0 / 1e6;
    println!(
        "timing: {numel} fp32 gradients ({mb:.1} MB) in {} buckets of <= {bucket_mb} MiB, {} ranks, medians of {reps}",
        reducer.buckets().len(),
        env.world_size
    );
    let total = |b: &[f64], r: &[f64]| median(b.iter().zip(r).map(|(b, r)| b + r).collect());
    println!(
        "timing: backward alone                    {:8.1} ms",
        ms(median(bare))
    );
    println!(
        "timing: after backward:  backward {:8.1} ms + reduce {:8.1} ms = {:8.1} ms",
        ms(median(ab.clone())),
        ms(median(ar.clone())),
        ms(total(&ab, &ar))
    );
    println!(
        "timing: overlapped:      backward {:8.1} ms + finish {:8.1} ms = {:8.1} ms ({overlapped} of {} buckets started in backward)",
        ms(median(ob.clone())),
        ms(median(or.clone())),
        ms(total(&ob, &or)),
        reducer.buckets().len()
    );
    let fm = median(flat);
    let n = env.world_size as f64;
    println!(
        "timing: one flat all_reduce of {mb:.1} MB  {:8.1} ms: bus bandwidth 2(n-1)/n x bytes / time = {:.2} GB/s",
        ms(fm),
        2.0 * (n - 1.0) / n * mb / 1e3 / fm
    );
    if !wire.is_empty() {
        // Each rank sends 2(n-1)/n x bytes in a ring all-reduce; loopback
        // carries every rank's traffic once (other processes' too).
        let predicted = n * 2.0 * (n - 1.0) / n * mb;
        println!(
            "timing: loopback bytes per flat all_reduce: {:.1} MB measured (median; all processes), \
             {predicted:.1} MB predicted (n x 2(n-1)/n x {mb:.1} MB)",
            median(wire) / 1e6
        );
    }
    if let Some(base) = std::env::var("BASE_PARAMS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
    {
        let mut big = [Tensor::ones([base], cpu(Kind::Float))];
        let mut v = Vec::new();
        for _ in 0..3 {
            pg.barrier().map_err(err)?;
            let t = Instant::now();
            pg.all_reduce_sum(&mut big)
                .map_err(err)?
                .wait()
                .map_err(err)?;
            v.push(secs(t));
        }
        let bm = median(v);
        let bmb = base as f64 * 4.0 / 1e6;
        println!(
            "timing: one flat all_reduce of {bmb:.1} MB (BASE_PARAMS) {:8.1} ms: bus bandwidth {:.2} GB/s",
            ms(bm),
            2.0 * (n - 1.0) / n * bmb / 1e3 / bm
        );
    }
    Ok(())
}

/// A residual layer with dropout: `x + dropout(tanh(x w + b), 0.2)`.
fn checkpoint_layer(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    x + (x.matmul(w) + b).tanh().dropout(0.2, true)
}

/// Four layers, plain and then checkpointed (`vlmatch_dist::checkpoint`),
/// from the same weights and random draws, under the reducer's hooks with
/// small buckets (one per layer), over two accumulated micro-steps (the first without
/// sync): the averaged gradients agree within 1e-6, and the hooks start at
/// least as many buckets during backward with checkpointing as without
/// (checkpointed layers hand their parameters' gradients to the outer
/// backward, whose accumulation fires the hooks).
fn role_checkpoint(env: &LaunchEnv) -> Result<(), String> {
    let (_store, pg) = setup(env, HEALTHY_TIMEOUT)?;
    let err = |e: DistError| e.to_string();
    let mut runs = Vec::new();
    for checkpointed in [false, true] {
        tch::manual_seed(3);
        let params: Vec<Tensor> = (0..4)
            .flat_map(|_| {
                [
                    (Tensor::randn([16, 16], cpu(Kind::Float)) * 0.25).set_requires_grad(true),
                    Tensor::zeros([16], cpu(Kind::Float)).set_requires_grad(true),
                ]
            })
            .collect();
        let mut reducer = GradReducer::new(&params, 100.0 / (1024.0 * 1024.0)).map_err(err)?;
        reducer.overlap_with_backward(&pg).map_err(err)?;
        for k in 0..2 {
            reducer.set_sync(k == 1);
            tch::manual_seed(10 + 2 * env.rank as i64 + k);
            let mut h = Tensor::randn([6, 16], cpu(Kind::Float));
            for l in 0..4 {
                let (w, b) = (
                    params[2 * l].shallow_clone(),
                    params[2 * l + 1].shallow_clone(),
                );
                h = if checkpointed {
                    let (wc, bc) = (w.shallow_clone(), b.shallow_clone());
                    vlmatch_dist::checkpoint::checkpoint(
                        &[h],
                        &[w, b],
                        Box::new(move |t: &[Tensor]| checkpoint_layer(&t[0], &wc, &bc)),
                    )
                    .map_err(|e| e.to_string())?
                } else {
                    checkpoint_layer(&h, &w, &b)
                };
            }
            (&h * &h)
                .sum(Kind::Float)
                .f_backward()
                .map_err(|e| e.to_string())?;
        }
        reducer.reduce(&pg).map_err(err)?;
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
        runs.push((
            grads,
            reducer.last_overlapped_buckets(),
            reducer.buckets().len(),
        ));
    }
    let (plain, ckpt) = (&runs[0], &runs[1]);
    let d = plain
        .0
        .iter()
        .zip(&ckpt.0)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f64::max);
    if d > 1e-6 {
        return Err(format!("checkpointed gradients differ by {d}"));
    }
    if plain.1 == 0 || ckpt.1 < plain.1 {
        return Err(format!(
            "buckets started during backward: {} plain, {} checkpointed",
            plain.1, ckpt.1
        ));
    }
    println!(
        "checkpoint: {} buckets; started during backward: {} plain, {} checkpointed; \
         gradients differ by {d:e}",
        plain.2, plain.1, ckpt.1
    );
    Ok(())
}
