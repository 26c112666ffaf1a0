//! Sharing each image's cross-attention keys and values among its pairs
//! (`forward_cls_indexed`) is exact: outputs and gradients (of the text
//! states, the image states and every parameter) equal the plain path on
//! `image.select(index)` within 1e-6 in fp32.

use tch::{nn, Device, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput};
use vlmatch_cross_attention::{CrossAttentionConfig, CrossAttentionFusion};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn shared_image_keys_and_values_are_exact() {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = CrossAttentionConfig {
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        layer_norm_eps: 1e-12,
    };
    let fusion = CrossAttentionFusion::new(&vs.root(), &cfg, 32, 24, 1, Kind::Float).unwrap();
    let (b, l, u, n) = (9, 7, 4, 5);
    // Pairs re-use images in any order, some not at all in a row.
    let index = Tensor::from_slice(&[0i64, 2, 2, 1, 0, 3, 3, 3, 1]);
    let text_mask = Tensor::ones([b, l], (Kind::Int64, Device::Cpu));
    let _ = text_mask.narrow(1, 5, 2).narrow(0, 0, 3).fill_(0);
    let image_mask = Tensor::ones([u, n], (Kind::Int64, Device::Cpu));
    let _ = image_mask.narrow(1, 4, 1).narrow(0, 1, 1).fill_(0);
    let run = |indexed: bool| {
        let text_hidden =
            Tensor::randn([b, l, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let image_hidden =
            Tensor::randn([u, n, 24], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let text = Encoded {
            hidden: text_hidden.shallow_clone(),
            mask: text_mask.shallow_clone(),
        };
        let image = Encoded {
            hidden: image_hidden.shallow_clone(),
            mask: image_mask.shallow_clone(),
        };
        let out = if indexed {
            fusion
                .forward_cls_indexed(&text, &image, &index, true)
                .unwrap()
        } else {
            let per_pair = image.select(&index);
            fusion
                .forward_cls(
                    EncoderInput::Fused {
                        text: &text,
                        image: &per_pair,
                    },
                    true,
                )
                .unwrap()
        };
        let weights = Tensor::randn(out.hidden.size(), (Kind::Float, Device::Cpu));
        (&out.hidden * weights).sum(Kind::Float).backward();
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| {
                let g = v.grad().copy();
                let _ = v.grad().zero_();
                (k, g)
            })
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (
            out.hidden.detach(),
            text_hidden.grad(),
            image_hidden.grad(),
            grads,
        )
    };
    tch::manual_seed(11);
    let plain = run(false);
    tch::manual_seed(11);
    let shared = run(true);
    assert!(max_diff(&plain.0, &shared.0) < 1e-6, "outputs differ");
    assert!(
        max_diff(&plain.1, &shared.1) < 1e-6,
        "text gradients differ"
    );
    assert!(
        max_diff(&plain.2, &shared.2) < 1e-6,
        "image gradients differ"
    );
    assert!(!plain.3.is_empty());
    for ((name, a), (_, g)) in plain.3.iter().zip(&shared.3) {
        let scale = a.abs().max().double_value(&[]).max(1.0);
        assert!(
            max_diff(a, g) < 1e-6 * scale,
            "gradient of {name} differs by {}",
            max_diff(a, g)
        );
    }
}
