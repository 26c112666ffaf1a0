//! Faults injected on purpose, for the fault tests: a rank killed, hung,
//! sent SIGTERM or fed a NaN loss at a chosen step (`vlmatch train
//! --fault`, hidden), and a checkpoint write cut short at a chosen byte
//! ([`CHECKPOINT_FAULT`]).

use std::time::Duration;

/// A failure injected for the fault tests (`vlmatch train --fault
/// RANK:STEP:kill|hang|term|nan`, hidden): right after finishing step
/// `step`, rank `rank` kills itself (SIGKILL, as the out-of-memory killer
/// or a failed node would), stops progressing while staying alive, or sends
/// itself SIGTERM (as Slurm or Kubernetes do before a kill); or step `step`
/// has a NaN loss on that rank, as a diverging step would. Also without a
/// launcher, as rank 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    pub step: i64,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Kill,
    Hang,
    Term,
    Nan,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Fault, String> {
        let bad =
            || format!("--fault `{s}`: expected RANK:STEP:KIND, KIND one of kill, hang, term, nan");
        let mut it = s.split(':');
        let (Some(rank), Some(step), Some(kind), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        Ok(Fault {
            rank: rank.parse().map_err(|_| bad())?,
            step: step.parse().map_err(|_| bad())?,
            kind: match kind {
                "kill" => FaultKind::Kill,
                "hang" => FaultKind::Hang,
                "term" => FaultKind::Term,
                "nan" => FaultKind::Nan,
                _ => return Err(bad()),
            },
        })
    }
}

impl Fault {
    /// The step (counted from 0) whose loss is to be NaN on `rank`.
    pub fn nan_step(&self, rank: usize) -> Option<i64> {
        (self.kind == FaultKind::Nan && self.rank == rank).then_some(self.step - 1)
    }

    /// Acts if `rank` just finished this fault's step.
    pub fn strike(&self, rank: usize, step: i64) {
        if rank != self.rank || step != self.step {
            return;
        }
        match self.kind {
            FaultKind::Hang => {
                tracing::warn!(rank, step, "fault injection: hanging");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            FaultKind::Term => {
                tracing::warn!(rank, step, "fault injection: SIGTERM");
                // SAFETY: kill(2) on our own pid; the trainer's handler sets
                // its stop flag and training goes on to the agreed stop.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGTERM);
                }
                return;
            }
            FaultKind::Kill => {}
            // Acts inside the step ([`Fault::nan_step`]).
            FaultKind::Nan => return,
        }
        tracing::warn!(rank, step, "fault injection: SIGKILL");
        // SAFETY: kill(2) on our own pid; nothing runs after it.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        unreachable!("killed");
    }
}

/// The environment variable of the checkpoint-write fault point (tests
/// only): `STEP:BYTES:fail` makes the write of step `STEP`'s checkpoint
/// stop after `BYTES` bytes with an I/O error, as a full disk would;
/// `STEP:BYTES:abort` kills the process (SIGKILL) at that byte, as a
/// power cut or the out-of-memory killer would.
pub const CHECKPOINT_FAULT: &str = "VLMATCH_TEST_CHECKPOINT_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFault {
    pub step: i64,
    pub bytes: u64,
    pub abort: bool,
}

impl WriteFault {
    /// The fault point's setting, if any; a malformed one is ignored with
    /// a warning (it is not a user setting).
    pub fn from_env() -> Option<WriteFault> {
        if !cfg!(feature = "fault-injection") {
            return None;
        }
        let v = std::env::var(CHECKPOINT_FAULT).ok()?;
        let parsed = (|| {
            let mut it = v.split(':');
            let step = it.next()?.parse().ok()?;
            let bytes = it.next()?.parse().ok()?;
            let abort = match it.next()? {
                "fail" => false,
                "abort" => true,
                _ => return None,
            };
            it.next()
                .is_none()
                .then_some(WriteFault { step, bytes, abort })
        })();
        if parsed.is_none() {
            tracing::warn!("{CHECKPOINT_FAULT}={v} ignored: expected STEP:BYTES:fail|abort");
        }
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(
            "1:6:kill".parse::<Fault>(),
            Ok(Fault {
                rank: 1,
                step: 6,
                kind: FaultKind::Kill
            })
        );
        assert_eq!("1:6:hang".parse::<Fault>().unwrap().kind, FaultKind::Hang);
        assert_eq!("0:3:term".parse::<Fault>().unwrap().kind, FaultKind::Term);
        let nan = "0:3:nan".parse::<Fault>().unwrap();
        assert_eq!((nan.nan_step(0), nan.nan_step(1)), (Some(2), None));
        assert!("1:6".parse::<Fault>().is_err());
        assert!("1:6:explode".parse::<Fault>().is_err());
    }
}
