//! Random draws keyed by sample, not by batch layout.
//!
//! A draw for a row of a batch is a pure function of the row's key (its
//! place in the run's global sample order, [`crate::Batch::sample_keys`]),
//! the step and the column, computed on the device with an integer hash
//! (SplitMix64's finaliser in wrapping 64-bit arithmetic). So a mask, a
//! hard negative or a swapped word does not depend on how the global batch
//! is split over ranks, nor on the padding of the local batch: two ranks
//! holding 8 pairs each draw what one process holding all 16 draws.
//!
//! Categorical draws invert the cumulative weights at one keyed uniform per
//! row, which samples exactly from `w / sum(w)`.

use tch::{Kind, Tensor};

/// SplitMix64's finaliser, element-wise on an i64 tensor.
pub fn hash(x: &Tensor) -> Tensor {
    // Logical right shift: arithmetic shift, then clear the sign-extended bits.
    let shr = |z: &Tensor, s: i64| {
        z.bitwise_right_shift_tensor_scalar(s)
            .bitwise_and(((1u64 << (64 - s)) - 1) as i64)
    };
    let z = x + (0x9E37_79B9_7F4A_7C15u64 as i64);
    let z = z.bitwise_xor_tensor(&shr(&z, 30)) * (0xBF58_476D_1CE4_E5B9u64 as i64);
    let z = z.bitwise_xor_tensor(&shr(&z, 27)) * (0x94D0_49BB_1331_11EBu64 as i64);
    z.bitwise_xor_tensor(&shr(&z, 31))
}

/// Element-wise combination of two i64 key tensors (broadcasting).
pub fn combine(a: &Tensor, b: &Tensor) -> Tensor {
    hash(&(hash(a) * 31 + b))
}

/// [`hash`] of one integer on the host (the same wrapping arithmetic).
pub fn hash_host(x: i64) -> i64 {
    let z = (x as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// [`combine`] of two integers on the host.
pub fn combine_host(a: i64, b: i64) -> i64 {
    hash_host(hash_host(a).wrapping_mul(31).wrapping_add(b))
}

/// The same combination for plain integers, for keys built on the host.
pub fn combine_u64(a: u64, b: u64) -> i64 {
    combine_host(a as i64, b as i64)
}

/// [`uniform`] computed on the host from host keys: the same values, bit
/// for bit, without reading anything back from the device. Row-major
/// `[keys.len(), cols]`.
pub fn uniform_host(keys: &[i64], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(keys.len() * cols);
    for &k in keys {
        for c in 0..cols {
            let top = (combine_host(k, c as i64) >> 40) & ((1i64 << 24) - 1);
            out.push((top as f32 + 0.5) / (1u64 << 24) as f32);
        }
    }
    out
}

/// `[N, cols]` f32 uniforms in the open interval (0, 1): entry `(n, c)` a
/// function of `keys[n]` (`[N]` i64) and `c` only.
pub fn uniform(keys: &Tensor, cols: i64) -> Tensor {
    let c = Tensor::arange(cols, (Kind::Int64, keys.device())).unsqueeze(0);
    let h = combine(&keys.unsqueeze(1), &c);
    // The top 24 bits, centred in their cell so neither 0 nor 1 comes out.
    let top = h
        .bitwise_right_shift_tensor_scalar(40)
        .bitwise_and((1i64 << 24) - 1);
    (top.to_kind(Kind::Float) + 0.5) / (1u64 << 24) as f64
}

/// An index in `0..n` from a uniform `u` in (0, 1), each with probability
/// `1/n` up to the 24-bit resolution of [`uniform`]: `floor(u * n)`.
///
/// Do not scale `u` to a large integer and take it modulo `n`: `u` carries
/// 24 bits, so `floor(u * 2^30)` is always a multiple of 64 (plus 32), and
/// `mod n` then never lands on most indices (always 0 for n = 2, 4, 8).
pub fn below(u: f32, n: usize) -> usize {
    assert!(n > 0, "random::below needs at least one choice");
    ((u as f64 * n as f64) as usize).min(n - 1)
}

/// `[N]` i64: for each row of `weights` (`[N, C]`, non-negative, not all
/// zero) a column drawn with probability proportional to its weight, by
/// inverting the row's cumulative weights at `u` (`[N]`, in (0, 1)): one
/// uniform per row, and a column of weight 0 is never drawn.
pub fn categorical(weights: &Tensor, u: &Tensor) -> Tensor {
    let w = weights.to_kind(Kind::Float);
    let c = w.size()[1];
    let cdf = w.cumsum(1, Kind::Float);
    let total = cdf.narrow(1, c - 1, 1);
    let x = u.to_kind(Kind::Float).unsqueeze(1) * &total;
    // The first column whose cumulative weight exceeds x.
    let drawn = x
        .searchsorted(&cdf, false, true, "right", None::<Tensor>)
        .squeeze_dim(1);
    // Rounding can put x at the very top: stay on the last column that
    // has weight.
    let index = Tensor::arange(c, (Kind::Int64, w.device())).unsqueeze(0);
    let last = (w.gt(0.0).to_kind(Kind::Int64) * index).amax(1, false);
    drawn.minimum(&last)
}

/// [`categorical`] with probabilities `softmax(logits / temperature)`.
pub fn categorical_logits(logits: &Tensor, temperature: f64, u: &Tensor) -> Tensor {
    let probs = (logits.to_kind(Kind::Float) / temperature.max(1e-6)).softmax(1, Kind::Float);
    categorical(&probs, u)
}

#[cfg(test)]
mod host_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The host's uniforms are the device's, bit for bit, for any keys
        /// (including negative and extreme ones), so a sampler may draw on
        /// either side and train identically.
        #[test]
        fn host_uniforms_equal_the_devices(keys in proptest::collection::vec(any::<i64>(), 1..40), cols in 1usize..4, salt in any::<i64>()) {
            let t = Tensor::from_slice(&keys);
            let keyed = combine(&t, &Tensor::from(salt));
            let host_keyed: Vec<i64> = keys.iter().map(|&k| combine_host(k, salt)).collect();
            prop_assert_eq!(Vec::<i64>::try_from(&keyed).unwrap(), host_keyed.clone());
            let device = Vec::<f32>::try_from(uniform(&keyed, cols as i64).reshape([-1])).unwrap();
            let host = uniform_host(&host_keyed, cols);
            prop_assert_eq!(
                device.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                host.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
