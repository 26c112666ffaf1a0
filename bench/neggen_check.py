"""The reference's NegGen (bench/reference_neggen.py) against vlmatch's on the
same weights: a trained vlmatch run's checkpoint is loaded into the
reference model, and both sides generate for the captions of the first N
training images.

1. Fills: `vlmatch neggen` with every filter off and one try per caption
   (pos_check = false, candidates = 1, no ITM filter) writes each fill;
   the reference fills the same captions (its own choices of words, three
   passes). Reported: the share of each replacement word on both sides and
   the total variation distance between the two distributions.
2. pos_check: vlmatch's own tagging of each of vlmatch's filled captions
   (`vlmatch preview --all` of them as an annotation file dumps NegGen's
   caption preparation) against the reference's stand-in (`Lexicon`):
   how often the two verdicts agree.
3. Produced: with the run's NegGen settings, the share of captions that get
   a negative on each side (`vlmatch neggen` writes every kept try; the
   reference counts as in training), at the checkpoint's step.

Usage:
  python bench/neggen_check.py RUN [--data D/train] [--images 200] \\
      [--vlmatch target/release/vlmatch] [--work target/parity/neggen-check]
with RUN a vlmatch run of a config whose NegGen section is
`[samplers.neggen]` (e.g. a parity run of the vlmatch preset,
target/parity/vlmatch/vlmatch-s1) and D/train that config's
`vlmatch preview --all` dump (made under WORK when not given).
Writes WORK/check.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tomllib
import warnings
from collections import Counter

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_neggen as rn  # noqa: E402
import reference_train as rt  # noqa: E402
from reference_model import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vlmatch(args, *cmd):
    subprocess.run([args.vlmatch, *cmd], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, RUST_LOG="warn"))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--data", help="the run config's `vlmatch preview --all` (training split; default: made "
                                   "under --work)")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--vlmatch", default=os.path.join(ROOT, "target", "release", "vlmatch"))
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "parity", "neggen-check"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for k in ("run", "data", "vlmatch", "work"):
        if getattr(args, k) is not None:
            setattr(args, k, os.path.abspath(getattr(args, k)))
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)
    config = os.path.join(args.run, "config.toml")
    with open(config, "rb") as f:
        cfg = tomllib.load(f)
    if cfg.get("samplers", {}).get("neggen", {}).get("plugin") != "neggen":
        raise SystemExit(f"{config}: no [samplers.neggen] with plugin = \"neggen\" (what `vlmatch neggen` reads)")
    if args.data is None:
        args.data = os.path.join(args.work, "train")
        vlmatch(args, "preview", "--preset", config, "--all", "--out", args.data)
    split = rt.Split(args.data, cfg)
    sp = split.meta["special"]
    tok = rt.WordPiece(os.path.join(args.data, "vocab.txt"), cfg["data"].get("lowercase", True), sp)
    model = rt.Model(cfg, {"vocab_size": tok.size})
    ckpt = os.path.join(args.run, "checkpoints")
    with open(os.path.join(ckpt, "latest")) as f:
        tensors = load_file(os.path.join(ckpt, os.path.basename(f.read().strip())))
    step = int(tensors["state.step"].item())
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    model.eval()
    ng = rn.NegGen(cfg["samplers"]["neggen"], "samplers.neggen", tok, split, model, args.seed)
    pairs = [p for p in split.pairs if p["image_index"] < args.images]
    ann = os.path.join(args.work, "annotations.jsonl")
    with open(os.path.join(args.data, "annotations.jsonl")) as f, open(ann, "w") as g:
        g.writelines(line for line, _ in zip(f, range(args.images)))

    # 1. Fills, every filter off, one try per caption.
    fills_out = os.path.join(args.work, "vlmatch-fills.jsonl")
    vlmatch(args, "neggen", "--checkpoint", args.run, "--data", ann, "--image-root", args.data, "--out", fills_out,
            "--quiet", "--set", "samplers.neggen.pos_check=false", "--set", "samplers.neggen.candidates=1",
            "--set", "samplers.neggen.filter_after_steps=1000000000000")
    theirs = read_jsonl(fills_out)
    fv = Counter(m["replacement"] for n in theirs for m in n["masked_words"])
    fr = Counter()
    for _ in range(3):
        plans = [ng.plan(p["caption"], ng.choose(rn.candidates_of(p, ng.prep))) for p in pairs]
        plans = [pl for pl in plans if pl is not None]
        with torch.no_grad():
            filled = ng.fill(plans)
        for pl, f in zip(plans, filled):
            words = ng.realise(pl, f).split(" ")
            fr.update(rn.core(words[w]) for (w, *_r) in pl["spans"])
    nv, nr = sum(fv.values()), sum(fr.values())
    tv = 0.5 * sum(abs(fv[w] / nv - fr[w] / nr) for w in set(fv) | set(fr))

    # 2. vlmatch's tagging of vlmatch's fills against the stand-in.
    neg_ann = os.path.join(args.work, "fills-as-captions.jsonl")
    with open(neg_ann, "w") as g:
        for n in theirs:
            g.write(json.dumps({"image": "0000.png", "caption": n["negative"]}) + "\n")
    tags_dir = os.path.join(args.work, "fills-tagged")
    vlmatch(args, "preview", "--preset", config, "--set", 'data.source="annotations"',
            "--set", f"data.annotations={json.dumps(os.path.abspath(neg_ann))}",
            "--set", f"data.image_root={json.dumps(os.path.abspath(args.data))}",
            "--set", f"data.vocab={json.dumps(os.path.abspath(os.path.join(args.data, 'vocab.txt')))}",
            "--all", "--out", tags_dir)
    tagged = {p["caption"]: set(rn.candidates_of(p, ng.prep))
              for p in read_jsonl(os.path.join(tags_dir, "pairs.jsonl"))}
    verdicts = Counter()
    for n in theirs:
        masked = [m["index"] for m in n["masked_words"]]
        real = all(i in tagged[n["negative"]] for i in masked)
        ours = ng.keeps_kind(n["negative"], {"spans": [(i,) for i in masked]})
        verdicts[f"vlmatch {'keeps' if real else 'drops'}, reference {'keeps' if ours else 'drops'}"] += 1

    # 3. Produced, with the run's settings, at the checkpoint's step.
    kept_out = os.path.join(args.work, "vlmatch-kept.jsonl")
    vlmatch(args, "neggen", "--checkpoint", args.run, "--data", ann, "--image-root", args.data, "--out", kept_out,
            "--quiet")
    produced_v = len({(n["image_id"], n["caption"]) for n in read_jsonl(kept_out)})
    counts = Counter()
    bs = cfg["train"]["batch_size"]
    for a in range(0, len(pairs), bs):
        batch = pairs[a:a + bs]
        ids, _mask = rt.padded([p["ids"] for p in batch], sp["pad"])
        images = split.pixels(torch.tensor([p["image_index"] for p in batch]))
        with torch.no_grad():
            image = model.vision_encoder(images)
        positives = rt.batch_positives(images, ids, torch.tensor([p["image_id"] for p in batch]))
        ng.sample(batch, ids, image, positives, step, cfg["data"]["max_len"], rt.padded)
        counts.update(ng.stats)

    out = {"run": args.run, "step": step, "captions": len(pairs),
           "fills": {"vlmatch": nv, "reference": nr, "total_variation": tv,
                     "top": [(w, fv[w] / nv, fr[w] / nr) for w, _ in (fv + fr).most_common(12)]},
           "pos_check": dict(verdicts),
           "produced": {"vlmatch": produced_v / len(pairs), "reference": counts["produced"] / counts["captions"]}}
    with open(os.path.join(args.work, "check.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"{len(pairs)} captions of the first {args.images} images, weights of {args.run} at step {step}")
    print(f"fills (every filter off): total variation distance {tv:.3f} ({nv} vlmatch, {nr} reference fills)")
    for w, a, b in out["fills"]["top"]:
        print(f"  {w:12s} vlmatch {100 * a:5.1f}%  reference {100 * b:5.1f}%")
    agree = sum(v for k, v in verdicts.items() if k.count("keeps") != 1)
    print(f"pos_check on vlmatch's fills: the stand-in agrees with vlmatch's tagger on {agree}/{len(theirs)}: "
          f"{dict(verdicts)}")
    print(f"produced per caption (run's settings): vlmatch {100 * out['produced']['vlmatch']:.1f}%, "
          f"reference {100 * out['produced']['reference']:.1f}%")


if __name__ == "__main__":
    main()
