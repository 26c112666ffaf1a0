//! Stop requests by signal. SIGTERM (what Slurm and Kubernetes send before
//! they kill a job) or SIGINT sets a flag: training then saves a checkpoint
//! at the next step boundary (agreed among ranks) and stops with
//! [`vlmatch_core::Error::Stopped`], exit status 128 + the signal. A second
//! signal ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use vlmatch_core::{Error, Result};

#[derive(Clone)]
pub struct StopSignal {
    /// Any stop signal arrived.
    any: Arc<AtomicBool>,
    /// SIGINT arrived (else it was SIGTERM).
    interrupt: Arc<AtomicBool>,
}

impl StopSignal {
    /// The process's handlers, installed on first use.
    pub fn install() -> Result<StopSignal> {
        static FLAGS: OnceLock<StopSignal> = OnceLock::new();
        if let Some(s) = FLAGS.get() {
            return Ok(s.clone());
        }
        let s = StopSignal {
            any: Arc::new(AtomicBool::new(false)),
            interrupt: Arc::new(AtomicBool::new(false)),
        };
        use signal_hook::consts::{SIGINT, SIGTERM};
        let io = |e| Error::io("signal handler", e);
        for signal in [SIGTERM, SIGINT] {
            // The conditional shutdown is registered first, so it sees the
            // flag as it was before this signal set it.
            signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, s.any.clone())
                .and_then(|_| signal_hook::flag::register(signal, s.any.clone()))
                .map_err(io)?;
        }
        signal_hook::flag::register(SIGINT, s.interrupt.clone()).map_err(io)?;
        Ok(FLAGS.get_or_init(|| s).clone())
    }

    pub fn requested(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Forget earlier requests (a new training run in the same process).
    pub fn clear(&self) {
        self.any.store(false, Ordering::Relaxed);
        self.interrupt.store(false, Ordering::Relaxed);
    }

    /// The signal that asked to stop.
    pub fn signal(&self) -> i32 {
        if self.interrupt.load(Ordering::Relaxed) {
            signal_hook::consts::SIGINT
        } else {
            signal_hook::consts::SIGTERM
        }
    }
}

/// `SIGTERM`, `SIGINT`.
pub fn name(signal: i32) -> &'static str {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
