//! What the typed sections share: how a check's failure names its key, and
//! the small defaults several sections use.

use vlmatch_core::Result;

/// The smallest `data.max_len`: `[CLS]`, `[SEP]` and room for one word.
pub const MIN_MAX_LEN: i64 = 3;

/// A section's check: `Err((dotted key, what is wrong))` for the first
/// offending key.
pub type Checked = std::result::Result<(), (String, String)>;

/// `r`, a [`crate::check`] result for `key`, as a [`Checked`].
pub(super) fn at(key: &str, r: Result<()>) -> Checked {
    r.map_err(|e| {
        let msg = e.to_string();
        let prefix = format!("config key `{key}`: ");
        let problem = msg.strip_prefix(&prefix).unwrap_or(&msg).to_string();
        (key.to_string(), problem)
    })
}

/// A count as the `i64` the checks take.
pub(super) fn count(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn one_usize() -> usize {
    1
}

pub(super) fn yes() -> bool {
    true
}
