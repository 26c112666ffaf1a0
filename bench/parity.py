"""Training-dynamics parity: vlmatch against the independent PyTorch trainer
(bench/reference_train.py), several seeds per preset, learning curves side
by side with an agreement verdict per row.

For each preset and seed:
- vlmatch: `target/release/vlmatch train --config configs/<preset>.toml
  --set train.steps=N --set train.seed=S --set eval.every=E
  --set train.threads=1 --run-dir WORK/vlmatch/<preset>-s<S> --quiet`,
  or with `--vlmatch-runs DIR` the existing run DIR/<preset>-s<S>
  (its metrics.jsonl and eval.jsonl);
- reference: bench/reference_train.py with that run's saved config.toml
  (the same merged config), the seed S and its own data stream, over the
  data `vlmatch preview --all` dumps from the same config (training and
  held-out splits, once per distinct [data] section, under WORK/data).

Rows, per preset: the ITM loss and the ITM accuracy on positive pairs
(`<itm>` and `<itm>_acc_pos`, where <itm> is the enabled objective with
plugin `itm`: `itm` for the baseline, `fgitm` for the vlmatch preset),
averaged over the logged steps of each window (E - window, E] for E at
every evaluation step; then the held-out matching accuracy by ITM (the
verdicts the brief asks for) and by ITC (shown, judged the same way) at
each evaluation step.

Agreement of a row: |mean_vlmatch - mean_reference| < tolerance, with
  SE  = sqrt(sd_v^2 / n_v + sd_r^2 / n_r)   (sd: sample standard deviation
                                             over seeds, per side)
  tol = max(5 points, 2 SE)                  for accuracies (in points)
  tol = max(5% of the mean of both means, 2 SE)   for losses.

Writes the table as markdown (with the command, the git commit and the
per-seed values) to --write, default bench/results/parity/<presets>.md,
and the raw numbers to the same name with .json.

Usage:
  python bench/parity.py --presets baseline vlmatch --seeds 1 2 3 \\
      --steps 800 --eval-every 200 [--vlmatch-runs /work/runs/sweep]
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    print("+ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def complete(run_dir, steps, eval_every):
    """Whether a run directory holds every logged and evaluated step."""
    try:
        m = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        e = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    except OSError:
        return False
    want = {s for s in range(eval_every, steps + 1, eval_every)} if eval_every > 0 else set()
    return bool(m) and m[-1]["step"] >= steps and want <= {x["step"] for x in e}


# Keys that change nothing the reference computes (seed: compared apart;
# threads, checkpoints, devices, loader threads, distributed settings, the
# end-of-run and retrieval evaluation settings).
IGNORED = {"train": ["seed", "threads", "checkpoint_every", "keep_checkpoints", "device", "dist"],
           "data": ["workers", "prefetch"], "eval": ["at_end", "k", "rerank"]}


def relevant(cfg):
    """`cfg` without IGNORED keys and without keys at their default value
    that older configs lack (samplers' similarity_guard = false)."""
    c = json.loads(json.dumps(cfg))
    for sec, keys in IGNORED.items():
        for k in keys:
            c.get(sec, {}).pop(k, None)
    c.pop("plugins", None)
    for sec in c.get("samplers", {}).values():
        if sec.get("similarity_guard") is False:
            del sec["similarity_guard"]
    return c


def answers_for(rdir, cfg, seed, steps, eval_every):
    """Whether the reference run in `rdir` is complete and was made from
    `cfg` (apart from keys that change nothing it computes) with `seed`."""
    try:
        with open(os.path.join(rdir, "run.json")) as f:
            info = json.load(f)
        with open(os.path.join(rdir, "config.toml"), "rb") as f:
            used = tomllib.load(f)
    except OSError:
        return False
    return (info.get("complete") and info.get("swap_draws", "uniform") == "uniform"
            and info["seed"] == seed and info["steps"] == steps
            and info["eval_every"] == eval_every and relevant(used) == relevant(cfg))


def itm_name(cfg):
    names = [n for n, s in cfg.get("objectives", {}).items()
             if s.get("enabled", True) and (s.get("plugin") or n) == "itm"]
    if len(names) != 1:
        raise SystemExit(f"expected one enabled ITM objective, got {names}")
    return names[0]


def binary(args):
    if not os.path.exists(args.vlmatch):
        raise SystemExit(f"{args.vlmatch}: no vlmatch binary; `cargo build --release`, or pass another "
                         "with --vlmatch (e.g. target/debug/vlmatch)")
    return args.vlmatch


def neggen_sections(cfg):
    return [sec for sec in cfg.get("samplers", {}).values() if sec.get("plugin") == "neggen"]


def dumped(out, cfg):
    """Whether `out` holds a dump with everything the reference reads for
    `cfg` (NegGen's caption preparations came to the dump later)."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
    except OSError:
        return False
    return not neggen_sections(cfg) or "caption_preps_after_a" in meta


def data_dump(args, config_toml, cfg):
    """`vlmatch preview --all` of both splits for this [data] section and
    NegGen's tags (once)."""
    what = [cfg["data"], sorted(json.dumps(sec.get("tags")) for sec in neggen_sections(cfg))]
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    d = os.path.join(args.work, "data", key)
    for split in ("train", "heldout"):
        out = os.path.join(d, split)
        if not dumped(out, cfg):
            run([binary(args), "preview", "--preset", config_toml, "--all", "--split", split, "--out", out],
                stdout=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"))
    return os.path.join(d, "train"), os.path.join(d, "heldout")


def generated(cfg, itm):
    """The ITM objective's generated-negative samplers: name -> plugin."""
    out = {}
    for s in cfg["objectives"][itm].get("samplers", []):
        plugin = cfg.get("samplers", {}).get(s, {}).get("plugin") or s
        if plugin in ("word_swap", "neggen"):
            out[s] = plugin
    return out


def window_mean(metrics, key, end, width, required=True):
    xs = [m[key] for m in metrics if end - width < m["step"] <= end and key in m]
    if not xs:
        if not required:
            return None
        raise SystemExit(f"no `{key}` logged in steps ({end - width}, {end}]")
    return sum(xs) / len(xs)


def share(metrics, num, den, end, width):
    """sum(num) / sum(den) over the logged steps of the window, or None."""
    rows = [m for m in metrics if end - width < m["step"] <= end and num in m and den in m]
    d = sum(m[den] for m in rows)
    return sum(m[num] for m in rows) / d if d else None


def eval_at(evals, step, key):
    for e in evals:
        if e["step"] == step:
            return e["matching"][key]
    raise SystemExit(f"no held-out evaluation at step {step}")


def summary(xs):
    mean = sum(xs) / len(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return mean, sd


def verdict(v, r, kind):
    (mv, sv), (mr, sr) = summary(v), summary(r)
    se = math.sqrt((sv ** 2 / len(v) if len(v) > 1 else 0) + (sr ** 2 / len(r) if len(r) > 1 else 0))
    floor = 5.0 if kind == "acc" else 0.05 * (mv + mr) / 2
    tol = max(floor, 2 * se)
    return mv - mr, tol, abs(mv - mr) < tol


def git(*a):
    return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["baseline", "vlmatch"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--window", type=int, help="steps averaged for the training rows (default: --eval-every)")
    ap.add_argument("--vlmatch-runs", help="reuse DIR/<name> instead of training vlmatch")
    ap.add_argument("--name", default="{preset}-s{seed}",
                    help="run directory name, a pattern of {preset} and {seed} (default: %(default)s)")
    ap.add_argument("--work", default=os.path.join(ROOT, "target", "parity"))
    ap.add_argument("--vlmatch", default=os.path.join(ROOT, "target", "release", "vlmatch"),
                    help="the vlmatch binary (default: %(default)s; target/debug/vlmatch works too)")
    ap.add_argument("--layer", action="append", default=[], metavar="FILE",
                    help="config files layered over configs/<preset>.toml for vlmatch train (repeatable; "
                         "e.g. configs/wordswap.toml, with a --name that tells the runs apart)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra `--set KEY=VALUE` for vlmatch train (and so the reference)")
    ap.add_argument("--force", action="store_true", help="retrain reference runs that are complete")
    ap.add_argument("--write", help="markdown output (default bench/results/parity/<presets>.md)")
    args = ap.parse_args()
    window = args.window or args.eval_every
    ends = list(range(args.eval_every, args.steps + 1, args.eval_every))
    if not ends:
        raise SystemExit("--eval-every must be in 1..--steps")
    os.makedirs(args.work, exist_ok=True)

    results = {}
    timing = {}
    checks = {}
    for preset in args.presets:
        for seed in args.seeds:
            name = args.name.format(preset=preset, seed=seed)
            if args.vlmatch_runs:
                vdir = os.path.join(args.vlmatch_runs, name)
                if not complete(vdir, args.steps, args.eval_every):
                    raise SystemExit(f"{vdir}: no complete {args.steps}-step run with eval every {args.eval_every}")
            else:
                vdir = os.path.join(args.work, "vlmatch", name)
                if args.force or not complete(vdir, args.steps, args.eval_every):
                    # Checkpoints and the final evaluation change nothing
                    # that is compared; they are left out to save time.
                    sets = [f"train.steps={args.steps}", f"train.seed={seed}",
                            f"eval.every={args.eval_every}", "train.threads=1",
                            "train.checkpoint_every=0", "eval.at_end=false", *args.sets]
                    cmd = [binary(args), "train", "--config", f"configs/{preset}.toml"]
                    for layer in args.layer:
                        cmd += ["--config", layer]
                    for s in sets:
                        cmd += ["--set", s]
                    run(cmd + ["--run-dir", vdir, "--quiet"], stdout=subprocess.DEVNULL,
                        env=dict(os.environ, RUST_LOG="warn"))
            config_toml = os.path.join(vdir, "config.toml")
            with open(config_toml, "rb") as f:
                cfg = tomllib.load(f)
            if cfg["train"]["steps"] != args.steps or cfg["train"]["seed"] != seed:
                raise SystemExit(f"{config_toml}: steps {cfg['train']['steps']}, seed {cfg['train']['seed']}")
            train_dir, held_dir = data_dump(args, config_toml, cfg)
            # One reference run per (preset, seed, config that matters).
            digest = hashlib.sha256(json.dumps(relevant(cfg), sort_keys=True).encode()).hexdigest()[:8]
            rdir = os.path.join(args.work, "reference", f"{preset}-s{seed}-{digest}")
            if args.force or not answers_for(rdir, cfg, seed, args.steps, args.eval_every):
                run([args.python, os.path.join(ROOT, "bench", "reference_train.py"), "--config", config_toml,
                     "--train", train_dir, "--heldout", held_dir, "--seed", seed,
                     "--eval-every", args.eval_every, "--threads", 1, "--out", rdir])
            with open(os.path.join(rdir, "run.json")) as f:
                info = json.load(f)
            timing[name] = {"vlmatch_wall_s": read_jsonl(os.path.join(vdir, "metrics.jsonl"))[-1]["time_s"],
                            "reference_wall_s": info["wall_s"], "reference_cpu_s": info["cpu_s"]}
            if os.path.exists(os.path.join(vdir, "checkpoints", "latest")):
                out = subprocess.run(
                    [args.python, os.path.join(ROOT, "bench", "reference_train.py"), "check-eval", vdir,
                     "--heldout", held_dir], check=True, capture_output=True, text=True, cwd=ROOT).stdout
                checks[name] = json.loads(out.strip().splitlines()[-1])
            key = itm_name(cfg)
            gen = generated(cfg, key)
            for side, d in (("vlmatch", vdir), ("reference", rdir)):
                m = read_jsonl(os.path.join(d, "metrics.jsonl"))
                e = read_jsonl(os.path.join(d, "eval.jsonl"))
                r = results.setdefault(preset, {"itm": key, "rows": {}})["rows"]
                for end in ends:
                    lo = max(end - window, 0)
                    for group, (label, value, kind) in enumerate((
                        (f"{key} loss, steps {lo + 1}-{end}", window_mean(m, key, end, window), "loss"),
                        (f"{key}_acc_pos (%), steps {lo + 1}-{end}",
                         100 * window_mean(m, f"{key}_acc_pos", end, window), "acc"),
                        (f"held-out matching ITM (%), step {end}", 100 * eval_at(e, end, "itm_acc"), "acc"),
                        (f"held-out matching ITC (%), step {end}", 100 * eval_at(e, end, "itc_acc"), "acc"),
                    )):
                        row = r.setdefault(label, {"kind": kind, "order": (group, end),
                                                   "vlmatch": [], "reference": []})
                        row[side].append(value)
                    # Generated negatives: how many, and how well the ITM
                    # head tells them apart (steps without any log none).
                    for s, plugin in gen.items():
                        extra = [(f"{key}_acc_{s} (%), steps {lo + 1}-{end}",
                                  window_mean(m, f"{key}_acc_{s}", end, window, required=False))]
                        if plugin == "neggen":
                            extra.append((f"{key}_{s}_produced per caption (%), steps {lo + 1}-{end}",
                                          share(m, f"{key}_{s}_produced", f"{key}_{s}_captions", end, window)))
                        for j, (label, value) in enumerate(extra):
                            row = r.setdefault(label, {"kind": "acc", "order": (1.5 + j / 10, end),
                                                       "vlmatch": [], "reference": []})
                            if value is not None:
                                row[side].append(100 * value)

    # Table: training rows first (by window), then the held-out rows.
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    cmd = "python bench/parity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"Command: `{cmd}`  ",
        f"Commit: {commit}{' (with uncommitted changes)' if dirty else ''}; "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"vlmatch runs: {args.vlmatch_runs or os.path.join(args.work, 'vlmatch')}; "
        f"seeds {', '.join(map(str, args.seeds))}; {args.steps} steps; "
        f"training rows averaged over the logged steps of each {window}-step window.",
        "",
        "Agree: |difference of means| < max(5 points, 2 SE) for accuracies, "
        "max(5% of the mean, 2 SE) for losses; SE = sqrt(sd_v^2/n_v + sd_r^2/n_r), "
        "sd the sample standard deviation over seeds.",
        "",
    ]
    all_agree = True
    for preset, res in results.items():
        lines += [f"**{preset}** (ITM objective `{res['itm']}`)", "",
                  "| | vlmatch mean ± sd | reference mean ± sd | difference | tolerance | agree | vlmatch per seed | reference per seed |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, row in sorted(res["rows"].items(), key=lambda kv: kv[1]["order"]):
            v, r = row["vlmatch"], row["reference"]
            if not v or not r:
                lines.append(f"| {label} | " + " | ".join(
                    "(none logged)" if not xs else " ".join(f"{x:.1f}" for x in xs) for xs in (v, r))
                    + " | | | n/a | | |")
                continue
            diff, tol, ok = verdict(v, r, row["kind"])
            all_agree &= ok
            (mv, sv), (mr, sr) = summary(v), summary(r)
            f = "{:.3f}" if row["kind"] == "loss" else "{:.1f}"
            per = lambda xs: " ".join(f.format(x) for x in xs)  # noqa: E731
            lines.append(
                f"| {label} | {f.format(mv)} ± {f.format(sv)} | {f.format(mr)} ± {f.format(sr)} | "
                f"{diff:+.3f} | {tol:.3f} | {'yes' if ok else '**no**'} | {per(v)} | {per(r)} |"
            )
        lines.append("")
    if checks:
        lines += ["Forward check: each vlmatch run's final checkpoint loaded into the reference model "
                  "(strictly by name) and scored by the reference's held-out evaluation, against the "
                  "run's own evaluation at that step:", "",
                  "| run | step | ITM matching vlmatch / reference (%) | ITC matching vlmatch / reference (%) "
                  "| ITC i2t R@1 vlmatch / reference (%) |", "|---|---|---|---|---|"]
        for name, c in checks.items():
            v, r = c["vlmatch"], c["reference"]
            if v is None:
                lines.append(f"| {name} | {c['step']} | (no vlmatch evaluation at this step) | | |")
                continue
            lines.append(f"| {name} | {c['step']} | {100 * v['matching']['itm_acc']:.2f} / "
                         f"{100 * r['matching']['itm_acc']:.2f} | {100 * v['matching']['itc_acc']:.2f} / "
                         f"{100 * r['matching']['itc_acc']:.2f} | {100 * v['retrieval']['i2t_r1']:.2f} / "
                         f"{100 * r['retrieval']['i2t_r1']:.2f} |")
        lines.append("")
    lines.append("Training time, s (vlmatch wall / reference wall / reference CPU; wall time depends on "
                 "what else ran): " + ", ".join(
                     f"{k} {t['vlmatch_wall_s']:.0f} / {t['reference_wall_s']:.0f} / {t['reference_cpu_s']:.0f}"
                     for k, t in timing.items()))
    lines.append("")
    text = "\n".join(lines)
    print(text)
    out = args.write or os.path.join(ROOT, "bench", "results", "parity", "-".join(args.presets) + ".md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"command": cmd, "commit": commit, "dirty": bool(dirty), "steps": args.steps,
                   "seeds": args.seeds, "window": window, "results": results, "timing": timing,
                   "forward_checks": checks}, f, indent=1)
    print(f"wrote {out}; {'all rows agree' if all_agree else 'some rows disagree'}")


if __name__ == "__main__":
    main()
