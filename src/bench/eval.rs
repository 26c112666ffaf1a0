//! `vlmatch bench --eval`: re-ranked retrieval, vlmatch's protocol
//! ([`crate::eval::rerank_encoded`]: each candidate pair fused once, each
//! image's cross-attention keys and values once) against ALBEF's loop in
//! the PyTorch reference (`bench/reference.py --eval`: per query, its top k
//! by ITC, the ITM head on each of its k candidates), on the same model
//! weights and the same generated set, timed end to end (encoders,
//! similarities, re-ranking, recalls) on each side. Both rank by the ITM
//! match probability and break ties by ITC order, so the recalls must agree.
//!
//! The set: `images` random images (pixels drawn from N(0, 1)) and
//! `captions_per_image` captions each, random word-piece ids of random
//! lengths. An untrained model scores them arbitrarily but not in ties,
//! which is all a timing and agreement check needs.

use super::{run_reference, sync, write_file, write_init};
use crate::setup;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{Encoded, EncoderInput, Error, Result, TextBatch};
use vlmatch_registry::ConfigLayers;

pub struct EvalBenchOptions {
    pub layers: ConfigLayers,
    pub out: PathBuf,
    pub images: usize,
    pub captions_per_image: usize,
    pub k: usize,
    /// `(python, script)` of the PyTorch reference; `None`: vlmatch only.
    pub reference: Option<(PathBuf, PathBuf)>,
}

