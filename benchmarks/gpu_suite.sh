#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one device call of at most BUDGET_S seconds (default
# 420), on one H100/H200, most important first; every row is appended to OUT_DIR as soon as it
# finishes, so a run cut short keeps what it measured. No tensorflow needed: the batches are
# in-memory arrays. Compiling one 1024x512 iteration takes 65-85 s on an H200, so each row
# times 5 iterations after 2 warm-ups and the PyTorch peer runs beside it, same size and card.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]     # OUT_DIR/gpu_steps.jsonl, kernel_forms.jsonl,
#                                              # trace.*.json.gz (Perfetto), gpu_suite.log
#   PEER_SCRIPT=path/to/torch_lsd_step.py      # default: ../shared/peer/torch_lsd_step.py
#   ROWS="3 7 8"                               # only these rows (default: all, in order)
#
# Rows, all at 1024x512, 1 source + 1 target image, alternating, composed, CPU-tuned kernels
# (measured faster than XLA's plain forms on an H200 too, docs/performance.md):
#  1. float32 (TF32 convolutions) against the peer --tf32, profiled, the trace kept;
#  2. bfloat16 against the peer --amp bf16, with peak memory, profiled, the trace kept;
#  3. the 3-channel layers and G's strided transposed convolutions alone, each form, both
#     dtypes (benchmarks/first_layers.py);
#  4. bfloat16 batch 4; 5. float32 simultaneous mode;
#  6. each tuned kernel against its plain form (benchmarks/kernel_forms.py), bfloat16;
#  7, 8. float32 and bfloat16 with every sub-pixel phase convolution as a matrix product (the
#     candidate for G's up2-up5 kernel gradients, docs/performance.md, fourth lease), profiled.
# A row that fails (out of memory, say) is logged with its exit status and the suite goes on;
# a row is not started when less than its usual time is left.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
BUDGET_S=${BUDGET_S:-420}
PEER_SCRIPT=${PEER_SCRIPT:-../shared/peer/torch_lsd_step.py}
mkdir -p "$OUT"
JSON="$OUT/gpu_steps.jsonl"
LOG="$OUT/gpu_suite.log"
START=$SECONDS
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so that peak memory means what the step needs
export PYTHONUNBUFFERED=1
python -c "import jax, flax, optax, ml_collections, torch" || {
  echo "gpu_suite.sh needs jax (with CUDA), flax, optax, ml_collections and torch" >&2; exit 2; }
python -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()" || {
  echo "gpu_suite.sh: jax sees no GPU" >&2; exit 2; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
  date -u +%FT%TZ; } | tee -a "$LOG"

run() {  # label (its first word the row's number), seconds the row needs at least, command...
  local label=$1 need=$2; shift 2
  if [[ -n ${ROWS:-} && " $ROWS " != *" ${label%% *} "* ]]; then return; fi
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < need)); then
    echo "--- $label: skipped, ${left}s left of ${BUDGET_S}s" | tee -a "$LOG"; return
  fi
  echo "=== $label ($((SECONDS - START))s): $*" | tee -a "$LOG"
  # timeout runs programs, not shell functions: the row runs in a child bash.
  timeout "$left" bash -c '"$@"' _ "$@" 2>>"$LOG" | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  ((status == 0)) || echo "!!! $label failed (exit $status)" | tee -a "$LOG"
}
step() {  # step_time.py at 1024x512, alternating, composed
  python benchmarks/step_time.py --height 512 --width 1024 --iters 5 --warmup 2 \
    --updates composed --peer-device cuda --peer-script "$PEER_SCRIPT" --json "$JSON" "$@"
}
kernels() {
  python benchmarks/kernel_forms.py --height 512 --width 1024 --json "$OUT/kernel_forms.jsonl" "$@"
}
export OUT JSON PEER_SCRIPT
export -f step kernels

run "1 f32 b1"   100 step --batch 1 --modes alternating --dtype float32 \
    --peer --peer-args="--tf32" --profile-top 12 --keep-trace "$OUT/trace"
run "2 bf16 b1"  110 step --batch 1 --modes alternating --dtype bfloat16 \
    --peer --peer-args="--amp bf16" --profile-top 12 --keep-trace "$OUT/trace"
run "3 first layers" 40 bash -c "python benchmarks/first_layers.py --dtype float32 &&
    python benchmarks/first_layers.py --dtype bfloat16"
run "4 bf16 b4"  100 step --batch 4 --modes alternating --dtype bfloat16
run "5 f32 b1 simultaneous" 90 step --batch 1 --modes simultaneous --dtype float32
run "6 kernels bf16" 40 kernels --dtype bfloat16
run "7 f32 b1 phase products" 100 step --batch 1 --modes alternating --dtype float32 \
    --phase-matmul-channels 4096 --profile-top 12 --keep-trace "$OUT/products"
run "8 bf16 b1 phase products" 110 step --batch 1 --modes alternating --dtype bfloat16 \
    --phase-matmul-channels 4096 --profile-top 12 --keep-trace "$OUT/products"
echo "done in $((SECONDS - START))s; results: $JSON $OUT/kernel_forms.jsonl" | tee -a "$LOG"
