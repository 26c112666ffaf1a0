//! Naming a dead or hung rank: every rank's [`Heartbeat`] writes the store
//! key `alive/<rank>` from a background thread, and [`diagnose`] reads them
//! all after a collective failed, so "all_reduce failed: Connection closed
//! by peer" becomes "rank 1 stopped responding (last heartbeat 12.0 s ago)".
//!
//! The heartbeat thread has its own store connection, so it never queues
//! behind the main thread's blocking store calls. It goes on beating while
//! the main thread is stuck, so it tells a dead (or frozen) *process* from a
//! live one; a live rank stuck inside its step shows as alive with an old
//! [`Heartbeat::progress`] step. Ages compare each rank's wall clock with
//! the diagnosing rank's (hosts are assumed NTP-synchronised to well under
//! the staleness limit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Result, Store};

/// The store key of `rank`'s heartbeat.
pub fn heartbeat_key(rank: usize) -> String {
    format!("alive/{rank}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One rank's last published state, as stored under [`heartbeat_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Beats sent so far.
    pub count: u64,
    /// Wall-clock time of this beat, ms since the Unix epoch.
    pub time_ms: u64,
    /// The last step reported through [`Heartbeat::progress`], if any.
    pub step: Option<u64>,
    /// When that step was reported, ms since the Unix epoch.
    pub step_time_ms: u64,
    /// The heartbeat was stopped on purpose (the rank left cleanly).
    pub stopped: bool,
}

impl Beat {
    fn encode(&self) -> String {
        format!(
            "count={} time_ms={} step={} step_time_ms={} state={}",
            self.count,
            self.time_ms,
            self.step.map_or_else(|| "-".to_string(), |s| s.to_string()),
            self.step_time_ms,
            if self.stopped { "stopped" } else { "running" }
        )
    }

    fn decode(text: &str) -> Option<Beat> {
        let mut beat = Beat {
            count: 0,
            time_ms: 0,
            step: None,
            step_time_ms: 0,
            stopped: false,
        };
        let mut have_time = false;
        for field in text.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "count" => beat.count = v.parse().ok()?,
                "time_ms" => {
                    beat.time_ms = v.parse().ok()?;
                    have_time = true;
                }
                "step" => {
                    beat.step = if v == "-" {
                        None
                    } else {
                        Some(v.parse().ok()?)
                    }
                }
                "step_time_ms" => beat.step_time_ms = v.parse().ok()?,
                "state" => beat.stopped = v == "stopped",
                _ => {}
            }
        }
        have_time.then_some(beat)
    }
}

struct Shared {
    stop: AtomicBool,
    step: AtomicU64,
    step_time_ms: AtomicU64,
    wake: (Mutex<()>, Condvar),
}

