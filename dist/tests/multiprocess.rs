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
use vlmatch_dist::{DistCollective, DistError, LaunchEnv, Op, ProcessGroup, Store};

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
        ("dead_worker_fails_the_master_wait", || dead_rank(1), false),
        ("dead_master_fails_the_worker_wait", || dead_rank(0), false),
        ("hung_rank_times_out", hung_rank, false),
        ("missing_rank_fails_rendezvous", missing_rank, false),
        ("nccl_group", nccl_group, false),
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
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    ranks
        .iter()
        .map(|&rank| {
            let mut child = Command::new(&exe)
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
    println!("nccl: one-rank all_reduce and all_gather on cuda:0 ok");
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
