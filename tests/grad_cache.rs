//! GradCache contrastive accumulation (`train.contrastive_accum =
//! "cached"`, src/grad_cache.rs): ITC over k micro-batches equals ITC over
//! the one batch they make, in loss and every gradient; with dropout it
//! equals the same micro-batches recomputed with their seeds; the trainer
//! uses it, and momentum distillation is refused with it.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use tch::Tensor;
use vlmatch::data::loader::{make_batch, LoaderConfig};
use vlmatch::grad_cache::{micro_seed, GradCache};
use vlmatch::hooks::Hooks;
use vlmatch::step::{forward, objectives, run_objectives};
use vlmatch_core::Batch;
use vlmatch_registry::Assembly;

const MICRO: usize = 4;
const ACCUM: usize = 4;

/// ITC alone, `ACCUM` micro-batches of `MICRO`, cached; `more` on top.
fn sets(more: &[&'static str]) -> Vec<&'static str> {
    let mut s = vec![
        "objectives.itm.enabled=false",
        "objectives.mlm.enabled=false",
        "train.accum_steps=4",
        "train.contrastive_accum=\"cached\"",
    ];
    s.extend(more);
    s
}

struct Setup {
    loaded: vlmatch_registry::LoadedConfig,
    asm: Assembly,
    micro: Vec<Batch>,
}

fn setup(more: &[&'static str]) -> Setup {
    setup_with(micro_layers(&sets(more)))
}

fn setup_with(layers: vlmatch_registry::ConfigLayers) -> Setup {
    let loaded = layers.load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    tch::manual_seed(3);
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let cfg = LoaderConfig::new(&loaded.config.data, MICRO, None);
    // Sixteen pairs of distinct scenes, with two captions of one scene so
    // that a positive lies across micro-batches.
    let mut idx: Vec<usize> = (0..MICRO * ACCUM).map(|i| i * 3).collect();
    idx[5] = 1;
    let micro = idx
        .chunks(MICRO)
        .map(|c| make_batch(&ds, &tok, &cfg, c).unwrap())
        .collect();
    Setup { loaded, asm, micro }
}

/// Every trainable parameter's gradient (zero where none), then cleared.
fn take_grads(asm: &Assembly) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (name, v) in asm.vs.variables() {
        if !v.requires_grad() {
            continue;
        }
        let g = v.grad();
        let g = if g.defined() {
            g.copy()
        } else {
            v.zeros_like()
        };
        out.insert(name, g);
        if v.grad().defined() {
            let _ = v.grad().zero_();
        }
    }
    out
}

/// The cached path as the trainer runs it: the whole loss back-propagated,
/// then each micro-batch's share. Returns the loss `key` and the gradients.
fn cached_loss(s: &Setup, hooks: &Hooks, key: &str) -> (f64, BTreeMap<String, Tensor>) {
    let tc = &s.loaded.config.train;
    let batches = s.micro.iter().map(Batch::shallow_clone).collect();
    let cache = GradCache::new(&s.asm, tc, None, hooks, 0, batches);
    let whole = cache.whole().unwrap();
    let loss = value(&whole.values, key);
    whole.total.backward();
    for m in 0..ACCUM {
        let micro = cache.micro(m).unwrap();
        (micro.total / ACCUM as f64 + micro.surrogate.unwrap()).backward();
    }
    (loss, take_grads(&s.asm))
}

fn cached(s: &Setup, hooks: &Hooks) -> (f64, BTreeMap<String, Tensor>) {
    cached_loss(s, hooks, "itc")
}

/// The logged value `key`.
fn value(values: &[(String, Tensor)], key: &str) -> f64 {
    values
        .iter()
        .find(|(k, _)| k == key)
        .unwrap()
        .1
        .double_value(&[])
}

/// The loss `key` and the gradients of every objective over the batch the
/// micro-batches make, in one forward.
fn whole_batch(s: &Setup, hooks: &Hooks, key: &str) -> (f64, BTreeMap<String, Tensor>) {
    let whole = Batch::cat(&s.micro).unwrap();
    let out = objectives(&s.asm, &s.loaded.config.train, None, hooks, 0, &whole).unwrap();
    let loss = value(&out.values, key);
    out.total.backward();
    (loss, take_grads(&s.asm))
}

fn assert_close(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, rel: f64) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut nonzero = 0;
    for (name, x) in a {
        let y = &b[name];
        let scale = y.abs().max().double_value(&[]).max(1e-12);
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(
            diff <= rel * scale + 1e-9,
            "gradient of {name}: max difference {diff:e} against a scale of {scale:e}"
        );
        if scale > 1e-9 {
            nonzero += 1;
        }
    }
    // The encoders, projections and temperature all receive gradient.
    assert!(
        nonzero > a.len() / 2,
        "{nonzero} of {} gradients nonzero",
        a.len()
    );
}

/// With dropout 0, ITC over four micro-batches of four (cached) is ITC over
/// the batch of sixteen they make: the loss and every gradient.
#[test]
fn cached_itc_over_micro_batches_equals_itc_over_their_whole_batch() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup(&[]);
    let hooks = Hooks::none();
    let (itc, grads) = cached(&s, &hooks);
    let (expected, reference) = whole_batch(&s, &hooks, "itc");
    assert!(
        (itc - expected).abs() <= 1e-6 * expected.abs(),
        "ITC {itc} cached vs {expected} whole"
    );
    assert_close(&grads, &reference, 1e-5);
}

