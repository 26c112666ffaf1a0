//! NegGen: golden tagging, the change property (only noun/adjective words
//! change, same word count, never the caption itself), the positive filter,
//! and training with NegGen negatives in FG-ITM.

mod common;
use common::*;
use neggen::{
    candidate_words, default_tags_vec, fill, mark_candidates, piece_masks, piece_style, plan,
    realise, BrillTagger, PieceStyle,
};
use proptest::prelude::*;
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vlmatch::tokenizer::{Codec, Tokenizer};
use vlmatch_core::TextCodec;

/// Each line: a caption, a tab, the caption with NegGen's candidate words in
/// brackets (written by `cargo run -p vlmatch-neggen --example tag_captions`).
#[test]
fn tagging_of_coco_like_captions_is_unchanged() {
    let tagger = BrillTagger::new();
    let golden = std::fs::read_to_string(fixture("tagging.txt")).unwrap();
    let mut n = 0;
    for line in golden.lines() {
        let (caption, marked) = line.split_once('\t').unwrap();
        let ours = mark_candidates(caption, &tagger, &default_tags_vec());
        assert_eq!(ours, marked, "tags changed for `{caption}`");
        n += 1;
    }
    assert!(n >= 30, "only {n} golden captions");
}

fn codec() -> Codec {
    Codec {
        tokenizer: Arc::new(Tokenizer::builtin()),
        max_len: 64,
    }
}

/// The byte-level BPE (RoBERTa-style) tokenizer of the HF fixtures.
fn bpe_codec() -> Codec {
    Codec {
        tokenizer: Arc::new(
            Tokenizer::from_path(&fixture("hf/tokenizer-roberta-bpe/tokenizer.json"), false)
                .unwrap(),
        ),
        max_len: 64,
    }
}

const WORDS: [&str; 16] = [
    "a", "red", "blue", "small", "circle", "square", "dog", "man", "on", "the", "table", "left",
    "of", "and", "green", "tree",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// With any generator (random logits here), a negative keeps the word
    /// count, changes only words tagged noun or adjective, and is never the
    /// caption itself.
    #[test]
    fn negatives_change_only_noun_and_adjective_words(
        picks in prop::collection::vec(0usize..16, 1..10),
        seed in 0i64..10_000,
        bpe in any::<bool>(),
    ) {
        let caption = picks.iter().map(|&i| WORDS[i]).collect::<Vec<_>>().join(" ");
        let codec = if bpe { bpe_codec() } else { codec() };
        let style = piece_style(&codec).unwrap();
        let tagger = BrillTagger::new();
        let tags = default_tags_vec();
        let cands = candidate_words(&caption, &tagger, &tags);
        prop_assume!(!cands.is_empty());
        // libtorch's global generator is shared with the tests that train.
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let k = 1 + (seed as usize) % cands.len();
        let chosen: Vec<usize> = cands.iter().copied().take(k).collect();
        // A byte-level vocabulary never masks the caption's first word.
        let p = plan(&caption, &chosen, &codec, style);
        prop_assume!(p.is_some());
        let p = p.unwrap();
        let (first, cont) = piece_masks(&codec, Device::Cpu, style);
        let v = codec.vocab_size();
        let filled = fill(std::slice::from_ref(&p), &[seed], codec.special(), (&first, &cont), 1.0, 0, Device::Cpu, |t, pos| {
            assert_eq!(pos.size(), [t.ids.size()[0]]);
            Ok(Tensor::randn([t.ids.size()[0], v], (Kind::Float, Device::Cpu)) * 3.0)
        })
        .unwrap();
        let negative = realise(&p, &filled[0], &codec, style);
        let a: Vec<&str> = caption.split(' ').collect();
        let b: Vec<&str> = negative.split(' ').collect();
        prop_assert_eq!(a.len(), b.len(), "`{}` -> `{}`", caption, negative);
        prop_assert_ne!(&negative, &caption);
        for i in 0..a.len() {
            if a[i] != b[i] {
                prop_assert!(chosen.contains(&i) && cands.contains(&i), "word {} changed in `{}` -> `{}`", i, caption, negative);
            }
        }
    }
}

