//! `cargo xtask train --nproc-per-node N`: N local ranks of the vlmatch
//! binary, as `torchrun --nproc-per-node N --no-python vlmatch train ...`
//! would start them, without needing torchrun.
//!
//! Each rank gets torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT`) and
//! `GLOO_SOCKET_IFNAME=lo` unless set (all ranks are on this machine). Each
//! stderr line is prefixed with `[rank r]`; stdout is passed through. When a
//! rank fails, the others get a grace period to stop by themselves (their
//! next collective fails and they exit with an error naming the rank), then
//! are killed; the launcher fails naming the first rank that failed.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long the other ranks may take to stop after one failed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What `train` was asked for: the launcher's own options, taken out of the
/// arguments, and the rest for `vlmatch train`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchArgs {
    pub nproc: Option<usize>,
    pub grace: Duration,
    pub rest: Vec<String>,
}

/// Splits `--nproc-per-node N` (or `=N`) and `--grace-secs S` off the
/// arguments of `cargo xtask train`.
pub fn parse_args(args: &[String]) -> Result<LaunchArgs, String> {
    let mut out = LaunchArgs {
        nproc: None,
        grace: DEFAULT_GRACE,
        rest: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "--nproc-per-node" | "--nproc_per_node" => {
                let v = value("--nproc-per-node")?;
                let n =
                    v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        format!("--nproc-per-node {v}: expected a positive integer")
                    })?;
                out.nproc = Some(n);
            }
            "--grace-secs" => {
                let v = value("--grace-secs")?;
                let s = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| format!("--grace-secs {v}: expected seconds"))?;
                out.grace = Duration::from_secs_f64(s);
            }
            _ => out.rest.push(arg.clone()),
        }
    }
    Ok(out)
}

/// A loopback port nothing listens on right now, for rank 0's store.
pub fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// Copies `input` to `out` line by line, each line prefixed with `prefix`
/// unless it starts with it already. Bytes that are not UTF-8 pass through
/// unchanged; a last line without a newline gets one.
pub fn prefix_lines(input: impl Read, prefix: &str, mut out: impl Write) {
    let mut reader = BufReader::new(input);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                let mut text = Vec::with_capacity(prefix.len() + line.len());
                // vlmatch's own log lines of a rank may carry the prefix
                // already.
                if !line.starts_with(prefix.as_bytes()) {
                    text.extend_from_slice(prefix.as_bytes());
                }
                text.extend_from_slice(&line);
                // One write per line, so lines of different ranks never mix.
                let _ = out.write_all(&text);
                let _ = out.flush();
            }
        }
    }
}

/// How a launch ended.
#[derive(Debug)]
pub struct Outcome {
    /// Each rank's exit status (a killed rank's is the kill's).
    pub statuses: Vec<ExitStatus>,
    /// The first rank seen failing, if any.
    pub first_failed: Option<usize>,
    /// Ranks still running after the grace period, which were killed.
    pub killed: Vec<usize>,
}

impl Outcome {
    /// `Ok` when every rank succeeded, else the message naming the first
    /// failed rank.
    pub fn result(&self) -> Result<(), String> {
        let Some(first) = self.first_failed else {
            return Ok(());
        };
        let mut msg = format!(
            "rank {first} of {} failed first ({}); its `[rank {first}]` lines above say why",
            self.statuses.len(),
            self.statuses[first]
        );
        let others: Vec<String> = self
            .statuses
            .iter()
            .enumerate()
            .filter(|(r, s)| *r != first && !s.success() && !self.killed.contains(r))
            .map(|(r, s)| format!("rank {r} ({s})"))
            .collect();
        if !others.is_empty() {
            msg.push_str(&format!("; then {} failed", others.join(", ")));
        }
        if !self.killed.is_empty() {
            let killed: Vec<String> = self.killed.iter().map(|r| r.to_string()).collect();
            msg.push_str(&format!(
                "; rank(s) {} did not stop within the grace period and were killed",
                killed.join(", ")
            ));
        }
        Err(msg)
    }
}

