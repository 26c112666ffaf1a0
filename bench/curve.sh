#!/usr/bin/env bash
# The VL-Match ablation as a learning curve: the four experiment presets on
# the tiny model and built-in data, several seeds, held-out evaluation every
# EVERY steps (fine-grained matching: caption vs the same caption with one
# color or shape word swapped; and ITC retrieval). Runs JOBS jobs at a time
# (default: all at once; each one libtorch thread and one loader thread) and
# stops them after LIMIT seconds, summarising whatever was evaluated by then.
# Usage (GPU machine, from the repository root): bash gpu-bundle/curve.sh
# On a 2-core CPU: BIN=target/release/vlmatch JOBS=2 LIMIT=100000 bash bench/curve.sh
set -uo pipefail
OUT=${OUT:-curve-out}
STEPS=${STEPS:-1600}
EVERY=${EVERY:-200}
SEEDS=${SEEDS:-"1 2 3"}
LIMIT=${LIMIT:-420}
# Checkpoint every CKPT steps (0: none) so that a stopped sweep resumes.
CKPT=${CKPT:-$EVERY}
BIN=${BIN:-gpu-bundle/vlmatch}
JOBS=${JOBS:-1000}
mkdir -p "$OUT"
if python3 -c 'import torch' 2>/dev/null; then
  export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
$BIN env | tee "$OUT/env.txt"
# One job line per variant: a name, then `vlmatch train` arguments.
VARIANTS=${VARIANTS:-"baseline --config configs/baseline.toml
rtd --config configs/rtd.toml
fgitm --config configs/fgitm.toml
vlmatch --config configs/vlmatch.toml"}
pids=()
names=()
for seed in $SEEDS; do
  while read -r name args; do
    [ -z "$name" ] && continue
    [ "$seed" = "$(echo $SEEDS | cut -d' ' -f1)" ] && names+=("$name")
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    dir="$OUT/$name-s$seed"
    # A run that evaluated its last step is done; one with a checkpoint
    # continues from it (a stopped sweep picks up where it was).
    if grep -qs "\"step\":$STEPS[,}]" "$dir/eval.jsonl"; then
      echo "$dir: done, skipped"
      continue
    elif ls "$dir"/checkpoints/step-* > /dev/null 2>&1; then
      $BIN train --quiet --resume "$dir" >> "$dir.log" 2>&1 &
    else
      $BIN train --quiet $args --run-dir "$dir" \
        --set train.seed=$seed --set train.steps=$STEPS --set eval.every=$EVERY \
        --set train.checkpoint_every=$CKPT --set eval.at_end=false \
        --set train.threads=1 --set data.workers=1 > "$dir.log" 2>&1 &
    fi
    pids+=($!)
  done <<< "$VARIANTS"
done
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt "$LIMIT" ]; do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 5
done
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
echo "elapsed $(( $(date +%s) - start ))s"
python3 "$(dirname "$0")/curve_table.py" "$OUT" "${names[@]}" | tee "$OUT/table.md"
