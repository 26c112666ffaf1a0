//! A shard set: its names (brace patterns), the caps on what a sample may
//! make a reader hold, and which shards each reader of a stream reads.
//!
//! Under `data.shard_split = "exact"` one stream walks every shard of an
//! epoch, in an order drawn from the seed and the epoch, and every rank
//! walks it. Under `"disjoint"` the `ranks x workers` readers (slot
//! `rank * workers + worker`) take every `slots`-th shard of that order,
//! starting at their slot (webdataset's `split_by_node` then
//! `split_by_worker`), so over the slots an epoch's shards are partitioned
//! and the next epoch's order deals them out anew ([`epoch_shards`]).
//! [`resolve_split`] and the resume checks decide which a run uses.

use crate::rng::{mix, Rng};
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};
use vlmatch_registry::config::{DataConfig, ShardSplit};

/// The most names one pattern may expand to.
const MAX_EXPANSION: usize = 1_000_000;

/// Expand brace expressions: ranges `{000..012}` (zero padding kept when a
/// bound has a leading zero), descending ranges `{3..1}`, and lists `{a,b}`;
/// several braces give every combination, in order.
pub fn expand_braces(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err("unmatched `}`".into());
        }
        return Ok(vec![pattern.to_string()]);
    };
    let head = &pattern[..open];
    if head.contains('}') {
        return Err("unmatched `}`".into());
    }
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or("unmatched `{`")?;
    let body = &pattern[open + 1..close];
    if body.contains('{') {
        return Err("nested braces are not supported".into());
    }
    let alternatives = alternatives(body)?;
    let tails = expand_braces(&pattern[close + 1..])?;
    if alternatives.len().saturating_mul(tails.len()) > MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} names"));
    }
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for a in &alternatives {
        for t in &tails {
            out.push(format!("{head}{a}{t}"));
        }
    }
    Ok(out)
}

fn alternatives(body: &str) -> std::result::Result<Vec<String>, String> {
    if let Some((a, b)) = body.split_once("..") {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return Err(format!(
                "`{{{body}}}`: a range needs two non-negative integers"
            ));
        }
        let (x, y): (u64, u64) = match (a.parse(), b.parse()) {
            (Ok(x), Ok(y)) => (x, y),
            _ => return Err(format!("`{{{body}}}`: bounds too large")),
        };
        if x.abs_diff(y) >= MAX_EXPANSION as u64 {
            return Err(format!(
                "`{{{body}}}` expands to more than {MAX_EXPANSION} names"
            ));
        }
        let padded = |s: &str| s.len() > 1 && s.starts_with('0');
        let width = if padded(a) || padded(b) {
            a.len().max(b.len())
        } else {
            0
        };
        let values: Vec<u64> = if x <= y {
            (x..=y).collect()
        } else {
            (y..=x).rev().collect()
        };
        return Ok(values.iter().map(|v| format!("{v:0width$}")).collect());
    }
    if body.contains(',') {
        return Ok(body.split(',').map(str::to_string).collect());
    }
    Err(format!(
        "`{{{body}}}` is neither a range `{{A..B}}` nor a list `{{a,b}}`"
    ))
}

/// What one shard sample may make a reader hold, each checked before the
/// data is read: a member over its cap, or a caption list over its length,
/// is a bad sample naming the shard, the member and the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLimits {
    /// `data.max_image_bytes`: the largest image member (default 64 MiB).
    pub image_bytes: u64,
    /// `data.max_text_bytes`: the largest `.txt` or `.json` member (default
    /// 1 MiB).
    pub text_bytes: u64,
    /// `data.max_captions_per_image`: the longest caption list (default 1000).
    pub captions: usize,
}

impl Default for MemberLimits {
    fn default() -> Self {
        MemberLimits {
            image_bytes: 64 << 20,
            text_bytes: 1 << 20,
            captions: 1000,
        }
    }
}

impl MemberLimits {
    /// The caps of a `[data]` section.
    pub fn from_config(data: &vlmatch_registry::config::DataConfig) -> Self {
        MemberLimits {
            image_bytes: data.max_image_bytes,
            text_bytes: data.max_text_bytes,
            captions: data.max_captions_per_image,
        }
    }
}