/// Starts `nproc` ranks of `program args...` in `cwd` on this machine
/// with torchrun's environment plus `extra_env`, waits for all of them, and
/// handles a failure as the module says.
pub fn run_local(
    program: &Path,
    cwd: &Path,
    args: &[String],
    nproc: usize,
    grace: Duration,
    extra_env: &[(String, OsString)],
) -> Result<Outcome, String> {
    let port = free_port()?;
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    let mut pumps = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(program);
        cmd.current_dir(cwd)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        if std::env::var_os("GLOO_SOCKET_IFNAME").is_none() {
            cmd.env("GLOO_SOCKET_IFNAME", "lo");
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for c in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(format!(
                    "cannot start rank {rank} ({}): {e}",
                    program.display()
                ));
            }
        };
        let stderr = child.stderr.take().expect("piped stderr");
        let prefix = format!("[rank {rank}] ");
        pumps.push(thread::spawn(move || {
            prefix_lines(stderr, &prefix, std::io::stderr())
        }));
        children.push(child);
    }

    let mut statuses: Vec<Option<ExitStatus>> = vec![None; nproc];
    let mut first_failed = None;
    let mut deadline: Option<Instant> = None;
    let mut killed = Vec::new();
    while statuses.iter().any(Option::is_none) {
        for (rank, child) in children.iter_mut().enumerate() {
            if statuses[rank].is_some() {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    statuses[rank] = Some(status);
                    if !status.success() && first_failed.is_none() {
                        first_failed = Some(rank);
                        deadline = Some(Instant::now() + grace);
                        if statuses.iter().any(Option::is_none) {
                            eprintln!(
                                "xtask: rank {rank} failed ({status}); giving the other ranks \
                                 {:.0} s to stop",
                                grace.as_secs_f64()
                            );
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(format!("cannot wait for rank {rank}: {e}")),
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            for (rank, child) in children.iter_mut().enumerate() {
                if statuses[rank].is_none() {
                    let _ = child.kill();
                    killed.push(rank);
                    statuses[rank] = Some(
                        child
                            .wait()
                            .map_err(|e| format!("cannot wait for rank {rank}: {e}"))?,
                    );
                }
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    for (rank, pump) in pumps.into_iter().enumerate() {
        // A killed rank's children may still hold its stderr open: do not
        // wait for them.
        if !killed.contains(&rank) {
            let _ = pump.join();
        }
    }
    Ok(Outcome {
        statuses: statuses
            .into_iter()
            .map(|s| s.expect("every rank ended"))
            .collect(),
        first_failed,
        killed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn launcher_options_are_taken_out() {
        let a = parse_args(&strings(&[
            "--nproc-per-node",
            "4",
            "--set",
            "train.steps=3",
            "--grace-secs=2.5",
        ]))
        .unwrap();
        assert_eq!(a.nproc, Some(4));
        assert_eq!(a.grace, Duration::from_millis(2500));
        assert_eq!(a.rest, strings(&["--set", "train.steps=3"]));
        let b = parse_args(&strings(&["--nproc-per-node=2", "--run-dir", "x"])).unwrap();
        assert_eq!(b.nproc, Some(2));
        assert_eq!(b.rest, strings(&["--run-dir", "x"]));
        let c = parse_args(&strings(&["--set", "a=b=c"])).unwrap();
        assert_eq!(c.nproc, None);
        assert_eq!(c.rest, strings(&["--set", "a=b=c"]));
        assert!(parse_args(&strings(&["--nproc-per-node", "0"])).is_err());
        assert!(parse_args(&strings(&["--nproc-per-node"])).is_err());
    }

    #[test]
    fn lines_get_their_prefix() {
        let mut out = Vec::new();
        prefix_lines(
            &b"one\n[rank 3] two\n\n[rank 1] x\nlast"[..],
            "[rank 3] ",
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[rank 3] one\n[rank 3] two\n[rank 3] \n[rank 3] [rank 1] x\n[rank 3] last\n"
        );
    }

    /// A shell script as the "program": rank 1 fails at once, rank 0 would
    /// run for a minute and is killed after the grace period.
    #[test]
    fn a_failed_rank_ends_the_launch_and_is_named() {
        let start = Instant::now();
        let script = "if [ \"$RANK\" = 1 ]; then echo boom >&2; exit 3; fi; exec sleep 60";
        let outcome = run_local(
            Path::new("sh"),
            &std::env::temp_dir(),
            &strings(&["-c", script]),
            2,
            Duration::from_millis(500),
            &[],
        )
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(20));
        assert_eq!(outcome.first_failed, Some(1));
        assert_eq!(outcome.killed, vec![0]);
        assert_eq!(outcome.statuses[1].code(), Some(3));
        let msg = outcome.result().unwrap_err();
        assert!(msg.starts_with("rank 1 of 2 failed first"), "{msg}");
        assert!(msg.contains("rank(s) 0 did not stop"), "{msg}");
    }

    /// Every rank sees torchrun's variables, one port for all.
    #[test]
    fn ranks_get_torchrun_variables() {
        let dir = std::env::temp_dir().join(format!("xtask-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR \
                      $MASTER_PORT $GLOO_SOCKET_IFNAME $EXTRA\" > \"$OUT/$RANK\"";
        let outcome = run_local(
            Path::new("sh"),
            &std::env::temp_dir(),
            &strings(&["-c", script]),
            3,
            Duration::from_secs(5),
            &[
                ("OUT".into(), dir.clone().into_os_string()),
                ("EXTRA".into(), "x".into()),
            ],
        )
        .unwrap();
        outcome.result().unwrap();
        let lines: Vec<Vec<String>> = (0..3)
            .map(|r| {
                std::fs::read_to_string(dir.join(r.to_string()))
                    .unwrap()
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            })
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        let port = &lines[0][5];
        for (r, l) in lines.iter().enumerate() {
            let want_ifname = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_else(|_| "lo".into());
            assert_eq!(
                l,
                &strings(&[
                    &r.to_string(),
                    "3",
                    &r.to_string(),
                    "3",
                    "127.0.0.1",
                    port,
                    &want_ifname,
                    "x"
                ])
            );
        }
    }
}
