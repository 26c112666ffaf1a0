#!/bin/bash
# NegGen's cost per step: vlmatch preset with NegGen (filter off until step 400, and on from step 0) vs word_swap.
BIN=${BIN:-target/release/vlmatch}
OUT=${OUT:-/tmp/neggen-cost}; rm -rf $OUT; mkdir -p $OUT
cd "$(dirname "$0")/.."
for round in 1 2 3; do
 for v in wordswap neggen neggen_filter; do
  extra=()
  case $v in
   wordswap) extra=(--config configs/wordswap.toml);;
   neggen_filter) extra=(--set samplers.neggen.filter_after_steps=0);;
  esac
  $BIN train --quiet --config configs/vlmatch.toml "${extra[@]}" --set train.seed=1 --set train.steps=40 --set train.threads=1 --set data.workers=1 --set train.checkpoint_every=0 --set eval.at_end=false --set eval.every=0 --run-dir $OUT/$v-$round >/dev/null 2>$OUT/$v-$round.err
 done
done
# Seconds per step from step 10 to step 40 (startup excluded), median of the rounds.
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
for v in ["wordswap", "neggen", "neggen_filter"]:
    xs = []
    for r in (1, 2, 3):
        rows = [json.loads(l) for l in open(f"{out}/{v}-{r}/metrics.jsonl")]
        xs.append((rows[-1]["time_s"] - rows[0]["time_s"]) / (rows[-1]["step"] - rows[0]["step"]))
    print(v, [round(x, 3) for x in xs], "median", round(statistics.median(xs), 3))
PY