/// A resolved shard set and the stream's shuffle buffer size.
#[derive(Debug, Clone)]
pub struct Shards {
    pub pattern: String,
    pub paths: Vec<PathBuf>,
    /// Pairs held in the shuffle buffer (`data.shuffle_buffer`).
    pub shuffle_buffer: usize,
    /// Caps on members and caption lists ([`MemberLimits::default`] unless
    /// set with [`Shards::with_limits`]).
    pub limits: MemberLimits,
    /// How ranks and loader workers divide the stream (`exact` unless set
    /// with [`Shards::with_split`]; a run sets the resolved
    /// `data.shard_split`).
    pub split: ShardSplit,
}

impl Shards {
    /// Expand `pattern` (relative to the working directory); every name must
    /// be a file. `what` names the input in errors, e.g. a config key.
    pub fn resolve(pattern: &str, what: &str, shuffle_buffer: usize) -> Result<Shards> {
        let names = expand_braces(pattern)
            .map_err(|m| Error::Config(format!("{what}: pattern `{pattern}`: {m}")))?;
        let paths: Vec<PathBuf> = names.into_iter().map(PathBuf::from).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            let cwd = std::env::current_dir().unwrap_or_default();
            return Err(Error::Config(format!(
                "{what}: pattern `{pattern}`: shard {} not found (paths are relative to the \
                 working directory, {})",
                missing.display(),
                cwd.display()
            )));
        }
        Ok(Shards {
            pattern: pattern.to_string(),
            paths,
            shuffle_buffer,
            limits: MemberLimits::default(),
            split: ShardSplit::Exact,
        })
    }

    /// These shards read under `limits` (the config's
    /// [`MemberLimits::from_config`]).
    pub fn with_limits(mut self, limits: MemberLimits) -> Self {
        self.limits = limits;
        self
    }

    /// These shards divided among ranks and loader workers as `split`.
    pub fn with_split(mut self, split: ShardSplit) -> Self {
        self.split = split;
        self
    }
}

/// One reader's place among the readers of a disjoint stream: slot `index`
/// of `count` (`rank * workers + worker` of `ranks * workers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: usize,
    pub count: usize,
}

impl Slot {
    /// The one reader of an exact stream.
    pub const WHOLE: Slot = Slot { index: 0, count: 1 };
}

/// The shards (indices into the set's `n`) that `slot` reads in `epoch`:
/// the epoch's order (drawn from `seed` and `epoch`; file order without a
/// seed), every `slot.count`-th from `slot.index` on. The slots' lists
/// partition `0..n`.
pub fn epoch_shards(n: usize, seed: Option<u64>, epoch: u64, slot: Slot) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if let Some(seed) = seed {
        Rng::new(mix(&[seed, epoch, 0x5_4A2D])).shuffle(&mut order);
    }
    order
        .into_iter()
        .skip(slot.index)
        .step_by(slot.count.max(1))
        .collect()
}

/// `ranks x workers` readers of a disjoint stream over `n` shards: each
/// needs a shard of its own.
pub fn check_slots(n: usize, ranks: usize, workers: usize, pattern: &str) -> Result<()> {
    let slots = ranks * workers;
    if slots <= n {
        return Ok(());
    }
    Err(Error::Config(format!(
        "config key `data.shard_split`: \"disjoint\" gives each of {ranks} rank(s) x {workers} \
         loader worker(s) (data.workers) = {slots} readers shards of its own, but `{pattern}` \
         has {n} shard(s); use at most {n} readers, more shards, or data.shard_split = \"exact\""
    )))
}

fn name(split: ShardSplit) -> &'static str {
    match split {
        ShardSplit::Disjoint => "disjoint",
        ShardSplit::Exact => "exact",
    }
}

/// `data.shard_split` as a run uses it, `None` when `data.source` is not
/// `webdataset`: the value set, else for a new run (`fresh`) `disjoint` at
/// more than one rank or loader worker and `exact` at one; a resumed run
/// whose saved config lacks the key (written before it existed) is `exact`.
pub fn resolve_split(data: &DataConfig, ranks: usize, fresh: bool) -> Option<ShardSplit> {
    if data.source != vlmatch_registry::config::DataSource::Webdataset {
        return None;
    }
    Some(match data.shard_split {
        Some(s) => s,
        None if fresh && ranks * data.workers.max(1) > 1 => ShardSplit::Disjoint,
        None => ShardSplit::Exact,
    })
}