/// SigLIP is contrastive too: cached over the micro-batches it is SigLIP
/// over their whole batch.
#[test]
fn cached_siglip_equals_siglip_over_the_whole_batch() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let mut layers = micro_layers(&sets(&[]));
    layers
        .files
        .push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/siglip.toml"));
    let s = setup_with(layers);
    let hooks = Hooks::none();
    let (loss, grads) = cached_loss(&s, &hooks, "siglip");
    let (expected, reference) = whole_batch(&s, &hooks, "siglip");
    assert!(
        (loss - expected).abs() <= 1e-6 * expected.abs(),
        "{loss} vs {expected}"
    );
    assert_close(&grads, &reference, 1e-5);
}

/// With dropout 0.1 the cached path equals the same micro-batches
/// recomputed with gradient under the same seeds: the dropout masks of
/// the second pass are those of the first.
#[test]
fn with_dropout_the_cached_path_equals_the_micro_batches_recomputed() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup(&[
        "model.image.hidden_dropout_prob=0.1",
        "model.image.attention_probs_dropout_prob=0.1",
        "model.text.hidden_dropout_prob=0.1",
        "model.text.attention_probs_dropout_prob=0.1",
    ]);
    let hooks = Hooks::none();
    let (itc, grads) = cached(&s, &hooks);
    let tc = &s.loaded.config.train;
    // The reference keeps every micro-batch's graph.
    let mut images = Vec::new();
    let mut texts = Vec::new();
    for (m, batch) in s.micro.iter().enumerate() {
        tch::manual_seed(micro_seed(tc.seed, 0, m));
        let fwd = forward(&s.asm, tc, None, &hooks, batch);
        let (i, t) = fwd.embeds().unwrap();
        images.push(i.shallow_clone());
        texts.push(t.shallow_clone());
    }
    let whole = Batch::cat(&s.micro).unwrap();
    let fwd = forward(&s.asm, tc, None, &hooks, &whole)
        .with_embeds(Tensor::cat(&images, 0), Tensor::cat(&texts, 0));
    let out = run_objectives(&s.asm, &fwd, 0, |o| o.contrastive())
        .unwrap()
        .unwrap();
    let expected = out
        .values
        .iter()
        .find(|(k, _)| k == "itc")
        .unwrap()
        .1
        .double_value(&[]);
    out.total.backward();
    let reference = take_grads(&s.asm);
    assert!(
        (itc - expected).abs() <= 1e-6 * expected.abs(),
        "{itc} vs {expected}"
    );
    assert_close(&grads, &reference, 1e-5);
    // And dropout did act: without it the loss differs.
    let plain = setup(&[]);
    let (itc_plain, _) = cached(&plain, &hooks);
    assert!((itc - itc_plain).abs() > 1e-6, "dropout changed nothing");
}

/// The trainer: three steps of ITC with 4 x 4 cached log the losses of
/// 1 x 16.
#[test]
fn the_trainer_with_cached_accumulation_logs_the_whole_batch_loss() {
    let dir = scratch("grad-cache-train");
    let common = [
        "train.steps=3",
        "train.checkpoint_every=0",
        "eval.at_end=false",
        "objectives.itm.enabled=false",
        "objectives.mlm.enabled=false",
    ];
    let mut cached_sets = common.to_vec();
    cached_sets.extend([
        "train.batch_size=4",
        "train.accum_steps=4",
        "train.contrastive_accum=\"cached\"",
    ]);
    let mut whole_sets = common.to_vec();
    whole_sets.extend(["train.batch_size=16", "train.accum_steps=1"]);
    let a = losses(&run(&dir.join("cached"), &cached_sets, None).unwrap());
    let b = losses(&run(&dir.join("whole"), &whole_sets, None).unwrap());
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * y.abs(),
            "step {s}: loss {x} cached vs {y} whole"
        );
    }
}

/// Momentum distillation's queues are per micro-batch: with "cached" it is
/// refused, naming the key.
#[test]
fn cached_accumulation_with_momentum_is_a_config_error() {
    let mut layers = micro_layers(&["train.contrastive_accum=\"cached\""]);
    layers
        .files
        .push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/mod.toml"));
    let e = layers.load().err().expect("refused").to_string();
    assert!(
        e.contains("train.contrastive_accum") && e.contains("momentum"),
        "{e}"
    );
}
