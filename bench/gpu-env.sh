# Sourced by gpu-check.sh and gpu-bench.sh (and shipped beside them in
# gpu-bundle/): with OUT set, creates it, puts PyTorch's libtorch on the
# loader path, sets BIN to the bundled binary and records the environment
# (vlmatch's and the GPU's) in $OUT/env.txt.
mkdir -p "$OUT"
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN=gpu-bundle/vlmatch
$BIN env | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/env.txt"