#[test]
fn fgitm_trains_with_neggen_negatives() {
    let dir = scratch("neggen-train");
    let s = run(
        &dir,
        &[
            "model.generator.plugin=\"mlm_head\"",
            "objectives.itm.samplers=[\"hard_negative\", \"neggen\"]",
            "samplers.neggen.plugin=\"neggen\"",
            "samplers.neggen.filter_after_steps=3",
            // An untrained generator's fills are rarely nouns; this test is
            // about the plumbing, so the fluency check is off.
            "samplers.neggen.pos_check=false",
            "train.steps=5",
            "eval.at_end=false",
        ],
        None,
    )
    .unwrap();
    assert_eq!(s.last_step, 5);
    assert!(
        s.logged.iter().all(|m| m["itm_acc_neggen"].is_number()),
        "{:?}",
        s.logged[0]
    );
    // NegGen's counters per batch are in metrics.jsonl: every caption of a
    // batch is seen, and what is produced, dropped or lacks a candidate adds
    // up to no more than the candidates tried.
    let batch = 8.0;
    for m in &s.logged {
        let get = |k: &str| {
            m[format!("itm_neggen_{k}").as_str()]
                .as_f64()
                .unwrap_or(-1.0)
        };
        assert_eq!(get("captions"), batch, "{m:?}");
        let (produced, none, dropped) = (
            get("produced"),
            get("no_candidate"),
            get("dropped_by_filter"),
        );
        assert!(produced >= 0.0 && none >= 0.0 && dropped >= 0.0, "{m:?}");
        assert!(produced + none <= batch, "{m:?}");
    }
    // Before filter_after_steps the ITM filter is off: only candidates
    // equal to a positive caption are dropped.
    assert!(s
        .logged
        .iter()
        .any(|m| m["itm_neggen_produced"].as_f64().unwrap() > 0.0));
}

