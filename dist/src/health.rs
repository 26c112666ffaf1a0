//! Naming a dead or hung rank: every rank's [`Heartbeat`] writes the store
//! key `alive/<rank>` from a background thread, and [`diagnose`] reads them
//! all after a collective failed, so "all_reduce failed: Connection closed
//! by peer" becomes "rank 1 stopped responding (last heartbeat 12.0 s ago)".
//!
//! The heartbeat thread has its own store connection, so it never queues
//! behind the main thread's blocking store calls. It goes on beating while
//! the main thread is stuck, so it tells a dead (or frozen) *process* from a
//! live one. A live rank stuck inside its step (in compute, in a data
//! loader) is told by its collectives: each beat also carries the
//! [`Activity`] of every process group of the process (how many
//! collectives the rank has entered, the latest, the one it waits in), so
//! when the others time out waiting in all_reduce #57, the rank that has
//! entered only 56 is the one they wait for: "rank 1 is alive but has not
//! joined all_reduce #57 that rank 0 is waiting in (...)". Ages compare each
//! rank's wall clock with the diagnosing rank's (hosts are assumed
//! NTP-synchronised to well under the staleness limit).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ffi::ActivityHandle;
use crate::{Op, Result, Store, StoreServer};

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

/// A collective as one rank entered (or waits in) it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entered {
    /// Its number on the group, counting from 1; the same collective has
    /// the same number on every rank.
    pub seq: u64,
    pub op: Op,
    /// When the rank entered it (for [`Activity::waiting`]: since when it
    /// waits), ms since the Unix epoch.
    pub at_ms: u64,
}

/// What one rank has done on one process group: [`crate::ProcessGroup::activity`],
/// and what its [`Heartbeat`] publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// The group's number among the process's groups, in creation order
    /// (the same on every rank).
    pub group: usize,
    /// Collectives the rank has entered on the group (launched, whether or
    /// not they completed).
    pub entered: u64,
    /// The latest of them.
    pub last: Option<Entered>,
    /// The collective the rank is blocked waiting for; still set after that
    /// wait failed or timed out (the collective never completed).
    pub waiting: Option<Entered>,
}

/// The process groups alive in this process, for the heartbeat.
static GROUPS: Mutex<Vec<(usize, Weak<ActivityHandle>)>> = Mutex::new(Vec::new());

/// Lists a new process group's counters for every [`Heartbeat`] of the
/// process (dropped groups fall out by themselves).
pub(crate) fn register_group(index: usize, handle: &Arc<ActivityHandle>) {
    let mut groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
    groups.retain(|(_, w)| w.strong_count() > 0);
    groups.push((index, Arc::downgrade(handle)));
}

pub(crate) fn activity_of(group: usize, handle: &ActivityHandle) -> Activity {
    let r = handle.read();
    let entered = |seq: u64, op: Option<Op>, at_ms: u64| {
        op.filter(|_| seq > 0).map(|op| Entered { seq, op, at_ms })
    };
    Activity {
        group,
        entered: r.entered,
        last: entered(r.entered, r.last_op, r.last_ms),
        waiting: entered(r.waiting, r.waiting_op, r.waiting_ms),
    }
}

/// The [`Activity`] of every process group alive in this process, in
/// creation order.
pub fn activities() -> Vec<Activity> {
    let groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
    groups
        .iter()
        .filter_map(|(index, w)| w.upgrade().map(|h| activity_of(*index, &h)))
        .collect()
}

fn op_named(name: &str) -> Option<Op> {
    [
        Op::AllReduce,
        Op::AllGather,
        Op::Broadcast,
        Op::Barrier,
        Op::ReduceScatter,
    ]
    .into_iter()
    .find(|op| op.to_string() == name)
}

impl Activity {
    /// `pg<group>=<entered>,<last op>,<last ms>,<waiting seq>,<waiting op>,<waiting ms>`
    /// (`-` for no op, 0 for no collective).
    fn encode(&self) -> String {
        let part = |e: Option<Entered>| match e {
            Some(e) => format!("{},{},{}", e.seq, e.op, e.at_ms),
            None => "0,-,0".to_string(),
        };
        let last = match self.last {
            Some(l) => format!("{},{}", l.op, l.at_ms),
            None => "-,0".to_string(),
        };
        format!(
            "pg{}={},{last},{}",
            self.group,
            self.entered,
            part(self.waiting)
        )
    }

    fn decode(key: &str, value: &str) -> Option<Activity> {
        let group = key.strip_prefix("pg")?.parse().ok()?;
        let f: Vec<&str> = value.split(',').collect();
        let [entered, last_op, last_ms, wait_seq, wait_op, wait_ms] = f[..] else {
            return None;
        };
        let entered: u64 = entered.parse().ok()?;
        let last_ms: u64 = last_ms.parse().ok()?;
        let wait_seq: u64 = wait_seq.parse().ok()?;
        let wait_ms: u64 = wait_ms.parse().ok()?;
        Some(Activity {
            group,
            entered,
            last: op_named(last_op).filter(|_| entered > 0).map(|op| Entered {
                seq: entered,
                op,
                at_ms: last_ms,
            }),
            waiting: op_named(wait_op)
                .filter(|_| wait_seq > 0)
                .map(|op| Entered {
                    seq: wait_seq,
                    op,
                    at_ms: wait_ms,
                }),
        })
    }
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
    /// The process's groups at this beat ([`activities`]).
    pub groups: Vec<Activity>,
}

