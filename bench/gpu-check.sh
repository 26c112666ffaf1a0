#!/usr/bin/env bash
# GPU check, run on a GPU machine (PyTorch installed, no Rust) from the
# repository root after `cargo xtask gpu-bundle` built gpu-bundle/ elsewhere.
# Writes everything under ${OUT:-gpu-out}/ and ends with a summary table.
set -uo pipefail
OUT=${OUT:-gpu-out}
. "$(dirname "$0")/gpu-env.sh"

run() { # name, then vlmatch train arguments
  local name=$1; shift
  local t0=$(date +%s.%N)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/$name.mem" &
  local smi=$!
  $BIN train --quiet --run-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  kill $smi 2>/dev/null
  local t1=$(date +%s.%N)
  echo "$name rc=$rc wall=$(python3 -c "print(round($t1-$t0,1))")s" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.log"
}

# 1. The default tiny run on CUDA (bf16 matmuls, fp32 weights).
run tiny --preset tiny
# 2. ALBEF-size model, short: step time and memory at batch 64.
BASE=(--preset base --set train.steps=60 --set train.log_every=10 --set train.warmup_steps=10
  --set train.checkpoint_every=0 --set eval.at_end=false --set data.workers=12)
run base "${BASE[@]}"
# 3. The full method (ITC + VL-RTD + FG-ITM) at the same size.
run base-vlmatch "${BASE[@]}" --config configs/vlmatch.toml

python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':<13} {'steps':>6} {'loss first->last':>18} {'s/step (after 20)':>18} {'peak GiB (smi)':>14}")
for name in ["tiny", "base", "base-vlmatch"]:
    p = out / name / "metrics.jsonl"
    if not p.exists():
        print(f"{name:<13} (no metrics)"); continue
    rows = [json.loads(l) for l in p.read_text().splitlines()]
    late = [r for r in rows if r["step"] > 20]
    if len(late) >= 2:
        dt = (late[-1]["time_s"] - late[0]["time_s"]) / (late[-1]["step"] - late[0]["step"])
    else:
        dt = float("nan")
    mem = out / f"{name}.mem"
    used = [int(x) for x in mem.read_text().split() if x.isdigit()] if mem.exists() else [0]
    peak = max(used or [0]) / 1024
    print(f"{name:<13} {rows[-1]['step']:>6} {rows[0]['loss']:>8.3f}->{rows[-1]['loss']:<8.3f} {dt:>18.4f} {peak:>14.2f}")
PY
