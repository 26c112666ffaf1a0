#!/usr/bin/env bash
# GPU check, run on a GPU machine (PyTorch installed, no Rust) from the
# repository root after `cargo xtask gpu-bundle` built gpu-bundle/ elsewhere.
# Writes everything under ${OUT:-gpu-out}/ and ends with a summary table:
# per run its steps, loss, seconds per step and each GPU's peak memory
# (nvidia-smi's memory.used sampled every 250 ms, so the peak of the whole
# GPU, CUDA context included, to within a sample).
set -uo pipefail
OUT=${OUT:-gpu-out}
. "$(dirname "$0")/gpu-env.sh"
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
RUNS=()

# Runs `name` with `launcher...` (empty: one process) and the rest as
# `vlmatch train` arguments, sampling every GPU's memory meanwhile.
run_with() { # name, number of launcher words, launcher..., train arguments...
  local name=$1 n=$2; shift 2
  local launcher=("${@:1:$n}"); shift "$n"
  RUNS+=("$name")
  local t0=$(date +%s.%N)
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/$name.mem" &
  local smi=$!
  "${launcher[@]}" $BIN train --quiet --run-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  kill $smi 2>/dev/null
  local t1=$(date +%s.%N)
  echo "$name rc=$rc wall=$(python3 -c "print(round($t1-$t0,1))")s" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.log"
}
run() { run_with "$1" 0 "${@:2}"; }

# 1. The default tiny run on CUDA (bf16 matmuls, fp32 weights), and the
#    same with pageable batches copied synchronously (`data.pin_memory`
#    off): seconds per step with and without pinned memory and
#    asynchronous copies (issue 26).
run tiny --preset tiny
run tiny-pageable --preset tiny --set data.pin_memory=false
# 2. ALBEF-size model, short: step time and memory at batch 64.
BASE=(--preset base --set train.steps=60 --set train.log_every=10 --set train.warmup_steps=10
  --set train.checkpoint_every=0 --set eval.at_end=false --set data.workers=12)
run base "${BASE[@]}"
# 3. The full method (ITC + VL-RTD + FG-ITM) at the same size.
run base-vlmatch "${BASE[@]}" --config configs/vlmatch.toml

# Issue 27's options, short runs of the base preset at batch 64 (compare
# their peaks with row `base`, which has none of them).
SHORT=(--preset base --set train.steps=30 --set train.log_every=10 --set train.warmup_steps=10
  --set train.checkpoint_every=0 --set eval.at_end=false --set data.workers=12)
# 4. Activation checkpointing of every layer: activations recomputed in
#    backward (peak down, step time up against `base`).
run base-ckpt-all "${SHORT[@]}" --set 'train.activation_checkpointing="all"'
# 5. GradCache: 4 micro-batches of 16, ITC over all 64 (peak of a batch of
#    16 plus the cached embeddings).
run base-gradcache "${SHORT[@]}" --set train.batch_size=16 --set train.accum_steps=4 \
  --set 'train.contrastive_accum="cached"'
# 6. ZeRO stage 1 on 2 NCCL ranks (one GPU each): gradients reduce-scattered,
#    AdamW's moments halved per GPU, parameters all-gathered; unsharded
#    first, at the same global batch, for the comparison.
if [ "$GPUS" -ge 2 ]; then
  TORCHRUN=(python3 -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1
    --master-port 29517 --no-python)
  for SHARD in false true; do
    run_with "base-2gpu-shard-$SHARD" ${#TORCHRUN[@]} "${TORCHRUN[@]}" "${SHORT[@]}" \
      --set train.batch_size=32 --set train.dist.shard_optimizer=$SHARD
  done
else
  echo "base-2gpu-shard: skipped, $GPUS GPU(s) here; NCCL needs one GPU per rank" \
    | tee -a "$OUT/summary.txt"
fi

python3 - "$OUT" "${RUNS[@]}" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':<22} {'steps':>6} {'loss first->last':>18} {'s/step (late)':>14} {'peak GiB per GPU (smi)':>24}")
for name in sys.argv[2:]:
    p = out / name / "metrics.jsonl"
    if not p.exists():
        print(f"{name:<22} (no metrics)"); continue
    rows = [json.loads(l) for l in p.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        print(f"{name:<22} (no steps logged)"); continue
    late = [r for r in rows if r["step"] > rows[-1]["step"] // 3]
    if len(late) >= 2:
        dt = (late[-1]["time_s"] - late[0]["time_s"]) / (late[-1]["step"] - late[0]["step"])
    else:
        dt = float("nan")
    peak = {}
    mem = out / f"{name}.mem"
    for line in (mem.read_text().splitlines() if mem.exists() else []):
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]))
    gpus = " ".join(f"{i}:{m / 1024:.2f}" for i, m in sorted(peak.items()) if m > 0)
    print(f"{name:<22} {rows[-1]['step']:>6} {rows[0]['loss']:>8.3f}->{rows[-1]['loss']:<8.3f} {dt:>14.4f} {gpus:>24}")
PY