#[test]
fn offline_neggen_writes_provenance_and_training_reads_it_back() {
    let dir = scratch("neggen-offline");
    let run_dir = dir.join("run");
    run(&run_dir, &["train.steps=3", "eval.at_end=false"], None).unwrap();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut ann = String::new();
    for (name, rgb) in [
        ("red", [220u8, 40, 40]),
        ("blue", [40, 80, 220]),
        ("green", [40, 170, 60]),
    ] {
        image::RgbImage::from_pixel(16, 16, image::Rgb(rgb))
            .save(images.join(format!("{name}.png")))
            .unwrap();
        ann.push_str(&format!(
            "{{\"image\": \"{name}.png\", \"caption\": [\"a small {name} circle on the left\", \"one {name} square\", \"on it\"]}}\n"
        ));
    }
    let data = dir.join("ann.jsonl");
    std::fs::write(&data, ann).unwrap();
    let out = dir.join("negatives.jsonl");
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    // Threshold 1: the (untrained) ITM filter keeps everything, so each
    // caption with a noun or adjective yields a line.
    let summary = vlmatch::commands::neggen::neggen_offline(
        &run_dir,
        &data,
        Some(&images),
        &out,
        &[
            "samplers.neggen.plugin=\"neggen\"".into(),
            "samplers.neggen.filter_threshold=1.0".into(),
            "samplers.neggen.pos_check=false".into(),
        ],
        false,
    )
    .unwrap();
    drop(_turn);
    assert!(
        summary.contains("9 captions") && summary.contains("3 without a noun/adjective"),
        "{summary}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    let tags = default_tags_vec();
    for l in &lines {
        let caption = l["caption"].as_str().unwrap();
        let negative = l["negative"].as_str().unwrap();
        assert_ne!(caption, negative);
        assert!(l["image"].as_str().unwrap().ends_with(".png") && l["image_id"].is_number());
        assert!(l["itm_score"]
            .as_f64()
            .is_some_and(|p| (0.0..=1.0).contains(&p)));
        let words: Vec<&str> = negative.split(' ').collect();
        for m in l["masked_words"].as_array().unwrap() {
            let i = m["index"].as_u64().unwrap() as usize;
            assert!(
                tags.contains(&m["tag"].as_str().unwrap().to_string()),
                "{m}"
            );
            assert_eq!(caption.split(' ').nth(i), m["original"].as_str());
            assert_eq!(Some(words[i]), m["replacement"].as_str());
        }
    }

    // The cache is a negative source for FG-ITM.
    let path = format!("samplers.cache.path=\"{}\"", out.display());
    let s = run(
        &dir.join("from-cache"),
        &[
            "objectives.itm.samplers=[\"hard_negative\", \"cache\"]",
            "samplers.cache.plugin=\"neggen_cache\"",
            &path,
            "data.source=\"annotations\"",
            &format!("data.annotations=\"{}\"", data.display()),
            &format!("data.image_root=\"{}\"", images.display()),
            "train.batch_size=9",
            "train.steps=2",
            "eval.at_end=false",
        ],
        None,
    )
    .unwrap();
    assert!(
        s.logged[1]["itm_acc_cache"].is_number(),
        "{:?}",
        s.logged[1]
    );
}

/// NegGen's fluency check: a candidate passes only when its replacements
/// are still nouns or adjectives in the new caption.
#[test]
fn pos_check_rejects_fills_of_another_kind() {
    use neggen::{default_tags_vec, replacements_keep_their_kind, BrillTagger};
    let tagger = BrillTagger::new();
    let tags = default_tags_vec();
    // "a red car on a black background": red (1) and background (6) masked.
    assert!(replacements_keep_their_kind(
        "a blue car on a black table",
        &[1, 6],
        &tagger,
        &tags
    ));
    assert!(!replacements_keep_their_kind(
        "a blue car on a black in",
        &[1, 6],
        &tagger,
        &tags
    ));
    assert!(!replacements_keep_their_kind(
        "a the car on a black table",
        &[1, 6],
        &tagger,
        &tags
    ));
}

/// A tagger that counts the words it tags, to see where tagging happens.
struct CountingTagger(BrillTagger, std::sync::atomic::AtomicUsize);

impl neggen::PosTagger for CountingTagger {
    fn tag_words(&self, words: &[&str]) -> Vec<String> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.tag_words(words)
    }
}