impl Beat {
    fn encode(&self) -> String {
        let mut text = format!(
            "count={} time_ms={} step={} step_time_ms={} state={}",
            self.count,
            self.time_ms,
            self.step.map_or_else(|| "-".to_string(), |s| s.to_string()),
            self.step_time_ms,
            if self.stopped { "stopped" } else { "running" }
        );
        for g in &self.groups {
            text.push(' ');
            text.push_str(&g.encode());
        }
        text
    }

    fn decode(text: &str) -> Option<Beat> {
        let mut beat = Beat {
            count: 0,
            time_ms: 0,
            step: None,
            step_time_ms: 0,
            stopped: false,
            groups: Vec::new(),
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
                k if k.starts_with("pg") => beat.groups.extend(Activity::decode(k, v)),
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
                groups: activities(),
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

mod diagnosis;
pub use diagnosis::{diagnose, rank_gone};

#[cfg(test)]
mod tests {
    use super::diagnosis::behind;
    use super::*;

    fn activity(group: usize, entered: u64, waiting: Option<(u64, Op)>) -> Activity {
        Activity {
            group,
            entered,
            last: (entered > 0).then_some(Entered {
                seq: entered,
                op: Op::AllGather,
                at_ms: 1_000,
            }),
            waiting: waiting.map(|(seq, op)| Entered {
                seq,
                op,
                at_ms: 2_000,
            }),
        }
    }

    fn beat(step: Option<u64>, groups: Vec<Activity>) -> Beat {
        Beat {
            count: 7,
            time_ms: 1_700_000_000_123,
            step,
            step_time_ms: 1_700_000_000_000,
            stopped: false,
            groups,
        }
    }

    #[test]
    fn beats_round_trip() {
        let b = beat(Some(41), vec![]);
        assert_eq!(Beat::decode(&b.encode()), Some(b.clone()));
        let none = Beat {
            step: None,
            stopped: true,
            ..b.clone()
        };
        assert_eq!(Beat::decode(&none.encode()), Some(none));
        let busy = beat(
            Some(3),
            vec![
                activity(0, 57, Some((57, Op::AllReduce))),
                activity(1, 0, None),
                activity(2, 4, None),
            ],
        );
        assert_eq!(Beat::decode(&busy.encode()), Some(busy));
        assert_eq!(Beat::decode("garbage"), None);
        assert_eq!(Beat::decode("count=1"), None);
        // A beat of an older build, without groups, still reads.
        assert_eq!(
            Beat::decode("count=1 time_ms=5 step=- step_time_ms=0 state=running").map(|b| b.groups),
            Some(vec![])
        );
    }

    #[test]
    fn the_rank_behind_in_collectives_is_named() {
        let now = 6_000;
        let waiting = activity(0, 57, Some((57, Op::AllReduce)));
        let stuck = activity(0, 56, None);
        let alive = vec![
            (0, beat(Some(3), vec![waiting])),
            (1, beat(Some(3), vec![stuck])),
        ];
        let named = behind(&alive, now);
        assert_eq!(named.len(), 1, "{named:?}");
        assert!(
            named[0].starts_with(
                "rank 1 is alive but has not joined all_reduce #57 that rank 0 is waiting in \
                 (waiting for 4.0 s; it is 1 collective behind; its last was all_gather #56"
            ),
            "{}",
            named[0]
        );
        assert!(named[0].contains("last finished step 3"), "{}", named[0]);

        // Three ranks: two wait, the third is 3 behind; the op of the
        // collective it missed is not known to the others.
        let alive = vec![
            (
                0,
                beat(None, vec![activity(0, 57, Some((57, Op::Barrier)))]),
            ),
            (1, beat(None, vec![activity(0, 54, None)])),
            (
                2,
                beat(None, vec![activity(0, 57, Some((57, Op::Barrier)))]),
            ),
        ];
        let named = behind(&alive, now);
        assert_eq!(named.len(), 1, "{named:?}");
        assert!(
            named[0].starts_with(
                "rank 1 is alive but has not joined collective #55 that the other ranks have \
                 entered (it is 3 collectives behind"
            ),
            "{}",
            named[0]
        );

        // In step: nobody is named.
        let even = vec![
            (
                0,
                beat(None, vec![activity(0, 9, Some((9, Op::AllReduce)))]),
            ),
            (
                1,
                beat(None, vec![activity(0, 9, Some((9, Op::AllReduce)))]),
            ),
        ];
        assert!(behind(&even, now).is_empty());
    }
}
