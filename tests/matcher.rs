//! `vlmatch embed`, `search`, `score` and `filter` on the built-in data with
//! a micro run of `configs/vlmatch.toml` (so the VL-RTD discriminator is
//! trained): search equals a brute-force top-k over the index's bytes and,
//! re-ranked, `eval --task retrieval`'s ranking; a killed embed resumes to
//! the same bytes; a score file resumes to the same lines; filter keeps
//! exactly the pairs at or above its threshold; a mismatched index and
//! model are refused.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use vlmatch::commands::matcher::{
    embed_cmd, filter_cmd, score_cmd, search_cmd, EmbedArgs, FilterArgs, ScoreArgs, SearchArgs,
};
use vlmatch::matcher::filter::By;
use vlmatch::matcher::index::Dtype;

/// The run (micro model, `configs/vlmatch.toml`, 4 steps) and the held-out
/// split written by `preview` (16 PNG images, 48 captions), made once.
fn fixture_run() -> &'static (PathBuf, PathBuf) {
    static RUN: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    RUN.get_or_init(|| {
        let (run_dir, data) = vlmatch_run_and_heldout(&scratch("matcher"));
        (run_dir, data.join("annotations.jsonl"))
    })
}

fn embed_args(run: &Path, data: &Path, out: &Path, dtype: Dtype, chunk: usize) -> EmbedArgs {
    EmbedArgs {
        checkpoint: run.to_path_buf(),
        data: Some(data.display().to_string()),
        captions: None,
        image_root: None,
        split: None,
        out: out.to_path_buf(),
        dtype,
        only: None,
        chunk,
        batch: Some(7),
        sets: vec![],
        quiet: true,
    }
}

fn search_args(run: &Path, index: &Path) -> SearchArgs {
    SearchArgs {
        checkpoint: run.to_path_buf(),
        index: index.to_path_buf(),
        text: vec![],
        queries: None,
        image: vec![],
        k: 5,
        rerank: None,
        block: 3,
        batch: Some(64),
        sets: vec![],
    }
}

/// `[rows, dim]` little-endian f32 from an index's chunk files, read here
/// byte by byte rather than through the library.
fn raw_f32(index: &Path, kind: &str, dim: usize) -> Vec<Vec<f64>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(index.join(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut bytes = Vec::new();
    for f in files {
        bytes.extend(std::fs::read(f).unwrap());
    }
    let values: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    values.chunks(dim).map(<[f64]>::to_vec).collect()
}

/// Each query's top `k` rows by dot product, computed in f64 one by one.
fn brute_force(queries: &[Vec<f64>], keys: &[Vec<f64>], k: usize) -> Vec<Vec<(usize, f64)>> {
    queries
        .iter()
        .map(|q| {
            let mut s: Vec<(usize, f64)> = keys
                .iter()
                .enumerate()
                .map(|(j, key)| (j, q.iter().zip(key).map(|(a, b)| a * b).sum()))
                .collect();
            s.sort_by(|a, b| b.1.total_cmp(&a.1));
            s.truncate(k);
            s
        })
        .collect()
}

fn rows(t: &tch::Tensor) -> Vec<Vec<f64>> {
    let n = t.size()[0];
    (0..n)
        .map(|i| Vec::<f64>::try_from(t.get(i).to_kind(tch::Kind::Double)).unwrap())
        .collect()
}

#[test]
fn search_equals_a_brute_force_top_k_over_the_index() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-search");
    let index = dir.join("index");
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let summary = embed_cmd(&embed_args(run, data, &index, Dtype::F32, 5)).unwrap();
    assert_eq!((summary.images, summary.texts), (16, 48));
    let captions: Vec<String> = std::fs::read_to_string(data.with_file_name("captions.txt"))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap().to_string())
        .collect();
    let mut args = search_args(run, &index);
    args.text = vec![
        captions[0].clone(),
        captions[20].clone(),
        "a large red circle".into(),
    ];
    args.image = vec![
        data.with_file_name("0003.png"),
        data.with_file_name("0011.png"),
    ];
    let answers = search_cmd(&args).unwrap();
    assert_eq!(answers.len(), 5);

    // The same query embeddings, and the index's stored rows.
    let l = vlmatch::run::load_run(run, &[]).unwrap();
    let emb = vlmatch::matcher::embed::Embedder::new(&l.asm.model, &l.tok, &l.loaded.config);
    let refs: Vec<&str> = args.text.iter().map(String::as_str).collect();
    let tq = rows(&vlmatch::matcher::embed::embed_queries(&emb, &refs, 64).unwrap());
    let qimg =
        vlmatch::matcher::search::files_dataset(args.image.iter().map(PathBuf::as_path), "q");
    let iq = rows(&emb.images(&qimg, &[0, 1]).unwrap());
    let dim = summary.dim;
    let want = brute_force(&tq, &raw_f32(&index, "images", dim), 5)
        .into_iter()
        .chain(brute_force(&iq, &raw_f32(&index, "texts", dim), 5));
    for (answer, want) in answers.iter().zip(want) {
        let ids: Vec<usize> = answer.hits.iter().map(|h| h.row).collect();
        let want_ids: Vec<usize> = want.iter().map(|w| w.0).collect();
        assert_eq!(ids, want_ids, "{}", answer.query);
        for (h, w) in answer.hits.iter().zip(&want) {
            assert!((h.itc - w.1).abs() < 1e-6, "{} vs {}", h.itc, w.1);
        }
    }
    // Hits carry the items: images their paths, captions their text.
    assert!(answers[0].hits[0]
        .path
        .as_deref()
        .unwrap()
        .ends_with(".png"));
    let hit = &answers[3].hits[0];
    assert_eq!(hit.caption.as_deref(), Some(captions[hit.row].as_str()));
}