/// Tagging is the loader's: with NegGen's `TagPrep` in the loader config,
/// every caption of a batch arrives tagged (as `tagged_candidates` tags
/// it) and NegGen tags nothing itself; a batch without it is tagged by
/// NegGen with the same result.
#[test]
fn the_loader_tags_captions_for_neggen_on_its_worker_threads() {
    use vlmatch::data::loader::{make_batch, CaptionPreps, LoaderConfig};
    use vlmatch_core::NegativeSampler;
    let loaded = micro_layers(&["model.generator.plugin=\"mlm_head\"", "data.workers=3"])
        .load()
        .unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let tagger = Arc::new(CountingTagger(
        BrillTagger::new(),
        std::sync::atomic::AtomicUsize::new(0),
    ));
    let cfg: neggen::NegGenConfig = serde_json::from_str(r#"{"pos_check": false}"#).unwrap();
    let sampler = neggen::NegGen::new(cfg, tagger.clone(), Rc::new(codec()));
    let mut lc = LoaderConfig::new(&loaded.config.data, 7, None);
    lc.preps = CaptionPreps::new(sampler.caption_prep());
    let idx: Vec<usize> = (0..7).map(|i| i * 2).collect();
    let prepared = make_batch(&ds, &tok, &lc, &idx).unwrap();
    let count = || tagger.1.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(count(), 7, "the loader tags each caption once");
    let key = sampler.caption_prep().unwrap().key();
    for (i, caption) in prepared.captions.iter().enumerate() {
        let got = prepared.prepared::<neggen::Tagged>(&key, i).unwrap();
        let want = neggen::tagged_candidates(caption, &BrillTagger::new(), &default_tags_vec());
        assert_eq!(got, &want, "{caption}");
    }
    // The same draw state for both forwards (`Forward::new` would take its
    // seed from libtorch's global generator, which a test running beside
    // this one may reseed).
    let fwd = vlmatch_core::Forward::continuing(&asm.model, &prepared, false, (3, 0));
    let with_prep = sampler.candidates(&fwd, -1).unwrap();
    assert_eq!(count(), 7, "NegGen tagged again what the loader tagged");
    assert!(!with_prep.is_empty());

    // The same batch without the loader's work: NegGen tags it, the same way.
    lc.preps = CaptionPreps::default();
    let plain = make_batch(&ds, &tok, &lc, &idx).unwrap();
    assert!(plain.prepared.is_empty());
    let fwd = vlmatch_core::Forward::continuing(&asm.model, &plain, false, (3, 0));
    let without = sampler.candidates(&fwd, -1).unwrap();
    assert_eq!(count(), 14);
    let texts = |c: &[neggen::Candidate]| c.iter().map(|c| c.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&with_prep), texts(&without));
}

fn mlm_fixture() -> std::path::PathBuf {
    fixture("hf/bert-mlm-h32-4heads-vocab")
}

/// NegGen's `fill_model`: a HuggingFace BertForMaskedLM directory loads
/// with its own tokenizer and gives `transformers`' MLM logits.
#[test]
fn a_masked_lm_checkpoint_loads_with_its_tokenizer_and_matches_transformers() {
    use vlmatch_core::EncoderInput;
    let dir = mlm_fixture();
    // Building the model draws its initial weights from libtorch's global
    // generator, which the training tests beside this one seed.
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let lm = vlmatch::pretrained::load_masked_lm(&dir, Device::Cpu, Kind::Float).unwrap();
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("texts.json")).unwrap()).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batch = lm.codec.encode(&refs, Device::Cpu);
    assert!(batch.ids.equal(&expected["input_ids"]));
    let logits = tch::no_grad(|| {
        let states = lm
            .encoder
            .forward_t(EncoderInput::Text(&batch), false)
            .unwrap();
        lm.head.logits(&states, false).unwrap()
    });
    let diff = (logits - &expected["logits"]).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "MLM logits differ by {diff}");
    assert!(lm.report.contains("MLM head"), "{}", lm.report);
    assert!(
        lm.store.variables().values().all(|t| !t.requires_grad()),
        "a fill model is frozen"
    );

    // A BertModel without an MLM head cannot fill masks: a clear error.
    let Err(e) = vlmatch::pretrained::load_masked_lm(
        &fixture("hf/bert-h48-3heads-vocab"),
        Device::Cpu,
        Kind::Float,
    ) else {
        panic!("a checkpoint without cls.predictions loaded as a masked LM")
    };
    assert!(e.to_string().contains("no MLM head"), "{e}");
}

