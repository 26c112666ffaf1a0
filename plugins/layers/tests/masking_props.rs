//! Properties of the token masking shared by MLM, VL-RTD and NegGen.

use proptest::prelude::*;
use tch::{Kind, Tensor};
use vlmatch_core::SpecialTokens;
use vlmatch_layers::masking::{choose_positions, corrupt, replaced_labels};

const SPECIAL: SpecialTokens = SpecialTokens {
    pad: 0,
    unk: 1,
    cls: 2,
    sep: 3,
    mask: 4,
};
const VOCAB: i64 = 40;

/// A padded batch `[CLS] words [SEP] [PAD]...` from row lengths and word ids.
fn batch(rows: &[Vec<i64>]) -> (Tensor, Tensor) {
    let l = rows.iter().map(|r| r.len() + 2).max().unwrap() as i64;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for r in rows {
        let mut row = vec![SPECIAL.cls];
        row.extend(r);
        row.push(SPECIAL.sep);
        let n = row.len();
        row.resize(l as usize, SPECIAL.pad);
        ids.extend(row);
        mask.extend((0..l as usize).map(|i| i64::from(i < n)));
    }
    let b = rows.len() as i64;
    (
        Tensor::from_slice(&ids).view([b, l]),
        Tensor::from_slice(&mask).view([b, l]),
    )
}

fn rows() -> impl Strategy<Value = Vec<Vec<i64>>> {
    // Words are ids 5..VOCAB (never special); some rows are empty captions.
    prop::collection::vec(prop::collection::vec(5i64..VOCAB, 0..10), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn masking_never_touches_cls_sep_or_pad(rows in rows(), ratio in 0.0f64..1.0, seed in 0i64..100_000) {
        tch::manual_seed(seed);
        let (ids, attn) = batch(&rows);
        let keys = Tensor::arange(ids.size()[0], (Kind::Int64, tch::Device::Cpu)) + seed * 1000;
        let pos = choose_positions(&ids, &attn, SPECIAL, ratio, &keys);
        let special = ids.eq(SPECIAL.cls).logical_or(&ids.eq(SPECIAL.sep)).logical_or(&ids.eq(SPECIAL.pad));
        prop_assert!(!bool::try_from(pos.logical_and(&special).any()).unwrap());
        let out = corrupt(&ids, &pos, SPECIAL, VOCAB, 0.8, 0.1, &(keys + 7));
        // Only chosen positions change, and special tokens stay put.
        let changed = out.ne_tensor(&ids);
        prop_assert!(!bool::try_from(changed.logical_and(&pos.logical_not()).any()).unwrap());
        prop_assert!(bool::try_from(out.where_self(&special, &ids).eq_tensor(&ids).all()).unwrap());
        // A changed token is [MASK] or a non-special word.
        let bad = changed.logical_and(&out.ne(SPECIAL.mask)).logical_and(&out.lt(5));
        prop_assert!(!bool::try_from(bad.any()).unwrap());
    }

    #[test]
    fn rtd_labels_mark_exactly_the_changed_tokens(rows in rows(), seed in 0i64..100_000) {
        tch::manual_seed(seed);
        let (ids, attn) = batch(&rows);
        // Replace some real tokens, sometimes by themselves.
        let keys = Tensor::arange(ids.size()[0], (Kind::Int64, tch::Device::Cpu)) + seed * 1000;
        let pos = choose_positions(&ids, &attn, SPECIAL, 0.5, &keys);
        let draws = Tensor::randint_low(5, VOCAB, ids.size(), (Kind::Int64, tch::Device::Cpu));
        let corrupted = ids.where_self(&pos.logical_not(), &draws);
        let labels = replaced_labels(&ids, &corrupted, &attn);
        let ids_v = Vec::<i64>::try_from(ids.flatten(0, 1)).unwrap();
        let cor_v = Vec::<i64>::try_from(corrupted.flatten(0, 1)).unwrap();
        let lab_v = Vec::<f32>::try_from(labels.flatten(0, 1)).unwrap();
        let att_v = Vec::<i64>::try_from(attn.flatten(0, 1)).unwrap();
        for i in 0..ids_v.len() {
            let expected = if att_v[i] == 1 && ids_v[i] != cor_v[i] { 1.0 } else { 0.0 };
            prop_assert_eq!(lab_v[i], expected, "position {}", i);
        }
    }
}
