//! The shim's activation checkpointing on a small two-layer function:
//! gradients equal the plain computation's (dropout included, its masks
//! replayed), the random stream after it is the same, gradients off make it
//! a plain call, and a layer that panics in backward is an error.

use std::sync::Mutex;
use tch::{Device, Kind, Tensor};
use vlmatch_core::checkpoint::{recomputed, Recompute};
use vlmatch_dist::checkpoint::checkpoint;

/// The tests draw from libtorch's global generator and read the global
/// recompute counter.
static LOCK: Mutex<()> = Mutex::new(());

fn layer(x: &Tensor, w: &Tensor, p: f64) -> Tensor {
    (x.matmul(w).tanh() + x).dropout(p, true)
}

fn params() -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(7);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([4, 6], opts).set_requires_grad(true);
    let w1 = (Tensor::randn([6, 6], opts) * 0.3).set_requires_grad(true);
    let w2 = (Tensor::randn([6, 6], opts) * 0.3).set_requires_grad(true);
    (x, w1, w2)
}

/// Two layers and a loss; with `ckpt` each layer goes through the shim.
/// Returns the loss, the gradients of x, w1, w2 and a draw made after.
fn run(p: f64, ckpt: bool) -> (f64, Vec<Tensor>, Tensor) {
    let (x, w1, w2) = params();
    tch::manual_seed(11);
    let apply = |h: &Tensor, w: &Tensor| -> Tensor {
        if ckpt {
            let wc = w.shallow_clone();
            let f: Recompute = Box::new(move |i: &[Tensor]| layer(&i[0], &wc, p));
            checkpoint(&[h.shallow_clone()], &[w.shallow_clone()], f).unwrap()
        } else {
            layer(h, w, p)
        }
    };
    let h = apply(&x, &w1);
    let out = apply(&h, &w2);
    let loss = (&out * &out).sum(Kind::Float) + out.sum(Kind::Float);
    loss.backward();
    let after = Tensor::rand([3], (Kind::Float, Device::Cpu));
    let grads = [&x, &w1, &w2].iter().map(|t| t.grad()).collect();
    (loss.double_value(&[]), grads, after)
}

#[test]
fn gradients_equal_the_plain_path_with_and_without_dropout() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for p in [0.0, 0.3] {
        let before = recomputed();
        let (l0, g0, a0) = run(p, false);
        let (l1, g1, a1) = run(p, true);
        assert_eq!(recomputed() - before, 2, "both layers recomputed");
        assert_eq!(l0, l1, "p {p}: loss");
        for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d <= 1e-6, "p {p}: gradient {i} differs by {d}");
        }
        assert!(
            a0.equal(&a1),
            "p {p}: the random stream after backward differs"
        );
    }
}

#[test]
fn without_gradients_it_is_a_plain_call() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (x, w, _) = params();
    let before = recomputed();
    let wc = w.shallow_clone();
    let f: Recompute = Box::new(move |i: &[Tensor]| layer(&i[0], &wc, 0.0));
    let out = tch::no_grad(|| checkpoint(&[x.shallow_clone()], &[w.shallow_clone()], f)).unwrap();
    assert!(!out.requires_grad());
    assert!(out.allclose(&layer(&x, &w, 0.0).detach(), 0.0, 0.0, false));
    assert_eq!(recomputed(), before);
}

#[test]
fn a_layer_that_panics_in_backward_is_an_error() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (x, w, _) = params();
    let wc = w.shallow_clone();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let calls = std::sync::Arc::new(calls);
    let seen = calls.clone();
    let f: Recompute = Box::new(move |i: &[Tensor]| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            panic!("recompute refused");
        }
        layer(&i[0], &wc, 0.0)
    });
    let out = checkpoint(&[x.shallow_clone()], &[w.shallow_clone()], f).unwrap();
    let err = out.sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(err.contains("recompute refused"), "{err}");
}