/// The words of the fill model's vocabulary (its `vocab.txt`).
fn fill_vocab() -> std::collections::HashSet<String> {
    std::fs::read_to_string(mlm_fixture().join("vocab.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// FG-ITM trains with NegGen filling from a separate checkpoint whose
/// tokenizer is not the run's, with no generator in the model; offline,
/// every replacement word comes from that checkpoint's vocabulary.
#[test]
fn neggen_fills_with_a_separate_masked_lm_online_and_offline() {
    let dir = scratch("neggen-fill-model");
    let fill = format!("samplers.neggen.fill_model=\"{}\"", mlm_fixture().display());
    let sets = [
        "objectives.itm.samplers=[\"hard_negative\", \"neggen\"]",
        "samplers.neggen.plugin=\"neggen\"",
        "samplers.neggen.filter_after_steps=1000",
        // A random fill model's words are rarely nouns: plumbing only.
        "samplers.neggen.pos_check=false",
        fill.as_str(),
        "train.steps=3",
        "eval.at_end=false",
    ];
    let s = run(&dir.join("run"), &sets, None).unwrap();
    assert_eq!(s.last_step, 3);
    assert!(
        s.logged
            .iter()
            .any(|m| m["itm_neggen_produced"].as_f64().unwrap() > 0.0),
        "{:?}",
        s.logged
    );

    let out = dir.join("negatives.jsonl");
    let data = dir.join("ann.jsonl");
    image::RgbImage::from_pixel(16, 16, image::Rgb([200u8, 30, 30]))
        .save(dir.join("red.png"))
        .unwrap();
    std::fs::write(
        &data,
        "{\"image\": \"red.png\", \"caption\": [\"a small red circle left of a large blue square\", \"one green tree\"]}\n",
    )
    .unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let sets: Vec<String> = sets[1..5]
        .iter()
        .map(|s| s.to_string())
        .chain(["samplers.neggen.filter_threshold=1.0".to_string()])
        .collect();
    let summary = vlmatch::commands::neggen::neggen_offline(
        &dir.join("run"),
        &data,
        Some(&dir),
        &out,
        &sets,
        false,
    )
    .unwrap();
    drop(_turn);
    let vocab = fill_vocab();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{summary}: {lines:?}");
    for l in &lines {
        for m in l["masked_words"].as_array().unwrap() {
            let r = m["replacement"].as_str().unwrap();
            // Whole words of the fill vocabulary, or a first piece followed
            // by `##` pieces, all of that vocabulary.
            let mut pieces = vec![];
            let mut rest = r;
            while !rest.is_empty() {
                let (n, piece) = (1..=rest.len())
                    .rev()
                    .filter(|&n| rest.is_char_boundary(n))
                    .map(|n| {
                        let p = &rest[..n];
                        (
                            n,
                            if pieces.is_empty() {
                                p.to_string()
                            } else {
                                format!("##{p}")
                            },
                        )
                    })
                    .find(|(_, p)| vocab.contains(p))
                    .unwrap_or_else(|| panic!("`{r}` is not made of the fill model's pieces"));
                pieces.push(piece);
                rest = &rest[n..];
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// A plan encodes the caption as the tokenizer encodes it whole (the
    /// masks aside), and putting each word's original pieces back realises
    /// the caption: in a WordPiece and in a byte-level BPE vocabulary.
    #[test]
    fn plans_encode_captions_as_the_tokenizer_does(
        picks in prop::collection::vec(0usize..16, 1..10),
        bits in any::<u16>(),
        bpe in any::<bool>(),
    ) {
        let caption = picks.iter().map(|&i| WORDS[i]).collect::<Vec<_>>().join(" ");
        let codec = if bpe { bpe_codec() } else { codec() };
        let style = piece_style(&codec).unwrap();
        prop_assert_eq!(style, if bpe { PieceStyle::ByteLevel } else { PieceStyle::WordPiece });
        let chosen: Vec<usize> = (0..picks.len()).filter(|i| bits >> i & 1 == 1).collect();
        let p = plan(&caption, &chosen, &codec, style);
        prop_assume!(p.is_some());
        let p = p.unwrap();
        let whole = codec.encode(&[caption.as_str()], Device::Cpu);
        let whole: Vec<i64> = Vec::try_from(whole.ids.get(0)).unwrap();
        let whole = &whole[..p.ids.len()];
        let mut filled = p.ids.clone();
        for &(w, start, n, first) in &p.spans {
            prop_assert!(chosen.contains(&w) && !(bpe && w == 0));
            prop_assert_eq!(first, whole[start]);
            filled[start..start + n].copy_from_slice(&whole[start..start + n]);
        }
        prop_assert_eq!(&filled[..], whole, "`{}`", caption);
        prop_assert_eq!(realise(&p, &filled, &codec, style), caption);
    }
}

/// NegGen takes a byte-level BPE vocabulary (RoBERTa's) as well as a
/// WordPiece one, with word starts and continuations told apart by `Ġ`; a
/// vocabulary with neither mark is refused, naming the key.
#[test]
fn neggen_fills_byte_level_bpe_and_refuses_unmarked_vocabularies() {
    let cfg = || -> neggen::NegGenConfig { serde_json::from_str("{}").unwrap() };
    let bpe = bpe_codec();
    assert!(!neggen::is_wordpiece(&bpe) && neggen::is_wordpiece(&codec()));
    assert!(
        neggen::NegGen::configured(cfg(), Rc::new(bpe_codec()), None, "samplers.neggen").is_ok()
    );
    let (first, cont) = piece_masks(&bpe, Device::Cpu, PieceStyle::ByteLevel);
    let id = |t: &str| (0..bpe.vocab_size()).find(|&i| bpe.token(i) == t);
    let starts = Vec::<bool>::try_from(&first).unwrap();
    let continues = Vec::<bool>::try_from(&cont).unwrap();
    let marked = (0..bpe.vocab_size())
        .find(|&i| {
            bpe.token(i).starts_with('\u{120}')
                && bpe.token(i).chars().skip(1).all(char::is_alphabetic)
                && bpe.token(i).chars().count() > 1
        })
        .unwrap();
    assert!(
        starts[marked as usize] && !continues[marked as usize],
        "{}",
        bpe.token(marked)
    );
    if let Some(bare) = id("a") {
        assert!(!starts[bare as usize] && continues[bare as usize]);
    }
    /// A vocabulary with neither `##` nor `Ġ` pieces.
    struct Unmarked(Codec);
    impl TextCodec for Unmarked {
        fn special(&self) -> vlmatch_core::SpecialTokens {
            self.0.special()
        }
        fn vocab_size(&self) -> i64 {
            self.0.vocab_size()
        }
        fn encode(&self, texts: &[&str], device: Device) -> vlmatch_core::TextBatch {
            self.0.encode(texts, device)
        }
        fn token(&self, id: i64) -> String {
            self.0.token(id).replace("##", "")
        }
        fn pieces(&self, text: &str) -> Vec<i64> {
            self.0.pieces(text)
        }
    }
    let Err(e) =
        neggen::NegGen::configured(cfg(), Rc::new(Unmarked(codec())), None, "samplers.neggen")
    else {
        panic!("NegGen accepted a vocabulary without word-piece marks")
    };
    let e = e.to_string();
    assert!(
        e.contains("samplers.neggen") && e.contains("WordPiece") && e.contains("byte-level BPE"),
        "{e}"
    );
}

/// The committed `configs/neggen.toml` layer puts NegGen back into the full
/// method's FG-ITM (filling with its VL-RTD generator) over
/// `configs/wordswap.toml`, and trains.
#[test]
fn the_neggen_layer_trains_with_the_vlmatch_preset() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut layers = micro_layers(&[
        "train.steps=3",
        "eval.at_end=false",
        "train.checkpoint_every=0",
    ]);
    layers.files.insert(0, root.join("configs/neggen.toml"));
    layers.files.insert(0, root.join("configs/wordswap.toml"));
    layers.files.insert(0, root.join("configs/vlmatch.toml"));
    let s = train_exclusive(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(scratch("neggen-layer")),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    assert_eq!(s.last_step, 3);
    for m in &s.logged {
        assert!(m["fgitm_acc_neggen"].is_number(), "{m:?}");
        assert!(m["fgitm_neggen_captions"].as_f64().unwrap() > 0.0, "{m:?}");
        assert!(m.get("fgitm_acc_word_swap").is_none(), "{m:?}");
    }
}
