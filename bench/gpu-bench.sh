#!/usr/bin/env bash
# Issue 7's GPU benchmark: vlmatch against the PyTorch reference
# (bench/reference.py) on the same card in the same call, base preset, bf16.
# Build on a CPU machine with `cargo xtask gpu-bundle`, then on the GPU
# machine (PyTorch installed, no Rust), from the repository root:
#   OUT=$OUT bash gpu-bundle/gpu-bench.sh
# Each `vlmatch bench` prints a table (step time, images/s, model TFLOP/s,
# MFU against the card's dense bf16 peak, peak GPU memory, data pipeline
# images/s, NegGen negatives/s) and writes OUT/<name>/bench.json.
set -uo pipefail
OUT=${OUT:-gpu-bench-out}
BATCH=${BATCH:-96}
. "$(dirname "$0")/gpu-env.sh"
COMMON=(--steps 10 --warmup 5 --repeats 5 --data-images 512 --data-image-side 480
  --reference gpu-bundle/reference.py --python python3
  --set "train.batch_size=$BATCH" --set data.workers=12)
bench() { # name, then extra arguments
  local name=$1; shift
  timeout 280 $BIN bench --out "$OUT/$name" "${COMMON[@]}" "$@" 2>&1 | tee "$OUT/$name.txt"
}
# 1. The ALBEF baseline objectives (ITC + ITM hard negatives + MLM): the
# base model preset with the ablation's baseline layer (the preset alone is
# ITC + ITM, with no MLM head).
bench base --preset base --config configs/baseline.toml
# 2. The full method (ITC + VL-RTD + FG-ITM with word-swap negatives).
bench base-vlmatch --preset base --config configs/vlmatch.toml --no-neggen
