//! Property: a hard negative is never a positive (same image id), also with
//! duplicate image ids in the batch; a row gets -1 exactly when the batch
//! holds no negative for it; also when similarities are NaN or infinite.

use proptest::prelude::*;
use tch::{Kind, Tensor};
use vlmatch_hard_negative::sample_hard_negatives;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn never_returns_a_positive(
        ids in prop::collection::vec(0i64..4, 1..12),
        scale in 0.1f64..100.0,
        seed in 0i64..1_000_000,
        poison in any::<bool>(),
    ) {
        tch::manual_seed(seed);
        let b = ids.len() as i64;
        let ids_t = Tensor::from_slice(&ids);
        let positives = ids_t.unsqueeze(1).eq_tensor(&ids_t.unsqueeze(0));
        // Extreme similarities favour the positives, so masking must work.
        let sim = Tensor::randn([b, b], (Kind::Float, tch::Device::Cpu)) * scale
            + positives.to_kind(Kind::Float) * 1e4;
        // A diverging step's similarities: some NaN and infinite entries.
        let special = Tensor::from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        let pick = Tensor::randint(6, [b, b], (Kind::Int64, tch::Device::Cpu));
        let sim = if poison {
            let odd = special.index_select(0, &pick.clamp_max(2).view([-1])).view([b, b]);
            odd.where_self(&pick.lt(3), &sim)
        } else {
            sim
        };
        let keys = Tensor::arange(b, (Kind::Int64, tch::Device::Cpu)) + seed * 16;
        let u = vlmatch_core::random::uniform(&keys, 1).squeeze_dim(1);
        let drawn = Vec::<i64>::try_from(sample_hard_negatives(&sim, &positives, &u)).unwrap();
        for (i, &j) in drawn.iter().enumerate() {
            let has_negative = ids.iter().any(|&other| other != ids[i]);
            if has_negative {
                prop_assert!(j >= 0 && j < b, "row {} drew {}", i, j);
                prop_assert_ne!(ids[j as usize], ids[i], "row {} drew positive {} (ids {:?})", i, j, ids);
            } else {
                prop_assert_eq!(j, -1);
            }
        }
    }
}