#[test]
fn reranked_search_ranks_as_eval_retrieval() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-rerank");
    let index = dir.join("index");
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    embed_cmd(&embed_args(run, data, &index, Dtype::F32, 64)).unwrap();
    let k = 4;
    let eval = vlmatch::commands::eval::eval_task(
        run,
        "retrieval",
        &vlmatch::commands::eval::DataArg {
            path: data.clone(),
            image_root: None,
            split: None,
            labels: None,
        },
        &[format!("eval.k={k}"), "eval.rerank=\"itm\"".into()],
        false,
    )
    .unwrap();
    let idx = vlmatch::matcher::index::Index::open(&index).unwrap();
    let mut args = search_args(run, &index);
    args.k = k;
    args.rerank = Some(k);
    args.text = idx.texts.iter().map(|t| t.caption.clone()).collect();
    args.image = (0..16)
        .map(|i| data.with_file_name(format!("{i:04}.png")))
        .collect();
    let answers = search_cmd(&args).unwrap();
    let (text_answers, image_answers) = answers.split_at(idx.texts.len());
    let recall = |ranks: &[Option<usize>], r: usize| {
        ranks.iter().filter(|x| x.is_some_and(|x| x < r)).count() as f64 / ranks.len() as f64
    };
    // Caption queries: where its own image ranks.
    let ir: Vec<Option<usize>> = text_answers
        .iter()
        .zip(&idx.texts)
        .map(|(a, t)| a.hits.iter().position(|h| Some(h.id) == t.image_id))
        .collect();
    // Image queries: where the first of its captions ranks.
    let tr: Vec<Option<usize>> = image_answers
        .iter()
        .zip(&idx.images)
        .map(|(a, img)| a.hits.iter().position(|h| h.image_id == Some(img.id)))
        .collect();
    for a in &answers {
        assert!(a.hits.iter().all(|h| h.itm.is_some()));
        let itm: Vec<f64> = a.hits.iter().map(|h| h.itm.unwrap()).collect();
        assert!(itm.windows(2).all(|w| w[0] >= w[1]), "{itm:?}");
    }
    // Re-ranking changed some ITC order, so the comparison below is not
    // one of plain ITC rankings.
    assert!(answers
        .iter()
        .any(|a| a.hits.windows(2).any(|w| w[0].itc < w[1].itc)));
    let ours = [
        recall(&tr, 1),
        recall(&tr, 5),
        recall(&tr, 10),
        recall(&ir, 1),
        recall(&ir, 5),
        recall(&ir, 10),
    ];
    let theirs: Vec<f64> = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"]
        .iter()
        .map(|key| eval[key].as_f64().unwrap())
        .collect();
    assert_eq!(ours.to_vec(), theirs, "eval: {eval}");
}