/// The generated set: pixels `[n, 3, S, S]`, caption ids and masks
/// `[m, L]`, caption `j`'s image `j / captions_per_image`.
fn generated_set(
    n: usize,
    per_image: usize,
    image_size: i64,
    max_len: i64,
    vocab: i64,
    first_word: i64,
    special: (i64, i64, i64),
) -> (Tensor, Tensor, Tensor) {
    let (cls, sep, pad) = special;
    let m = (n * per_image) as i64;
    let images = Tensor::randn(
        [n as i64, 3, image_size, image_size],
        (Kind::Float, Device::Cpu),
    );
    let words = Tensor::randint_low(first_word, vocab, [m, max_len], (Kind::Int64, Device::Cpu));
    // Lengths from 3 (one word) to max_len tokens.
    let lens = Tensor::randint_low(3.min(max_len), max_len + 1, [m], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(max_len, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let lens = lens.unsqueeze(1);
    let mask = pos.lt_tensor(&lens).to_kind(Kind::Int64);
    let ids = words
        .where_self(&pos.lt_tensor(&(&lens - 1)), &Tensor::from(sep))
        .where_self(&pos.ge(1), &Tensor::from(cls))
        .where_self(&mask.to_kind(Kind::Bool), &Tensor::from(pad));
    (images, ids, mask)
}

pub fn bench_eval(opts: &EvalBenchOptions) -> Result<Value> {
    let loaded = opts.layers.load()?;
    let cfg = loaded.config.clone();
    let threads = setup::threads(&cfg.train);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(cfg.train.seed as i64);
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tok = Arc::new(setup::tokenizer(&loaded)?);
    let (asm, env) = setup::model(&loaded, &tok)?;
    let device = env.device;
    let sp = tok.special;
    // Word pieces: every id above the special tokens.
    let first_word = [sp.pad, sp.unk, sp.cls, sp.sep, sp.mask]
        .into_iter()
        .max()
        .unwrap_or(0)
        + 1;
    let (images, ids, mask) = generated_set(
        opts.images.max(1),
        opts.captions_per_image.max(1),
        cfg.data.image_size,
        cfg.data.max_len,
        tok.vocab_size() as i64,
        first_word,
        (sp.cls, sp.sep, sp.pad),
    );
    let owner: Vec<usize> = (0..ids.size()[0] as usize)
        .map(|j| j / opts.captions_per_image.max(1))
        .collect();
    write_init(&asm.vs, out)?;
    Tensor::write_safetensors(
        &[
            ("images".to_string(), images.shallow_clone()),
            ("ids".to_string(), ids.shallow_clone()),
            ("mask".to_string(), mask.shallow_clone()),
        ],
        out.join("eval_inputs.safetensors"),
    )?;
    write_file(&out.join("config.toml"), loaded.to_toml())?;
    let bs = cfg.eval.batch_size.max(1) as i64;
    let meta = json!({
        "eval": true,
        "device": format!("{device:?}"),
        "cuda": matches!(device, Device::Cuda(_)),
        "compute": format!("{:?}", env.compute),
        "threads": threads,
        "vocab_size": tok.vocab_size(),
        "special": {"pad": sp.pad, "unk": sp.unk, "cls": sp.cls, "sep": sp.sep, "mask": sp.mask},
        "images": opts.images, "captions_per_image": opts.captions_per_image,
        "k": opts.k, "batch_size": bs,
    });
    write_file(
        &out.join("meta.json"),
        serde_json::to_string_pretty(&meta).expect("json"),
    )?;

    // vlmatch: encode in eval batches, then the protocol; timed end to end.
    let (images, ids, mask) = (
        images.to_device(device),
        ids.to_device(device),
        mask.to_device(device),
    );
    let bar = indicatif::ProgressBar::hidden();
    let started = Instant::now();
    let r = tch::no_grad(|| -> Result<crate::eval::RerankedRetrieval> {
        let encode = |n: i64, f: &dyn Fn(i64, i64) -> Result<Tensor>| -> Result<Tensor> {
            let mut parts = Vec::new();
            let mut s = 0;
            while s < n {
                let len = bs.min(n - s);
                parts.push(f(s, len)?);
                s += len;
            }
            Ok(Tensor::cat(&parts, 0))
        };
        let image_hidden = encode(images.size()[0], &|s, n| {
            Ok(asm
                .model
                .image
                .forward_t(EncoderInput::Image(&images.narrow(0, s, n)), false)?
                .hidden)
        })?;
        let text_hidden = encode(ids.size()[0], &|s, n| {
            let part = TextBatch::new(ids.narrow(0, s, n), mask.narrow(0, s, n));
            Ok(asm
                .model
                .text
                .forward_t(EncoderInput::Text(&part), false)?
                .hidden)
        })?;
        let image_enc = Encoded {
            mask: Tensor::ones(
                [image_hidden.size()[0], image_hidden.size()[1]],
                (Kind::Int64, device),
            ),
            hidden: image_hidden,
        };
        let text_enc = Encoded {
            hidden: text_hidden,
            mask: mask.shallow_clone(),
        };
        crate::eval::rerank_encoded(
            &asm.model,
            &image_enc,
            &text_enc,
            &owner,
            opts.k,
            vlmatch_registry::config::Rerank::Itm,
            None,
            &bar,
        )
    })?;
    sync(device);
    let seconds = started.elapsed().as_secs_f64();
    let recalls = |r: &Value| -> Vec<f64> {
        ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"]
            .iter()
            .map(|k| r[k].as_f64().unwrap_or(f64::NAN) * 100.0)
            .collect()
    };
    let mine = serde_json::to_value(&r).expect("serialisable");
    eprintln!(
        "vlmatch: {:.2} s for {} images x {} captions at k = {} ({} pairs fused of {} naive; \
         recalls {:?})",
        seconds,
        r.images,
        r.captions,
        r.k,
        r.fused_pairs,
        r.naive_pairs,
        recalls(&mine)
    );
    let mut result = json!({"meta": meta, "vlmatch": mine, "vlmatch_seconds": seconds});
    if let Some((python, script)) = &opts.reference {
        let reference = run_reference(python, script, out, &["--eval"], "reference-eval.json")?;
        let theirs = recalls(&reference);
        let worst = recalls(&mine)
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let ref_s = reference["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "retrieval, {} images x {} captions, k = {}: vlmatch {seconds:.2} s, reference \
             (ALBEF's loop) {ref_s:.2} s: {:.2}x the reference's time ({:.2}x faster); recalls \
             differ by at most {worst:.2} points",
            r.images,
            r.captions,
            r.k,
            seconds / ref_s,
            ref_s / seconds
        );
        result["reference"] = reference;
        result["ratio"] = json!(seconds / ref_s);
        result["max_recall_difference_points"] = json!(worst);
    } else {
        println!("retrieval: vlmatch {seconds:.2} s (no reference run)");
    }
    let path = out.join("bench-eval.json");
    write_file(&path, serde_json::to_string_pretty(&result).expect("json"))?;
    Ok(result)
}
