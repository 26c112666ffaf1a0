//! ALBEF's NLVR2 fusion (`images = 2`): every layer doubled, the pair's
//! cross-attention key and value held once and shared, even layers reading
//! the left image and odd layers the right.

use tch::{nn, Device, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput};
use vlmatch_cross_attention::{CrossAttentionConfig, CrossAttentionFusion};

fn cfg(layers: i64) -> CrossAttentionConfig {
    CrossAttentionConfig {
        num_hidden_layers: layers,
        num_attention_heads: 4,
        intermediate_size: 64,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        layer_norm_eps: 1e-12,
    }
}

fn states(b: i64, n: i64, d: i64) -> Encoded {
    Encoded {
        hidden: Tensor::randn([b, n, d], (Kind::Float, Device::Cpu)),
        mask: Tensor::ones([b, n], (Kind::Int64, Device::Cpu)),
    }
}

#[test]
fn layers_double_and_share_cross_attention_keys_and_values() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let fusion = CrossAttentionFusion::new(&vs.root(), &cfg(2), 32, 24, 2, Kind::Float).unwrap();
    assert_eq!(fusion.images(), 2);
    let names: Vec<String> = vs.variables().into_keys().collect();
    for layer in 0..4 {
        for part in [
            "attention.self.query.weight",
            "crossattention.self.query.weight",
            "crossattention.output.dense.weight",
            "output.LayerNorm.weight",
        ] {
            let name = format!("layer.{layer}.{part}");
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        for part in ["key", "value"] {
            let name = format!("layer.{layer}.crossattention.self.{part}.weight");
            // The odd layer of a pair owns no key/value: it uses the even one's.
            assert_eq!(names.contains(&name), layer % 2 == 0, "{name}");
        }
    }
    assert!(
        !names.iter().any(|n| n.starts_with("layer.4.")),
        "{names:?}"
    );
    // One single-image fusion of 2 layers, plus 2 more layers without
    // cross-attention key and value.
    let single = nn::VarStore::new(Device::Cpu);
    let _ = CrossAttentionFusion::new(&single.root(), &cfg(2), 32, 24, 1, Kind::Float).unwrap();
    let count = |vs: &nn::VarStore| -> i64 {
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    };
    let kv = 2 * (24 * 32 + 32);
    assert_eq!(count(&vs), 2 * count(&single) - 2 * kv);

    // Shared means one tensor: writing layer 0's key changes what layer 1 reads.
    let kvs = fusion.cross_key_value_weights();
    assert_eq!(kvs.len(), 4);
    let mut key0 = vs
        .variables()
        .remove("layer.0.crossattention.self.key.weight")
        .unwrap();
    let new = Tensor::randn(key0.size(), (Kind::Float, Device::Cpu));
    tch::no_grad(|| key0.copy_(&new));
    for (first, second) in [(0, 1), (2, 3)] {
        for (a, b) in kvs[first].iter().zip(kvs[second]) {
            assert_eq!(a.data_ptr(), b.data_ptr(), "layers {first} and {second}");
        }
    }
    assert!(kvs[1][0].equal(&new));
    assert_ne!(kvs[0][0].data_ptr(), kvs[2][0].data_ptr());
}

#[test]
fn pair_fusion_reads_both_images_in_order_and_only_pairs() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let fusion = CrossAttentionFusion::new(&vs.root(), &cfg(1), 32, 24, 2, Kind::Float).unwrap();
    let text = states(3, 6, 32);
    let (left, right) = (states(3, 5, 24), states(3, 5, 24));
    let run = |images: [&Encoded; 2]| {
        fusion
            .forward_cls(
                EncoderInput::FusedPair {
                    text: &text,
                    images,
                },
                false,
            )
            .unwrap()
            .hidden
    };
    let full = fusion
        .forward_t(
            EncoderInput::FusedPair {
                text: &text,
                images: [&left, &right],
            },
            false,
        )
        .unwrap()
        .hidden;
    let cls = run([&left, &right]);
    assert_eq!(cls.size(), [3, 1, 32]);
    assert!(cls.allclose(&full.narrow(1, 0, 1), 1e-5, 1e-6, false));
    // Left and right are not interchangeable.
    let swapped = run([&right, &left]);
    assert!((&cls - swapped).abs().max().double_value(&[]) > 1e-3);

    let err = fusion
        .forward_t(
            EncoderInput::Fused {
                text: &text,
                image: &left,
            },
            false,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("two images per text"), "{err}");
    let single_vs = nn::VarStore::new(Device::Cpu);
    let single =
        CrossAttentionFusion::new(&single_vs.root(), &cfg(1), 32, 24, 1, Kind::Float).unwrap();
    let err = single
        .forward_t(
            EncoderInput::FusedPair {
                text: &text,
                images: [&left, &right],
            },
            false,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.fusion.images = 2"), "{err}");
}