/// A background thread that publishes this rank's liveness every
/// `interval` under [`heartbeat_key`]. Dropping it stops the thread and
/// marks the heartbeat stopped (a crash leaves it running but stale).
pub struct Heartbeat {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// `u64::MAX` in `Shared::step`: no progress reported yet.
const NO_STEP: u64 = u64::MAX;

impl Heartbeat {
    /// Opens a second connection to `store` and starts beating for `rank`.
    /// The first beat is written before this returns.
    pub fn start(store: &Store, rank: usize, interval: Duration) -> Result<Heartbeat> {
        let conn = store.new_connection(Duration::from_secs(30))?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            step: AtomicU64::new(NO_STEP),
            step_time_ms: AtomicU64::new(0),
            wake: (Mutex::new(()), Condvar::new()),
        });
        let key = heartbeat_key(rank);
        let beat = |count: u64, shared: &Shared, stopped: bool| {
            let step = shared.step.load(Ordering::Relaxed);
            Beat {
                count,
                time_ms: now_ms(),
                step: (step != NO_STEP).then_some(step),
                step_time_ms: shared.step_time_ms.load(Ordering::Relaxed),
                stopped,
            }
            .encode()
        };
        conn.set(&key, beat(0, &shared, false).as_bytes())?;
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("heartbeat-{rank}"))
                .spawn(move || {
                    let mut count = 1u64;
                    loop {
                        {
                            let (lock, cv) = &shared.wake;
                            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                            if !shared.stop.load(Ordering::Acquire) {
                                let _ = cv
                                    .wait_timeout(guard, interval)
                                    .unwrap_or_else(|e| e.into_inner());
                            }
                        }
                        let stopped = shared.stop.load(Ordering::Acquire);
                        // A store that is gone (rank 0 died) ends the beats:
                        // the collectives report that failure themselves.
                        if conn
                            .set(&key, beat(count, &shared, stopped).as_bytes())
                            .is_err()
                            || stopped
                        {
                            return;
                        }
                        count += 1;
                    }
                })
                .expect("spawn the heartbeat thread")
        };
        Ok(Heartbeat {
            shared,
            thread: Some(thread),
        })
    }

    /// Records that the main loop finished `step`; published with the next
    /// beat, so [`diagnose`] can tell a rank stuck in its step.
    pub fn progress(&self, step: u64) {
        self.shared.step_time_ms.store(now_ms(), Ordering::Relaxed);
        self.shared.step.store(step, Ordering::Relaxed);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let (lock, cv) = &self.shared.wake;
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Reads every rank's heartbeat and says which ranks are dead or hung: a
/// heartbeat older than `stale` (or missing, or stopped) names the rank.
/// Meant for the message of a failed collective, e.g.
/// `format!("{err}; {}", diagnose(&store, world, Duration::from_secs(10)))`.
/// Never fails: an unreachable store is itself the diagnosis (rank 0 serves
/// it). Pass a `stale` of a few heartbeat intervals.
pub fn diagnose(store: &Store, world: usize, stale: Duration) -> String {
    let now = now_ms();
    let stale_ms = stale.as_millis() as u64;
    let mut dead = Vec::new();
    let mut alive = Vec::new();
    for rank in 0..world {
        let key = heartbeat_key(rank);
        let present = match store.check(&[key.as_str()]) {
            Ok(p) => p,
            Err(e) => {
                return format!(
                    "the rendezvous store served by rank 0 is unreachable, so rank 0 has \
                     probably exited or crashed ({e})"
                )
            }
        };
        if !present {
            dead.push(format!("rank {rank} never sent a heartbeat"));
            continue;
        }
        let beat = store
            .get(&key, Duration::from_secs(5))
            .ok()
            .and_then(|v| Beat::decode(&String::from_utf8_lossy(&v)));
        let Some(beat) = beat else {
            dead.push(format!("rank {rank}'s heartbeat is unreadable"));
            continue;
        };
        let age = now.saturating_sub(beat.time_ms);
        let step = match beat.step {
            Some(s) => format!(
                ", last finished step {s} {} ago",
                secs(now.saturating_sub(beat.step_time_ms))
            ),
            None => String::new(),
        };
        if beat.stopped {
            dead.push(format!(
                "rank {rank} has left (stopped its heartbeat {} ago{step})",
                secs(age)
            ));
        } else if age > stale_ms {
            dead.push(format!(
                "rank {rank} stopped responding (last heartbeat {} ago{step})",
                secs(age)
            ));
        } else {
            alive.push(match beat.step {
                Some(s) => format!("{rank} (step {s})"),
                None => rank.to_string(),
            });
        }
    }
    if dead.is_empty() {
        format!(
            "every rank's heartbeat is fresh (ranks {}), so no process died; one may be \
             stuck inside its step, or the network between them failed",
            alive.join(", ")
        )
    } else {
        dead.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_round_trip() {
        let b = Beat {
            count: 7,
            time_ms: 1_700_000_000_123,
            step: Some(41),
            step_time_ms: 1_700_000_000_000,
            stopped: false,
        };
        assert_eq!(Beat::decode(&b.encode()), Some(b.clone()));
        let none = Beat {
            step: None,
            stopped: true,
            ..b
        };
        assert_eq!(Beat::decode(&none.encode()), Some(none));
        assert_eq!(Beat::decode("garbage"), None);
        assert_eq!(Beat::decode("count=1"), None);
    }
}
