//! The last line of defence: a panic that input validation missed (or a
//! libtorch error raised through one of tch's panicking, non-`f_` methods)
//! ends the CLI with one error line and [`EXIT_STATUS`], not a backtrace.
//!
//! [`install_hook`] replaces the default panic hook with one that records
//! the first panic of the process (message, location, thread, training
//! step) and prints nothing, unless `RUST_BACKTRACE` is set (not `0`), when
//! the default report with its backtrace is printed as well. [`catch`] runs
//! a command under `catch_unwind`: a panic on its thread, or a panic on
//! another thread (a data loader worker) followed by the command failing,
//! becomes a [`PanicReport`]. Nothing here runs per training step except
//! [`set_step`], one relaxed atomic store.

use std::fmt;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

/// The exit status of a run ended by a panic: `EX_SOFTWARE` of
/// `sysexits.h` (an internal software error), apart from config and data
/// errors (2), other errors (1) and signals (128 + N).
pub const EXIT_STATUS: u8 = 70;

/// What the hint says to do.
const HINT: &str = "this is a bug in vlmatch: rerun with RUST_BACKTRACE=1 and report it";

static FIRST: Mutex<Option<PanicReport>> = Mutex::new(None);
static STEP: AtomicI64 = AtomicI64::new(-1);

/// The training step in progress, for the report of a panic during it.
/// Cheap enough to call every step (one relaxed store).
pub fn set_step(step: i64) {
    STEP.store(step, Ordering::Relaxed);
}

/// A panic, as the one error line shows it.
#[derive(Debug, Clone)]
pub struct PanicReport {
    /// The panic message on one line (for a libtorch error, its first line).
    pub message: String,
    /// `file:line:column` of the panic.
    pub location: Option<String>,
    /// The panicking thread's name, when not `main`.
    pub thread: Option<String>,
    /// The training step in progress ([`set_step`]), if any.
    pub step: Option<i64>,
}

impl fmt::Display for PanicReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "internal error: {}", self.message)?;
        let mut at = Vec::new();
        if let Some(l) = &self.location {
            at.push(l.clone());
        }
        if let Some(t) = &self.thread {
            at.push(format!("thread `{t}`"));
        }
        if let Some(s) = self.step {
            at.push(format!("step {s}"));
        }
        if !at.is_empty() {
            write!(f, " ({})", at.join(", "))?;
        }
        write!(f, "; {HINT}")
    }
}

impl PanicReport {
    fn new(message: String, location: Option<String>) -> Self {
        let thread = std::thread::current()
            .name()
            .filter(|n| *n != "main")
            .map(str::to_string);
        let step = Some(STEP.load(Ordering::Relaxed)).filter(|&s| s >= 0);
        PanicReport {
            message: one_line(&message),
            location,
            thread,
            step,
        }
    }

    fn from_hook(info: &PanicHookInfo<'_>) -> Self {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        PanicReport::new(payload_text(info.payload()), location)
    }
}

/// A panic payload's message.
pub fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// One line of a panic message. tch's panicking methods unwrap a
/// `TchError` whose libtorch text runs over many lines (the C++ frames);
/// its first line is the message.
fn one_line(message: &str) -> String {
    const UNWRAP: &str = "on an `Err` value: ";
    let text = match message.find(UNWRAP) {
        Some(i) => {
            let value = &message[i + UNWRAP.len()..];
            match value
                .strip_prefix("Torch(\"")
                .and_then(|v| v.rfind("\")").map(|end| &v[..end]))
            {
                Some(inner) => format!("libtorch: {}", unescape_debug(inner)),
                None => message.to_string(),
            }
        }
        None => message.to_string(),
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    // A message of many lines keeps its first; a very long one is cut.
    let mut out: String = line.chars().take(600).collect();
    if out.len() < line.len() {
        out.push_str(" ...");
    }
    out
}

/// Undo `{:?}` escaping of a string's common escapes.
fn unescape_debug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The environment variable of the panic fault point (tests only): a
/// [`test_point`] whose name it holds panics, so tests can see a panic
/// reported as it would be.
pub const TEST_PANIC: &str = "VLMATCH_TEST_PANIC";

/// Panic here if [`TEST_PANIC`] names `point` (`cli`: before the command
/// runs; `loader`: on the data loader's thread as it starts). Not called per
/// step.
#[track_caller]
pub fn test_point(point: &str) {
    if cfg!(feature = "fault-injection") && std::env::var_os(TEST_PANIC).is_some_and(|v| v == point)
    {
        panic!("test panic at `{point}` ({TEST_PANIC})");
    }
}

fn backtrace_wanted() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

/// Replace the panic hook: record the first panic, print nothing (the
/// caller of [`catch`] prints the error line), unless `RUST_BACKTRACE` is
/// set, when the default hook's report and backtrace follow too.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let report = PanicReport::from_hook(info);
        if let Ok(mut first) = FIRST.lock() {
            first.get_or_insert(report);
        }
        if backtrace_wanted() {
            default(info);
        }
    }));
}

/// The first panic recorded by the hook, taken.
fn take_recorded() -> Option<PanicReport> {
    FIRST.lock().ok().and_then(|mut first| first.take())
}

/// Run `command`; a panic in it, or the command failing after a panic on
/// another of the process's threads (which it then reports as an error of
/// its own, e.g. "the data loader stopped"), is `Err(report)`. A panic on
/// another thread that the command survived is logged as a warning.
pub fn catch<T, E>(command: impl FnOnce() -> Result<T, E>) -> Result<Result<T, E>, PanicReport> {
    match std::panic::catch_unwind(AssertUnwindSafe(command)) {
        Ok(Ok(value)) => {
            if let Some(p) = take_recorded() {
                tracing::warn!("{p}");
            }
            Ok(Ok(value))
        }
        Ok(Err(e)) => match take_recorded() {
            Some(p) => Err(p),
            None => Ok(Err(e)),
        },
        Err(payload) => Err(take_recorded()
            .unwrap_or_else(|| PanicReport::new(payload_text(payload.as_ref()), None))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libtorch_error_keeps_its_first_line() {
        let m = "called `Result::unwrap()` on an `Err` value: Torch(\"mat1 and mat2 shapes \
                 cannot be multiplied (2x3 and 4x5)\\nException raised from meta at \
                 /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:192\\nframe #0: c10::Error\")";
        assert_eq!(
            one_line(m),
            "libtorch: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"
        );
        assert_eq!(one_line("line one\nline two"), "line one");
        assert_eq!(
            one_line("called `Option::unwrap()` on a `None` value"),
            "called `Option::unwrap()` on a `None` value"
        );
    }

    #[test]
    fn the_report_is_one_line_with_location_step_and_hint() {
        let r = PanicReport {
            message: "attempt to divide by zero".into(),
            location: Some("src/x.rs:1:2".into()),
            thread: Some("vlmatch-loader".into()),
            step: Some(7),
        };
        let s = r.to_string();
        assert_eq!(
            s,
            format!(
                "internal error: attempt to divide by zero (src/x.rs:1:2, thread `vlmatch-loader`, \
                 step 7); {HINT}"
            )
        );
        assert!(!s.contains('\n'));
    }

    #[test]
    fn catch_turns_a_panic_into_a_report() {
        // Without the hook installed (tests share the process): the payload.
        let r: Result<Result<(), ()>, PanicReport> = catch(|| std::panic::panic_any("boom"));
        let report = r.unwrap_err();
        assert_eq!(report.message, "boom");
        assert_eq!(catch(|| Ok::<_, ()>(3)).unwrap(), Ok(3));
    }
}
