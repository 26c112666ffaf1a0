//! Floating-point operations of a step, counted from the shapes of the
//! matrix products, convolutions and attentions that do nearly all of its
//! work, per module (the first component of the parameters' path:
//! `vision_encoder`, `text_encoder`, `fusion`, `itc`, ...).
//!
//! The counting follows PyTorch's `FlopCounterMode` (2 per multiply-add; in
//! backward, one product of the same size per operand that needs a
//! gradient; attention: 2 products forward, 5 backward), so that a count
//! here and the reference's count of the same computation agree. Matrix
//! products and attention are kept apart because PyTorch's counter has no
//! formula for the CPU attention kernel and counts it as 0 there.
//!
//! Off unless [`enable`]d (`vlmatch bench`); recording is then a lock and a
//! few additions per product. [`set_plain`] makes pair-level fusion take the
//! plain path (full fusion of every pair with its own copy of the image, as
//! ALBEF computes it): the model's nominal FLOPs of a step, for MFU by the
//! usual convention, beside the FLOPs vlmatch executes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tch::Tensor;

/// FLOPs of one module: matrix products (and convolutions) and attention,
/// forward and backward.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Flops {
    pub matmul_forward: f64,
    pub matmul_backward: f64,
    pub attention_forward: f64,
    pub attention_backward: f64,
}

impl Flops {
    /// Everything counted.
    pub fn total(&self) -> f64 {
        self.matmul() + self.attention_forward + self.attention_backward
    }
    /// Matrix products and convolutions, forward and backward.
    pub fn matmul(&self) -> f64 {
        self.matmul_forward + self.matmul_backward
    }
    fn add(&mut self, other: &Flops) {
        self.matmul_forward += other.matmul_forward;
        self.matmul_backward += other.matmul_backward;
        self.attention_forward += other.attention_forward;
        self.attention_backward += other.attention_backward;
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static PLAIN: AtomicBool = AtomicBool::new(false);
static COUNTS: Mutex<BTreeMap<String, Flops>> = Mutex::new(BTreeMap::new());

/// Turn counting on or off (it starts off).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether counting is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Pair-level fusion takes the plain path (see the module docs).
pub fn set_plain(on: bool) {
    PLAIN.store(on, Ordering::Relaxed);
}

/// Whether pair-level fusion takes the plain path.
pub fn plain() -> bool {
    PLAIN.load(Ordering::Relaxed)
}

/// The counts since the last `take`, per module; resets them.
pub fn take() -> BTreeMap<String, Flops> {
    std::mem::take(&mut *COUNTS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The sum over modules.
pub fn sum<'a>(modules: impl IntoIterator<Item = &'a Flops>) -> Flops {
    let mut all = Flops::default();
    for f in modules {
        all.add(f);
    }
    all
}

fn record(module: &str, f: Flops) {
    let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    counts.entry(module.to_string()).or_default().add(&f);
}

/// A product `[rows, inner] x [inner, cols]` (batched products: `rows`
/// counts every batch's rows). In backward, `grad_lhs` / `grad_rhs`: whether
/// the left / right operand gets a gradient (neither when the result does
/// not require one).
pub fn matmul(module: &str, rows: i64, inner: i64, cols: i64, grad_lhs: bool, grad_rhs: bool) {
    if !enabled() {
        return;
    }
    let one = 2.0 * rows as f64 * inner as f64 * cols as f64;
    let backward = one * (grad_lhs as u8 + grad_rhs as u8) as f64;
    record(
        module,
        Flops {
            matmul_forward: one,
            matmul_backward: backward,
            ..Flops::default()
        },
    );
}

/// Scaled dot-product attention over `batch` (batch x heads) rows of `lq`
/// queries and `lk` keys of width `d`: scores and weighted values forward;
/// backward recomputes the scores and takes four products of the same size.
pub fn attention(module: &str, batch: i64, lq: i64, lk: i64, d: i64, grad: bool) {
    if !enabled() {
        return;
    }
    let one = 2.0 * batch as f64 * lq as f64 * lk as f64 * d as f64;
    record(
        module,
        Flops {
            attention_forward: 2.0 * one,
            attention_backward: if grad { 5.0 * one } else { 0.0 },
            ..Flops::default()
        },
    );
}

/// [`matmul`] of `[rows, inner]` by `[inner, cols]` computing `out` from
/// `input` and `weight`, with the gradient flags read off the tensors.
fn matmul_of(module: &str, [input, weight, out]: [&Tensor; 3], [rows, inner, cols]: [i64; 3]) {
    let backward = out.requires_grad();
    matmul(
        module,
        rows,
        inner,
        cols,
        backward && input.requires_grad(),
        backward && weight.requires_grad(),
    );
}

/// [`matmul`] for `out = x . weight^T` (a linear layer; `x` `[.., in]`,
/// `weight` `[out, in]`), with the gradient flags read off the tensors.
pub fn linear(module: &str, x: &Tensor, weight: &Tensor, out: &Tensor) {
    if !enabled() {
        return;
    }
    let inner = x.size().last().copied().unwrap_or(1);
    let rows = x.numel() as i64 / inner.max(1);
    matmul_of(module, [x, weight, out], [rows, inner, weight.size()[0]]);
}

/// [`matmul`] for a patch embedding: a convolution of `images` with
/// `weight` `[out, in, p, p]` and stride `p`, giving `out` `[B, out, h, w]`
/// (one product of `B * h * w` patches by the flattened kernel).
pub fn patch_embedding(module: &str, images: &Tensor, weight: &Tensor, out: &Tensor) {
    if !enabled() {
        return;
    }
    let size = out.size();
    let rows = size[0] * size.get(2).copied().unwrap_or(1) * size.get(3).copied().unwrap_or(1);
    let cols = weight.size()[0];
    let inner = weight.numel() as i64 / cols.max(1);
    matmul_of(module, [images, weight, out], [rows, inner, cols]);
}

/// The module a parameter path names: its first component, or `model`.
pub fn module_of<'a>(mut components: impl Iterator<Item = &'a str>) -> String {
    components.next().unwrap_or("model").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_pytorchs_convention() {
        // One test touches the process-wide counters.
        enable(true);
        let _ = take();
        matmul("a", 10, 16, 4, false, true);
        matmul("a", 10, 16, 4, true, true);
        attention("b", 4, 5, 5, 8, true);
        matmul("c", 3, 3, 3, false, false);
        enable(false);
        matmul("ignored", 100, 100, 100, true, true);
        let c = take();
        assert_eq!(c["a"].matmul_forward, 2.0 * 1280.0);
        assert_eq!(c["a"].matmul_backward, 3.0 * 1280.0);
        assert_eq!(c["b"].attention_forward, 2.0 * 1600.0);
        assert_eq!(c["b"].attention_backward, 5.0 * 1600.0);
        assert_eq!(c["c"].total(), 54.0);
        assert!(!c.contains_key("ignored"));
        assert!(take().is_empty());
        assert_eq!(sum(c.values()).total(), 2560.0 + 3840.0 + 11200.0 + 54.0);
    }
}