/// Before a resumed run rewrites `run_dir/config.toml`: the split it
/// resolved (`now`) must be the one the run began with (a saved config
/// without the key: `exact`), and under `disjoint` its `data.workers` too,
/// since each worker reads its own shards.
pub fn check_saved_split(run_dir: &Path, now: ShardSplit, workers: usize) -> Result<()> {
    let file = run_dir.join("config.toml");
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let saved: toml::Table = toml::from_str(&text).map_err(|e| Error::Data {
        path: file.clone(),
        line: None,
        message: format!("invalid TOML: {e}"),
    })?;
    let data = saved.get("data").and_then(|d| d.as_table());
    let was = match data.and_then(|d| d.get("shard_split")?.as_str()) {
        Some("disjoint") => ShardSplit::Disjoint,
        _ => ShardSplit::Exact,
    };
    if was != now {
        return Err(Error::Config(format!(
            "config key `data.shard_split`: this run read its shards \"{}\" ({}); resuming it \
             \"{}\" would change the data it trains on: leave the key as it was",
            name(was),
            file.display(),
            name(now)
        )));
    }
    let was_workers = data
        .and_then(|d| d.get("workers")?.as_integer())
        .unwrap_or(1);
    if now == ShardSplit::Disjoint && was_workers != workers as i64 {
        return Err(Error::Config(format!(
            "cannot resume with data.workers = {workers}: this run split its shards \
             \"disjoint\" over {was_workers} loader worker(s) per rank, each reading its own \
             shards; resume with data.workers = {was_workers}"
        )));
    }
    Ok(())
}

/// After a resumed run has read its checkpoint's layout: under `disjoint`
/// the rank count must be the one that wrote it.
pub fn check_resume_ranks(split: Option<ShardSplit>, was: usize, now: usize) -> Result<()> {
    if split != Some(ShardSplit::Disjoint) || was == now {
        return Ok(());
    }
    Err(Error::Config(format!(
        "cannot resume on {now} rank(s): this run split its shards \"disjoint\" over {was} \
         rank(s), each reading its own shards; resume on {was} ranks (data.shard_split = \
         \"exact\" runs resume on any rank count that divides the global batch)"
    )))
}

/// The config a run saves: `loaded`'s, with `data.shard_split` resolved.
pub fn config_toml(loaded: &vlmatch_registry::LoadedConfig, split: Option<ShardSplit>) -> String {
    let mut config = loaded.config.clone();
    config.data.shard_split = split.or(config.data.shard_split);
    toml::to_string_pretty(&config).expect("the config serialises to TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_ranges_lists_and_products() {
        assert_eq!(expand_braces("a.tar").unwrap(), ["a.tar"]);
        assert_eq!(
            expand_braces("s/train-{000008..000011}.tar").unwrap(),
            [
                "s/train-000008.tar",
                "s/train-000009.tar",
                "s/train-000010.tar",
                "s/train-000011.tar"
            ]
        );
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(
            expand_braces("{a,b}-{0..1}.tar").unwrap(),
            ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
        );
        for bad in ["{", "}", "a{1..}", "{x}", "{{1..2}}", "a}{"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slots_partition_each_epoch_and_epochs_deal_anew() {
        let deal = |epoch| -> Vec<Vec<usize>> {
            (0..3)
                .map(|index| epoch_shards(10, Some(7), epoch, Slot { index, count: 3 }))
                .collect()
        };
        for epoch in 0..4 {
            let mut all: Vec<usize> = deal(epoch).concat();
            all.sort_unstable();
            assert_eq!(all, (0..10).collect::<Vec<_>>(), "epoch {epoch}");
        }
        assert_ne!(deal(0), deal(1), "the assignment changes with the epoch");
        assert_eq!(
            epoch_shards(5, None, 3, Slot { index: 1, count: 2 }),
            [1, 3]
        );
        let e = check_slots(3, 2, 2, "s-{0..2}.tar")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 rank(s) x 2 loader worker(s)") && e.contains("has 3 shard(s)"),
            "{e}"
        );
        assert!(check_slots(4, 2, 2, "p").is_ok());
    }
}
