//! Range checks of config values, where each value is defined. Every error
//! names the full dotted key, the value and what was expected:
//!
//! ```text
//! config key `model.image.num_attention_heads`: must be at least 1, got 0
//! ```
//!
//! The typed sections (`train`, `data`, `eval`) are checked when the config
//! is loaded ([`crate::ConfigLayers::load`], which also names the layer a bad
//! value came from); plugin sections by their plugin, right after
//! [`crate::BuildContext::params`], with these helpers. A value that passes
//! is one the code using it can take without a panic or a silent nonsense
//! run (zero heads, a NaN learning rate, a caption length with no room for
//! words).

use std::fmt::Display;
use vlmatch_core::{Error, Result};

/// `config key `{key}`: {problem}`.
pub fn invalid(key: &str, problem: impl Display) -> Error {
    Error::Config(format!("config key `{key}`: {problem}"))
}

/// An image encoder's `patch_size` divides `data.image_size`.
pub fn patch_divides(key: &str, patch_size: i64, image_size: i64) -> Result<()> {
    if patch_size > 0 && image_size % patch_size == 0 {
        return Ok(());
    }
    Err(invalid(
        key,
        format!(
            "{patch_size} does not divide data.image_size {image_size}; images are cut into whole patches"
        ),
    ))
}

/// `value >= min` (integers).
pub fn at_least(key: &str, value: i64, min: i64) -> Result<()> {
    if value < min {
        return Err(invalid(key, format!("must be at least {min}, got {value}")));
    }
    Ok(())
}

/// `value >= 1` (integers): layer counts, head counts, widths.
pub fn positive(key: &str, value: i64) -> Result<()> {
    at_least(key, value, 1)
}

/// A finite number.
pub fn finite(key: &str, value: f64) -> Result<()> {
    if !value.is_finite() {
        return Err(invalid(
            key,
            format!("must be a finite number, got {value}"),
        ));
    }
    Ok(())
}

/// Each `(field, value)` that is set is a finite number; errors name
/// `{section}.{field}`. For optional keys checked before they are merged
/// with other sources (a NaN serialises to JSON as null, that is as unset).
pub fn finite_options(section: &str, values: &[(&str, Option<f64>)]) -> Result<()> {
    for (field, value) in values {
        if let Some(v) = value {
            finite(&format!("{section}.{field}"), *v)?;
        }
    }
    Ok(())
}

/// A finite number `> 0` (learning rates, epsilons, temperatures).
pub fn positive_f64(key: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(invalid(
            key,
            format!("must be a finite number > 0, got {value}"),
        ));
    }
    Ok(())
}

/// A finite number `>= 0` (weights, clipping norms).
pub fn non_negative_f64(key: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(invalid(
            key,
            format!("must be a finite number >= 0, got {value}"),
        ));
    }
    Ok(())
}

/// A probability or ratio in `[0, 1]`.
pub fn probability(key: &str, value: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&value) {
        return Err(invalid(key, format!("must be in [0, 1], got {value}")));
    }
    Ok(())
}

/// A dropout probability, in `[0, 1)` (1 would zero every activation).
pub fn dropout(key: &str, value: f64) -> Result<()> {
    if !(0.0..1.0).contains(&value) {
        return Err(invalid(key, format!("must be in [0, 1), got {value}")));
    }
    Ok(())
}

/// `heads` (at `heads_key`) is at least 1 and divides `width` (described by
/// `width_what`, e.g. "`model.image.hidden_size` 96").
pub fn heads_divide(heads_key: &str, heads: i64, width_what: &str, width: i64) -> Result<()> {
    positive(heads_key, heads)?;
    if width % heads != 0 {
        return Err(invalid(
            heads_key,
            format!("{heads} heads do not divide {width_what} {width}; use a divisor of {width}"),
        ));
    }
    Ok(())
}

