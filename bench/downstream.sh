#!/usr/bin/env bash
# The SNLI-VE and NLVR2 learning check of bench/DOWNSTREAM.md: fine-tune three
# pretrained tiny runs (the default run of docs/results.md, seeds 1-3) on the built-in
# items, with images and with blank images, and print one JSON report per run.
#
#   bench/downstream.sh BIN PRETRAINED_PREFIX OUT [SNLI_STEPS] [NLVR2_STEPS]
#
# BIN: a vlmatch binary; PRETRAINED_PREFIX: run directories PREFIX1..PREFIX3,
# each made by `vlmatch train --set train.seed=N --set train.threads=1`;
# OUT: where the fine-tuned runs and their reports (TASK-STEPS-sN-MODE.json) go.
set -euo pipefail
BIN=$1 PRE=$2 OUT=$3 SNLI_STEPS=${4:-1000} NLVR2_STEPS=${5:-600}
mkdir -p "$OUT"
S="--set data.synthetic.train_scenes=600 --set data.synthetic.heldout_scenes=200 --set train.threads=1 --set data.workers=1"
for task in snli-ve nlvr2; do
  steps=$SNLI_STEPS; [ $task = nlvr2 ] && steps=$NLVR2_STEPS
  for seed in 1 2 3; do
    for mode in image blank; do
      flag=""; [ $mode = blank ] && flag="--blank-images"
      name=$task-$steps-s$seed-$mode
      [ -s "$OUT/$name.json" ] && continue
      # shellcheck disable=SC2086
      "$BIN" finetune --task $task --checkpoint "$PRE$seed" --data builtin --steps $steps \
        --lr 1e-4 --batch-size 32 --set train.seed=$seed $S $flag --out "$OUT/$name" --quiet \
        | grep '^{' > "$OUT/$name.json"
      echo "$name: $(python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['test']; print(round(t['accuracy'], 4))" "$OUT/$name.json")"
    done
  done
done
