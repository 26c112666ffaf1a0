//! Keyed random draws (`vlmatch_core::random`): a row's draw depends on its
//! key only (not on the other rows, the batch's size or its split over
//! ranks), categorical draws never pick a column of weight 0, and their
//! frequencies follow the weights.

use proptest::prelude::*;
use tch::{Kind, Tensor};
use vlmatch_core::random::{categorical, uniform};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_rows_draws_depend_on_its_key_only(
        keys in prop::collection::vec(any::<i64>(), 2..20),
        split in 1usize..19,
        cols in 1i64..40,
    ) {
        let split = split.min(keys.len() - 1);
        let all = uniform(&Tensor::from_slice(&keys), cols);
        let head = uniform(&Tensor::from_slice(&keys[..split]), cols);
        let tail = uniform(&Tensor::from_slice(&keys[split..]), cols + 3);
        prop_assert!(bool::try_from(all.narrow(0, 0, split as i64).eq_tensor(&head).all()).unwrap());
        // More columns only add columns: the first `cols` are the same.
        prop_assert!(bool::try_from(
            all.narrow(0, split as i64, (keys.len() - split) as i64)
                .eq_tensor(&tail.narrow(1, 0, cols))
                .all()
        ).unwrap());
        let v = Vec::<f32>::try_from(all.flatten(0, 1)).unwrap();
        prop_assert!(v.iter().all(|&x| x > 0.0 && x < 1.0));
    }

    #[test]
    fn categorical_never_draws_a_column_of_weight_zero(
        weights in prop::collection::vec(prop::collection::vec(prop_oneof![Just(0.0f32), 0.0f32..5.0], 1..12), 1..10),
        seed in any::<i64>(),
    ) {
        let c = weights.iter().map(Vec::len).min().unwrap();
        let rows: Vec<Vec<f32>> = weights
            .iter()
            .map(|r| {
                let mut r = r[..c].to_vec();
                if r.iter().all(|&w| w == 0.0) {
                    r[c - 1] = 1.0;
                }
                r
            })
            .collect();
        let flat: Vec<f32> = rows.concat();
        let w = Tensor::from_slice(&flat).view([rows.len() as i64, c as i64]);
        let keys = Tensor::arange(rows.len() as i64, (Kind::Int64, tch::Device::Cpu)) + seed / 2;
        let u = uniform(&keys, 1).squeeze_dim(1);
        let drawn = Vec::<i64>::try_from(categorical(&w, &u)).unwrap();
        for (r, &j) in drawn.iter().enumerate() {
            prop_assert!(j >= 0 && (j as usize) < c);
            prop_assert!(rows[r][j as usize] > 0.0, "row {} drew column {} of weight 0", r, j);
        }
    }
}

#[test]
fn categorical_frequencies_follow_the_weights() {
    let n = 200_000i64;
    let weights = [0.1f32, 0.0, 0.6, 0.3];
    let w = Tensor::from_slice(&weights)
        .view([1, 4])
        .expand([n, 4], false);
    let u = uniform(&Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)), 1).squeeze_dim(1);
    let drawn = categorical(&w, &u);
    for (j, &p) in weights.iter().enumerate() {
        let f = drawn
            .eq(j as i64)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        // Binomial standard error at n = 200k is ~0.001.
        assert!(
            (f - p as f64).abs() < 0.005,
            "column {j}: frequency {f}, weight {p}"
        );
    }
}

#[test]
fn below_draws_every_index_equally_often() {
    // The word-swap and NegGen-cache choices: one keyed uniform per row,
    // turned into an index below n. Each index must come out ~1/n of the
    // time (a scale-then-modulo draw once gave index 0 for every n = 2).
    let rows = 60_000i64;
    let u = Vec::<f32>::try_from(
        uniform(&Tensor::arange(rows, (Kind::Int64, tch::Device::Cpu)), 1).view([-1]),
    )
    .unwrap();
    for n in 1..=12usize {
        let mut counts = vec![0usize; n];
        for &x in &u {
            counts[vlmatch_core::random::below(x, n)] += 1;
        }
        let expected = rows as f64 / n as f64;
        for (i, &c) in counts.iter().enumerate() {
            // Binomial sd is at most ~122 here; 6 sd of slack.
            assert!(
                (c as f64 - expected).abs() < 6.0 * expected.sqrt().max(1.0),
                "n = {n}: index {i} drawn {c} times, expected {expected:.0}"
            );
        }
    }
}