/// The sizes every transformer stack has, checked alike by each encoder
/// plugin ([`layer_sizes`]).
#[derive(Debug, Clone)]
pub struct LayerSizes {
    /// The width the heads split, when it is the section's own
    /// (`hidden_size`); `None` when it comes from another encoder and is
    /// checked where it is known.
    pub hidden_size: Option<i64>,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub layer_norm_eps: f64,
    /// `(field, probability)` of each dropout.
    pub dropouts: Vec<(&'static str, f64)>,
}

/// Every size positive, the heads dividing `hidden_size`, each dropout in
/// [0, 1), a positive epsilon; errors name `{key}.<field>`.
pub fn layer_sizes(key: &str, s: &LayerSizes) -> Result<()> {
    let k = |field: &str| format!("{key}.{field}");
    match s.hidden_size {
        Some(width) => {
            positive(&k("hidden_size"), width)?;
            heads_divide(
                &k("num_attention_heads"),
                s.num_attention_heads,
                &format!("`{}`", k("hidden_size")),
                width,
            )?;
        }
        None => positive(&k("num_attention_heads"), s.num_attention_heads)?,
    }
    positive(&k("num_hidden_layers"), s.num_hidden_layers)?;
    positive(&k("intermediate_size"), s.intermediate_size)?;
    for (field, p) in &s.dropouts {
        dropout(&k(field), *p)?;
    }
    positive_f64(&k("layer_norm_eps"), s.layer_norm_eps)
}

/// `result`, its error saying which checkpoint the values came from.
pub fn with_init<T>(result: Result<T>, init: Option<&std::path::Path>) -> Result<T> {
    result.map_err(|e| match init {
        Some(dir) => Error::Config(format!("{e} (with init {})", dir.display())),
        None => e,
    })
}

/// A text file as a string. Invalid UTF-8 is a data error naming the file,
/// the line and the byte of the line where the bad sequence starts (where
/// `read_to_string` says only "stream did not contain valid UTF-8").
pub fn read_utf8(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Data {
            path: path.to_path_buf(),
            line: Some(line),
            message: format!(
                "invalid UTF-8 at byte {} of the line (the file must be UTF-8)",
                at - start + 1
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_names_line_and_byte() {
        let path = std::env::temp_dir().join(format!("check-utf8-{}", std::process::id()));
        std::fs::write(&path, b"ok\nab\xffc\n").unwrap();
        let e = read_utf8(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(
            e.ends_with(":2: invalid UTF-8 at byte 3 of the line (the file must be UTF-8)"),
            "{e}"
        );
    }

    #[test]
    fn messages_name_key_value_and_expectation() {
        let e = positive("model.image.num_attention_heads", 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config key `model.image.num_attention_heads`: must be at least 1, got 0"
        );
        let e = positive_f64("train.lr", f64::NAN).unwrap_err().to_string();
        assert!(e.contains("`train.lr`") && e.contains("NaN"), "{e}");
        assert!(positive_f64("train.lr", -1.0).is_err());
        assert!(positive_f64("train.lr", f64::INFINITY).is_err());
        assert!(positive_f64("train.lr", 1e-4).is_ok());
        assert!(non_negative_f64("train.grad_clip", 0.0).is_ok());
        assert!(non_negative_f64("train.grad_clip", f64::NAN).is_err());
        assert!(probability("p", f64::NAN).is_err());
        assert!(probability("p", 1.0).is_ok());
        assert!(dropout("p", 1.0).is_err());
        let e = heads_divide("k.heads", 5, "`k.hidden_size`", 96)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("5 heads do not divide `k.hidden_size` 96"),
            "{e}"
        );
        assert!(heads_divide("k.heads", 0, "`k.hidden_size`", 96).is_err());
        assert!(heads_divide("k.heads", -2, "`k.hidden_size`", 96).is_err());
        assert!(heads_divide("k.heads", 4, "`k.hidden_size`", 96).is_ok());
    }
}
