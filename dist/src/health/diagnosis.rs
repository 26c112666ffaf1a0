//! Naming the dead or hung rank from every rank's heartbeat ([`diagnose`]).

use super::*;

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Why `rank` is gone, if it is: its heartbeat is missing, unreadable,
/// stopped (it left) or older than `stale`. `None` while it beats. For a
/// rank waiting on another outside any collective (rank 0 writing a
/// checkpoint), so that it stops as soon as the one it waits for dies
/// rather than at its own timeout.
pub fn rank_gone(store: &Store, rank: usize, stale: Duration) -> Option<String> {
    let key = heartbeat_key(rank);
    match store.check(&[key.as_str()]) {
        Ok(true) => {}
        Ok(false) => return Some(format!("rank {rank} never sent a heartbeat")),
        Err(e) => return Some(unreachable_store(store, &e.to_string())),
    }
    let beat = store
        .get(&key, Duration::from_secs(5))
        .ok()
        .and_then(|v| Beat::decode(&String::from_utf8_lossy(&v)));
    let Some(beat) = beat else {
        return Some(format!("rank {rank}'s heartbeat is unreadable"));
    };
    let age = now_ms().saturating_sub(beat.time_ms);
    if beat.stopped {
        Some(format!(
            "rank {rank} has left (stopped its heartbeat {} ago)",
            secs(age)
        ))
    } else if age > stale.as_millis() as u64 {
        Some(format!(
            "rank {rank} stopped responding (last heartbeat {} ago)",
            secs(age)
        ))
    } else {
        None
    }
}

/// Reads every rank's heartbeat and says which ranks are dead or hung: a
/// heartbeat older than `stale` (or missing, or stopped) names the rank as
/// dead; a rank alive but behind the others in the collectives of a process
/// group (it has entered fewer than the rank that waits) is named as the
/// one they wait for. Meant for the message of a failed collective, e.g.
/// `format!("{err}; {}", diagnose(&store, world, Duration::from_secs(10)))`.
/// Never fails: an unreachable store is itself the diagnosis (rank 0, or
/// the launcher's agent, serves it). Pass a `stale` of a few heartbeat
/// intervals. When it names nobody the text starts with "every rank's
/// heartbeat is fresh" (a rank that just died may still look alive: ask
/// again after `stale`).
pub fn diagnose(store: &Store, world: usize, stale: Duration) -> String {
    let now = now_ms();
    let stale_ms = stale.as_millis() as u64;
    let mut dead = Vec::new();
    let mut alive = Vec::new();
    for rank in 0..world {
        let key = heartbeat_key(rank);
        let present = match store.check(&[key.as_str()]) {
            Ok(p) => p,
            Err(e) => return unreachable_store(store, &e.to_string()),
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
            alive.push((rank, beat));
        }
    }
    let mut named = dead;
    named.extend(behind(&alive, now));
    if !named.is_empty() {
        return named.join("; ");
    }
    let ranks: Vec<String> = alive
        .iter()
        .map(|(rank, beat)| {
            let mut about = Vec::new();
            if let Some(s) = beat.step {
                about.push(format!("step {s}"));
            }
            if let Some(g) = beat.groups.first() {
                about.push(format!("{} collectives", g.entered));
            }
            if about.is_empty() {
                rank.to_string()
            } else {
                format!("{rank} ({})", about.join(", "))
            }
        })
        .collect();
    format!(
        "every rank's heartbeat is fresh (ranks {}), so no process died and none is behind the \
         others in collectives; one may be stuck inside its step, or the network between them \
         failed",
        ranks.join(", ")
    )
}

/// The diagnosis when the store cannot be read.
fn unreachable_store(store: &Store, error: &str) -> String {
    match store.server() {
        StoreServer::Rank0 => format!(
            "the rendezvous store served by rank 0 is unreachable, so rank 0 has probably \
             exited or crashed ({error})"
        ),
        StoreServer::External => {
            let (host, port) = store.address();
            format!(
                "the rendezvous store at {host}:{port} (served by the launcher's agent) is \
                 unreachable, so the agent, and with it the ranks it started there, has \
                 probably exited or crashed ({error})"
            )
        }
    }
}

/// "rank 1 is alive but has not joined all_reduce #57 that rank 0 is waiting
/// in (...)" for each alive rank that has entered fewer collectives on a
/// process group than the most any alive rank has entered there.
pub(super) fn behind(alive: &[(usize, Beat)], now: u64) -> Vec<String> {
    let ago = |ms: u64| secs(now.saturating_sub(ms));
    let groups: BTreeSet<usize> = alive
        .iter()
        .flat_map(|(_, b)| b.groups.iter().map(|g| g.group))
        .collect();
    let mut out = Vec::new();
    for group in groups {
        let acts: Vec<(usize, &Beat, &Activity)> = alive
            .iter()
            .filter_map(|(r, b)| {
                b.groups
                    .iter()
                    .find(|g| g.group == group)
                    .map(|g| (*r, b, g))
            })
            .collect();
        let Some(most) = acts.iter().map(|(_, _, a)| a.entered).max() else {
            continue;
        };
        let ahead: Vec<&(usize, &Beat, &Activity)> =
            acts.iter().filter(|(_, _, a)| a.entered == most).collect();
        for (rank, beat, a) in acts.iter().filter(|(_, _, a)| a.entered < most) {
            let missed = a.entered + 1;
            // What the others know of collective #missed: they wait in it,
            // or it is the latest they entered.
            let waits: Vec<Entered> = ahead
                .iter()
                .filter_map(|(_, _, x)| x.waiting.filter(|w| w.seq == missed))
                .collect();
            let known = waits.first().copied().or_else(|| {
                ahead
                    .iter()
                    .find_map(|(_, _, x)| x.last.filter(|l| l.seq == missed))
            });
            let mut what = match known {
                Some(e) => format!("{} #{missed}", e.op),
                None => format!("collective #{missed}"),
            };
            if group > 0 {
                what.push_str(&format!(" of process group {group}"));
            }
            let others = acts.len() - 1;
            let who = if ahead.len() == 1 {
                format!("rank {}", ahead[0].0)
            } else if ahead.len() == others {
                "the other ranks".to_string()
            } else {
                let list: Vec<String> = ahead.iter().map(|(r, _, _)| r.to_string()).collect();
                format!("ranks {}", list.join(", "))
            };
            let plural = ahead.len() > 1;
            let (verb, how_long) = match waits.iter().map(|w| w.at_ms).min() {
                Some(since) => (
                    format!("{} waiting in", if plural { "are" } else { "is" }),
                    format!("waiting for {}; ", ago(since)),
                ),
                None => (
                    format!("{} entered", if plural { "have" } else { "has" }),
                    String::new(),
                ),
            };
            let gap = most - a.entered;
            let mut details = vec![format!(
                "{how_long}it is {gap} collective{} behind",
                if gap == 1 { "" } else { "s" }
            )];
            if let Some(l) = a.last {
                details.push(format!(
                    "its last was {} #{} {} ago",
                    l.op,
                    l.seq,
                    ago(l.at_ms)
                ));
            }
            if let Some(s) = beat.step {
                details.push(format!(
                    "last finished step {s} {} ago",
                    ago(beat.step_time_ms)
                ));
            }
            out.push(format!(
                "rank {rank} is alive but has not joined {what} that {who} {verb} ({})",
                details.join("; ")
            ));
        }
    }
    out
}