/// Every file of an index directory with its bytes, by relative path.
fn index_files(d: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    for sub in ["", "images", "texts"] {
        for e in std::fs::read_dir(d.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                all.push((
                    p.strip_prefix(d).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    all.sort();
    all
}

/// `vlmatch embed` of the held-out set in chunks of 6; with `launch =
/// (rank, world, port)` as that rank of a loopback launch; with `env` set.
fn embed_process(
    run: &Path,
    data: &Path,
    out: &Path,
    launch: Option<(usize, usize, u16)>,
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlmatch"));
    cmd.args(["embed", "--quiet", "--chunk", "6", "--batch", "4"])
        .arg("--out")
        .arg(out);
    launched(cmd, run, data, launch, env)
}

/// `cmd` on the run and data, as rank `launch = (rank, world, port)` of a
/// loopback launch or alone, with `env` set.
fn launched(
    mut cmd: Command,
    run: &Path,
    data: &Path,
    launch: Option<(usize, usize, u16)>,
    env: &[(&str, &str)],
) -> Command {
    cmd.arg("--checkpoint")
        .arg(run)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(var);
    }
    if let Some((rank, world, port)) = launch {
        cmd.env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
    }
    cmd
}

#[test]
fn two_ranks_embed_the_bytes_of_one_process() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-ranks");
    let one = dir.join("one");
    let out = embed_process(run, data, &one, None, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let two = dir.join("two");
    let outs = two_ranks(|launch| embed_process(run, data, &two, launch, &[]));
    // Rank 0 alone prints the summary.
    assert!(String::from_utf8_lossy(&outs[0].stdout).contains("chunks_written"));
    assert!(outs[1].stdout.is_empty());
    assert!(
        index_files(&one) == index_files(&two),
        "two ranks wrote other bytes"
    );
}

/// Two loopback ranks of `cmd(rank)`; their outputs once both exit.
fn two_ranks(cmd: impl Fn(Option<(usize, usize, u16)>) -> Command) -> Vec<std::process::Output> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            cmd(Some((r, 2, port)))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    outs
}

#[test]
fn two_ranks_score_the_lines_of_one_process() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-score-ranks");
    let score = |out: &Path, launch| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlmatch"));
        cmd.args(["score", "--quiet", "--tokens", "--batch", "5", "--out"])
            .arg(out);
        launched(cmd, run, data, launch, &[])
    };
    let one = dir.join("one.jsonl");
    let out = score(&one, None).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let two = dir.join("two.jsonl");
    let outs = two_ranks(|launch| score(&two, launch));
    let summary = String::from_utf8_lossy(&outs[0].stdout).to_string();
    assert!(summary.contains(r#""scored":48"#), "{summary}");
    assert!(outs[1].stdout.is_empty());
    let (a, b) = (
        std::fs::read_to_string(&one).unwrap(),
        std::fs::read_to_string(&two).unwrap(),
    );
    assert_eq!(a.lines().count(), 48);
    assert!(a == b, "two ranks wrote other lines");
}

#[test]
fn a_killed_embed_resumes_to_the_same_index_bytes() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-kill");
    let embed = |out: &Path, kill: Option<&str>| {
        let env: Vec<(&str, &str)> = kill
            .map(|n| (vlmatch::matcher::embed::KILL_AFTER_CHUNKS, n))
            .into_iter()
            .collect();
        embed_process(run, data, out, None, &env).output().unwrap()
    };
    let whole = dir.join("whole");
    let out = embed(&whole, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed = dir.join("resumed");
    // Killed after the 4th chunk file (the 2nd of the captions) is written,
    // before its progress is recorded.
    let out = embed(&resumed, Some("4"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progress = std::fs::read_to_string(resumed.join("progress.json")).unwrap();
    assert_eq!(progress.trim(), r#"{"images":3,"texts":0}"#);
    let err = vlmatch::matcher::index::Index::open(&resumed)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unfinished"), "{err}");
    let out = embed(&resumed, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["chunks_resumed"], 3, "{summary}");
    assert_eq!(summary["chunks_written"], 8, "{summary}");
    let (a, b) = (index_files(&whole), index_files(&resumed));
    let names: Vec<_> = a.iter().map(|f| f.0.display().to_string()).collect();
    assert_eq!(names.len(), 4 + 3 + 8, "{names:?}");
    assert!(
        a == b,
        "the resumed index differs from the uninterrupted one"
    );
}

#[test]
fn score_resumes_and_filter_keeps_exactly_the_pairs_at_or_above_the_threshold() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-filter");
    let scores = dir.join("scores.jsonl");
    let args = ScoreArgs {
        checkpoint: run.clone(),
        data: data.display().to_string(),
        image_root: None,
        split: None,
        out: Some(scores.clone()),
        tokens: true,
        batch: Some(5),
        sets: vec![],
        quiet: true,
    };
    let whole = {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        let s = score_cmd(&args).unwrap();
        assert_eq!((s.pairs, s.scored, s.errors), (48, 48, 0));
        std::fs::read_to_string(&scores).unwrap()
    };
    let lines: Vec<serde_json::Value> = whole
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 48);
    for l in &lines {
        let words = l["words"].as_array().unwrap();
        assert!(!words.is_empty());
        assert!(words
            .iter()
            .all(|w| (0.0..=1.0).contains(&w["mismatch"].as_f64().unwrap())));
    }
    // As if killed after 10 pairs were recorded and while writing more:
    // the record says 10, the file holds a torn line past them.
    let cut: usize = whole.lines().take(10).map(|l| l.len() + 1).sum();
    let record = vlmatch::matcher::score::progress_path(&scores);
    let mut r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    r["pairs"] = 10.into();
    r["bytes"] = cut.into();
    std::fs::write(&record, r.to_string()).unwrap();
    std::fs::write(&scores, format!("{}{{\"pair\":10,\"ima", &whole[..cut])).unwrap();
    {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        let s = score_cmd(&args).unwrap();
        assert_eq!((s.resumed_at, s.scored), (10, 38));
    }
    assert_eq!(std::fs::read_to_string(&scores).unwrap(), whole);

    // A threshold that is one pair's own score: that pair is kept.
    let mut itm: Vec<f64> = lines.iter().map(|l| l["itm"].as_f64().unwrap()).collect();
    itm.sort_by(f64::total_cmp);
    let threshold = itm[itm.len() / 2];
    let out = dir.join("kept.jsonl");
    let report = filter_cmd(&FilterArgs {
        scores: scores.clone(),
        out: out.clone(),
        by: By::Itm,
        threshold,
        report: None,
        png: Some(dir.join("hist.png")),
        bins: 10,
    })
    .unwrap();
    let want: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l["itm"].as_f64().unwrap() >= threshold)
        .map(|l| serde_json::json!({"image": l["image"], "caption": l["caption"], "image_id": l["image_id"]}))
        .collect();
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got, want);
    assert_eq!(report.kept, want.len());
    assert_eq!(report.dropped["below threshold"], 48 - want.len());
    assert_eq!(report.histogram.counts.iter().sum::<usize>(), 48);
    assert!(std::fs::read(dir.join("hist.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));
    assert!(dir.join("kept.jsonl.report.json").is_file());
    // The kept file is an annotation file the data reader takes, beside
    // the images.
    let kept_beside = data.with_file_name("kept.jsonl");
    std::fs::copy(&out, &kept_beside).unwrap();
    let ds = vlmatch::data::annotations::load(&kept_beside, None).unwrap();
    assert_eq!(ds.pairs.len(), want.len());

    // By words: 1 - the highest word mismatch.
    let r = filter_cmd(&FilterArgs {
        scores: scores.clone(),
        out: dir.join("words.jsonl"),
        by: By::WordMatch,
        threshold: 0.5,
        report: None,
        png: None,
        bins: 10,
    })
    .unwrap();
    let by_words = lines
        .iter()
        .filter(|l| {
            let worst = l["words"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["mismatch"].as_f64().unwrap())
                .fold(0.0, f64::max);
            1.0 - worst >= 0.5
        })
        .count();
    assert_eq!(r.kept, by_words);
}

#[test]
fn a_mismatched_index_and_model_are_refused() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-mismatch");
    let index = dir.join("index");
    let other = dir.join("other");
    {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        embed_cmd(&embed_args(run, data, &index, Dtype::F16, 64)).unwrap();
    }
    // Another run: the baseline objectives (no VL-RTD), another seed.
    common::run(
        &other,
        &["train.steps=2", "eval.at_end=false", "train.seed=7"],
        None,
    )
    .unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = search_args(&other, &index);
    args.text = vec!["a red circle".into()];
    let err = search_cmd(&args).err().unwrap().to_string();
    assert!(err.contains("does not belong to run"), "{err}");
    // The same run with another preprocessing is another model.
    let mut args = search_args(run, &index);
    args.text = vec!["a red circle".into()];
    args.sets = vec!["data.max_len=20".into()];
    let err = search_cmd(&args).err().unwrap().to_string();
    assert!(err.contains("config hash"), "{err}");
    // Embedding into it with another model is refused too.
    let err = embed_cmd(&embed_args(&other, data, &index, Dtype::F16, 64))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("differs in the model"), "{err}");
    // A run without a discriminator cannot score words.
    let err = score_cmd(&ScoreArgs {
        checkpoint: other.clone(),
        data: data.display().to_string(),
        image_root: None,
        split: None,
        out: None,
        tokens: true,
        batch: None,
        sets: vec![],
        quiet: true,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("without a VL-RTD objective"), "{err}");
}

#[test]
fn filter_of_shard_scores_writes_a_shard_of_the_kept_pairs() {
    let (run, data) = fixture_run();
    let dir = scratch("matcher-shards");
    // The held-out set as one shard: KEY.png and KEY.json per image.
    let mut tar = Vec::new();
    let annotations = std::fs::read_to_string(data).unwrap();
    for line in annotations.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let image = v["image"].as_str().unwrap();
        let key = image.trim_end_matches(".png");
        tar_entry(
            &mut tar,
            image,
            &std::fs::read(data.with_file_name(image)).unwrap(),
        );
        let json = serde_json::json!({"caption": v["caption"], "image_id": v["image_id"]});
        tar_entry(
            &mut tar,
            &format!("{key}.json"),
            json.to_string().as_bytes(),
        );
    }
    tar_end(&mut tar);
    let shard = dir.join("heldout-000.tar");
    std::fs::write(&shard, tar).unwrap();
    let scores = dir.join("scores.jsonl");
    {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        score_cmd(&ScoreArgs {
            checkpoint: run.clone(),
            data: shard.display().to_string(),
            image_root: None,
            split: None,
            out: Some(scores.clone()),
            tokens: false,
            batch: None,
            sets: vec![],
            quiet: true,
        })
        .unwrap();
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&scores)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut itc: Vec<f64> = lines.iter().map(|l| l["itc"].as_f64().unwrap()).collect();
    itc.sort_by(f64::total_cmp);
    let threshold = itc[itc.len() / 3];
    let filter = |out: &Path| {
        filter_cmd(&FilterArgs {
            scores: scores.clone(),
            out: out.to_path_buf(),
            by: By::Itc,
            threshold,
            report: None,
            png: None,
            bins: 10,
        })
    };
    // Shard scores go to a shard, not an annotation file.
    let err = filter(&dir.join("kept.jsonl")).err().unwrap().to_string();
    assert!(err.contains("ending in .tar"), "{err}");
    let report = filter(&dir.join("kept.tar")).unwrap();
    let kept =
        vlmatch::data::load_any(&dir.join("kept.tar").display().to_string(), None, None).unwrap();
    let original = vlmatch::data::load_any(&shard.display().to_string(), None, None).unwrap();
    let want: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["itc"].as_f64().unwrap() >= threshold)
        .collect();
    assert_eq!(report.kept, want.len());
    assert!(want.len() < lines.len() && !want.is_empty());
    assert_eq!(kept.pairs.len(), want.len());
    let bytes = |ds: &vlmatch::data::Dataset, i: usize| match &ds.images[i] {
        vlmatch::data::ImageRef::File { bytes: Some(b), .. } => b.0.clone(),
        _ => panic!("shard images are in memory"),
    };
    // The same pairs (captions with their image ids), each with its
    // image's original bytes.
    let mut got: Vec<(String, i64)> = kept
        .pairs
        .iter()
        .map(|p| (p.caption.clone(), kept.image_ids[p.image]))
        .collect();
    let mut expected: Vec<(String, i64)> = want
        .iter()
        .map(|l| {
            (
                l["caption"].as_str().unwrap().to_string(),
                l["image_id"].as_i64().unwrap(),
            )
        })
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    for p in &kept.pairs {
        let j = original
            .pairs
            .iter()
            .position(|o| {
                o.caption == p.caption && original.image_ids[o.image] == kept.image_ids[p.image]
            })
            .unwrap();
        assert_eq!(
            bytes(&kept, p.image),
            bytes(&original, original.pairs[j].image)
        );
    }
}
