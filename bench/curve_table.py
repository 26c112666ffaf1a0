"""Tables of learning curves from run directories named `<variant>-s<seed>`
(what bench/curve.sh and the session sweeps write): held-out evaluation per
step (eval.jsonl) and the ITM loss and ITM accuracy on positives over the
last fifth of training (metrics.jsonl), mean ± standard deviation over
seeds, n = seeds that reached the step.

Usage: python3 bench/curve_table.py OUT_DIR [VARIANT ...]
"""

import json
import pathlib
import statistics
import sys


def cell(values, scale=100.0, digits=1):
    v = [x * scale for x in values]
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f} (n={len(v)})"


def main():
    out = pathlib.Path(sys.argv[1])
    runs = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir() and "-s" in p.name):
        variant, seed = d.name.rsplit("-s", 1)
        runs.setdefault(variant, []).append(d)
    variants = sys.argv[2:] or sorted(runs)
    print("| variant | step | matching ITM % | matching ITC % | retrieval i2t R@1 % | t2i R@1 % |")
    print("|---|---|---|---|---|---|")
    for variant in variants:
        by_step = {}
        for d in runs.get(variant, []):
            f = d / "eval.jsonl"
            for line in f.read_text().splitlines() if f.exists() else []:
                e = json.loads(line)
                by_step.setdefault(e["step"], []).append(e)
        for step, es in sorted(by_step.items()):
            print(f"| {variant} | {step} | {cell([e['matching']['itm_acc'] for e in es])} | "
                  f"{cell([e['matching']['itc_acc'] for e in es])} | "
                  f"{cell([e['retrieval']['i2t_r1'] for e in es])} | "
                  f"{cell([e['retrieval']['t2i_r1'] for e in es])} |")
    print()
    print("Training, last fifth of each run (mean of the logged values per seed):")
    print()
    print("| variant | steps | ITM loss | ITM accuracy on positives % |")
    print("|---|---|---|---|")
    for variant in variants:
        losses, accs, steps = [], [], set()
        for d in runs.get(variant, []):
            f = d / "metrics.jsonl"
            if not f.exists():
                continue
            ms = [json.loads(line) for line in f.read_text().splitlines()]
            if not ms:
                continue
            last = ms[-1]["step"]
            steps.add(last)
            tail = [m for m in ms if m["step"] > 0.8 * last]
            key = "itm" if "itm" in ms[-1] else "fgitm" if "fgitm" in ms[-1] else None
            if key is None:
                continue
            losses.append(statistics.mean(m[key] for m in tail))
            accs.append(statistics.mean(m[f"{key}_acc_pos"] for m in tail))
        if losses:
            print(f"| {variant} | {'/'.join(map(str, sorted(steps)))} | {cell(losses, 1.0, 3)} | {cell(accs)} |")


if __name__ == "__main__":
    main()
