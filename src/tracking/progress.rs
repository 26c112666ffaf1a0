//! The training progress display: on a terminal an indicatif bar with the
//! step, steps per second, the ETA, the loss and the newest held-out
//! numbers; elsewhere (CI, Slurm logs, `2> file`) one plain line per
//! logging step instead of a bar redrawn in place.

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    bar: ProgressBar,
    /// Print plain lines at logging steps (stderr is not a terminal).
    plain: bool,
    total: i64,
    start_step: i64,
    started: Instant,
    loss: Option<f64>,
    heldout: Option<String>,
}

impl Progress {
    /// `enabled`: rank 0 without `--quiet`. `start_step`: where this
    /// invocation starts (a resumed run's speed counts its own steps only).
    pub fn new(enabled: bool, start_step: i64, total: i64) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = if enabled && terminal {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:20} step {pos}/{len} {rate} ETA {eta} {msg}",
            )
            .expect("valid template")
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.2} steps/s", s.per_sec());
            }),
        );
        // A resumed run's bar starts at its step; its speed counts from here.
        bar.set_position(start_step as u64);
        bar.reset_eta();
        Progress {
            bar,
            plain: enabled && !terminal,
            total,
            start_step,
            started: Instant::now(),
            loss: None,
            heldout: None,
        }
    }

    /// The step just finished.
    pub fn set_position(&self, step: i64) {
        self.bar.set_position(step as u64);
    }

    /// A logging step's loss and learning rate; prints the plain line.
    pub fn logged(&mut self, step: i64, loss: f64, lr: f64) {
        self.loss = Some(loss);
        self.bar.set_message(self.message());
        if self.plain {
            let done = (step - self.start_step).max(0) as f64;
            let secs = self.started.elapsed().as_secs_f64();
            let rate = if secs > 0.0 { done / secs } else { 0.0 };
            let eta = if rate > 0.0 {
                hms((self.total - step).max(0) as f64 / rate)
            } else {
                "?".into()
            };
            eprintln!(
                "step {step}/{} {rate:.2} steps/s ETA {eta} loss {loss:.4} lr {lr:.2e}{}",
                self.total,
                self.heldout.as_deref().unwrap_or_default(),
            );
        }
    }

    /// The newest held-out evaluation: on the bar at once, in the plain
    /// lines from the next logging step.
    pub fn heldout(&mut self, step: i64, i2t_r1: f64, itm_acc: f64) {
        self.heldout = Some(format!(
            " | held-out@{step}: i2t R@1 {:.1}% ITM {:.1}%",
            100.0 * i2t_r1,
            100.0 * itm_acc
        ));
        self.bar.set_message(self.message());
    }

    /// The bar's message: the newest loss and held-out numbers.
    fn message(&self) -> String {
        let loss = self.loss.unwrap_or(f64::NAN);
        format!(
            "loss {loss:.4}{}",
            self.heldout.as_deref().unwrap_or_default()
        )
    }

    pub fn finish(&self) {
        self.bar.finish();
    }

    pub fn abandon(&self) {
        self.bar.abandon();
    }
}

/// `1h02m03s`, `4m05s`, `6s`.
fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::hms;

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(hms(6.2), "6s");
        assert_eq!(hms(245.0), "4m05s");
        assert_eq!(hms(3723.0), "1h02m03s");
    }
}
