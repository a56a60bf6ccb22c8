#!/usr/bin/env bash
# The GPU benchmark table of docs/benchmarks.md, in one go, on one H100/H200 (no tensorflow
# needed: the batches are in-memory arrays). Written for a 15-minute device lease: each
# configuration compiles once (~1 min at 1024x512) and times 5 iterations after 2 warm-ups;
# the PyTorch peer runs beside each in the same process tree, same size, same card.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # JSON lines in OUT_DIR/gpu_steps.jsonl
#
# Rows (all at 1024x512): f32 (JAX default precision = TF32 convolutions) vs peer --tf32;
# bf16 vs peer --amp bf16; composed and separate updates; alternating and simultaneous;
# batch 1 (the paper: 1 source + 1 target), 2 and 4. A failing row (e.g. out of memory) is
# recorded and the suite goes on. Copy the printed tables into docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
JSON="$OUT/gpu_steps.jsonl"
LOG="$OUT/gpu_suite.log"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so that peak memory means what the step needs
python -c "import jax, flax, optax, ml_collections, torch" || {
  echo "gpu_suite.sh needs jax (with CUDA), flax, optax, ml_collections and torch" >&2; exit 2; }
python -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()" || {
  echo "gpu_suite.sh: jax sees no GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
date -u +%FT%TZ | tee -a "$LOG"

run() {  # label, then benchmarks/step_time.py arguments
  local label=$1; shift
  echo "=== $label: $*" | tee -a "$LOG"
  timeout 420 python benchmarks/step_time.py --height 512 --width 1024 --iters 5 --warmup 2 \
      --peer-device cuda --json "$JSON" "$@" 2>>"$LOG" | tee -a "$LOG" \
    || echo "!!! $label failed (exit $?)" | tee -a "$LOG"
}

# 1. The paper's setting, 1 + 1 images: every combination, with the peer.
# --profile-top: the 15 most expensive GPU kernels of one more iteration, named by jax op.
run "f32/tf32 b1" --batch 1 --dtype float32 --peer --peer-args="--tf32" --profile-top 15
run "bf16 b1"     --batch 1 --dtype bfloat16 --peer --peer-args="--amp bf16" --profile-top 15
# 2. Larger batches, composed updates only (the training default), with the peer.
for b in 2 4; do
  run "bf16 b$b"     --batch $b --dtype bfloat16 --updates composed --modes alternating --peer --peer-args="--amp bf16"
  run "f32/tf32 b$b" --batch $b --dtype float32 --updates composed --modes alternating \
      --peer --peer-args="--tf32"
done
# 3. Memory: bf16 with F and G rematerialised (peak memory against the 12 GB target).
run "bf16 b1 remat" --batch 1 --dtype bfloat16 --updates composed --modes alternating \
    --remat-f --remat-g
echo "results: $JSON" | tee -a "$LOG"
