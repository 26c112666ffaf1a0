"""The ablation table of bench/ablation.sh from run directories named
`<variant>-s<seed>`: at chosen steps, held-out matching (overall and per
kind of mismatch, by ITM), retrieval R@1/R@5, and the ITM loss and ITM
accuracy on positives over the training steps up to there (mean of the
logged values in the last fifth of them). Cells are mean ± standard
deviation over seeds (n = seeds that reached the step).

Usage: python3 bench/ablation_table.py OUT_DIR --at 300,750,1500 [VARIANT ...]
       python3 bench/ablation_table.py OUT_DIR --kinds   (the kinds evaluated)
"""

import argparse
import json
import pathlib
import statistics


def cell(values, scale=100.0, digits=1):
    v = [x * scale for x in values if x is not None]
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}" + ("" if len(v) == 3 else f" (n={len(v)})")


def read_lines(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs_of(out):
    runs = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir() and "-s" in p.name):
        variant, _seed = d.name.rsplit("-s", 1)
        runs.setdefault(variant, []).append(d)
    return runs


def evals_at(dirs, step):
    """Each seed's held-out evaluation at `step` (eval.jsonl, or the final
    eval-heldout.json), those that reached it."""
    out = []
    for d in dirs:
        found = [e for e in read_lines(d / "eval.jsonl") if e.get("step") == step]
        final = d / "eval-heldout.json"
        if not found and final.exists():
            e = json.loads(final.read_text())
            found = [e] if e.get("step") == step else []
        out.extend(found[-1:])
    return out


def training_at(dirs, step):
    """Per seed: (ITM loss, ITM accuracy on positives), the mean over the
    logged steps in (0.8 step, step]; ITM is `itm` or `fgitm`."""
    losses, accs = [], []
    for d in dirs:
        ms = [m for m in read_lines(d / "metrics.jsonl") if 0.8 * step < m["step"] <= step]
        if not ms or max(m["step"] for m in ms) < step:
            continue
        key = "itm" if "itm" in ms[-1] else "fgitm" if "fgitm" in ms[-1] else None
        if key is None:
            continue
        losses.append(statistics.mean(m[key] for m in ms))
        accs.append(statistics.mean(m[f"{key}_acc_pos"] for m in ms))
    return losses, accs


def kinds(runs):
    found = set()
    for dirs in runs.values():
        for d in dirs:
            for e in read_lines(d / "eval.jsonl"):
                found.update(e.get("matching_by_kind", {}))
    return sorted(found)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--at", default="300,750,1500")
    ap.add_argument("--kinds", action="store_true")
    a = ap.parse_intermixed_args()
    runs = runs_of(a.out)
    ks = kinds(runs)
    if a.kinds:
        print(" ".join(ks))
        return
    variants = a.variants or sorted(runs)
    steps = [int(s) for s in a.at.split(",")]
    print("Held-out matching by ITM, % (caption against its negative; per kind of mismatch):")
    print()
    print("| variant | step | overall | " + " | ".join(ks) + " |")
    print("|---|---|---|" + "---|" * len(ks))
    for v in variants:
        for step in steps:
            es = evals_at(runs.get(v, []), step)
            by_kind = [cell([e.get("matching_by_kind", {}).get(k, {}).get("itm_acc") for e in es]) for k in ks]
            print(f"| {v} | {step} | {cell([e['matching']['itm_acc'] for e in es])} | " + " | ".join(by_kind) + " |")
    print()
    print("Held-out retrieval (ITC), % ; ITM on training batches:")
    print()
    print("| variant | step | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | ITM loss | ITM accuracy on positives % |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        for step in steps:
            es = evals_at(runs.get(v, []), step)
            r = [cell([e["retrieval"][k] for e in es]) for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")]
            losses, accs = training_at(runs.get(v, []), step)
            print(f"| {v} | {step} | " + " | ".join(r) + f" | {cell(losses, 1.0, 3)} | {cell(accs)} |")


if __name__ == "__main__":
    main()
