#!/usr/bin/env bash
# Issue 30's ablation at the default recipe: the tiny preset (lr 1e-3), 1500
# steps, 3 seeds, the four experiment presets plus `vlmatch` with
# configs/wordswap.toml; held-out evaluation every 150 steps (so 300, 750
# and 1500 among them); two runs at a time with one libtorch and one loader
# thread each (about two hours of both cores of a 2-core CPU). Then the
# table (bench/ablation_table.py) and the curves (`vlmatch plot`, the mean
# over seeds with a min-max band).
# Usage, from the repository root, on a quiet machine:
#   cargo build --release && bash bench/ablation.sh
# Short check of the script itself: STEPS=20 EVERY=10 AT=10,20 bash bench/ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-ablation-out}
export STEPS=${STEPS:-1500}
export EVERY=${EVERY:-150}
export SEEDS=${SEEDS:-"1 2 3"}
export BIN=${BIN:-target/release/vlmatch}
export JOBS=${JOBS:-2}
export LIMIT=${LIMIT:-100000}
AT=${AT:-300,750,1500}
export VARIANTS="baseline --config configs/baseline.toml
rtd --config configs/rtd.toml
fgitm --config configs/fgitm.toml
vlmatch --config configs/vlmatch.toml
vlmatch_wordswap --config configs/vlmatch.toml --config configs/wordswap.toml"
bash bench/curve.sh > "$OUT.curve.log"
python3 bench/ablation_table.py "$OUT" --at "$AT" \
  baseline rtd fgitm vlmatch vlmatch_wordswap | tee "$OUT/ablation.md"
seeded() { for v in "$@"; do for s in $SEEDS; do echo "$OUT/$v-s$s"; done; done; }
mapfile -t runs < <(seeded baseline rtd fgitm vlmatch vlmatch_wordswap)
for metric in matching.itm_acc retrieval.i2t_r1 retrieval.t2i_r1; do
  "$BIN" plot "${runs[@]}" --metric "$metric" --group-seeds --out "$OUT/$metric.png"
done
for kind in $(python3 bench/ablation_table.py "$OUT" --kinds); do
  "$BIN" plot "${runs[@]}" --metric "matching_by_kind.$kind.itm_acc" --group-seeds \
    --out "$OUT/matching-$kind.png"
done
# ITM's loss: `itm` in baseline and rtd, `fgitm` in fgitm and vlmatch.
"$BIN" plot $(seeded baseline rtd) --metric itm --group-seeds --out "$OUT/itm.png"
"$BIN" plot $(seeded fgitm vlmatch vlmatch_wordswap) --metric fgitm --group-seeds --out "$OUT/fgitm.png"
"$BIN" plot $(seeded baseline rtd) --metric itm_acc_pos --group-seeds --out "$OUT/itm_acc_pos.png"
"$BIN" plot $(seeded fgitm vlmatch vlmatch_wordswap) --metric fgitm_acc_pos --group-seeds \
  --out "$OUT/fgitm_acc_pos.png"
echo "table: $OUT/ablation.md; curves: $OUT/*.png"
