#!/usr/bin/env bash
# The GPU tables of docs/gpu.md in one run: train-step throughput per architecture and width
# (float32 and bf16 encoder matmul) against the matmul floor, where the step's time goes, the
# trainer loop's host gap, and the LM forward's MFU in bf16.
#
#   bash bench/gpu_tables.sh OUT_DIR          # on a GPU host with jax[cuda] and the project
#   SMALL=1 bash bench/gpu_tables.sh OUT_DIR  # tiny shapes: checks the script itself on a CPU
#
# Each part writes OUT_DIR/<part>.txt and has its own time limit, so one slow part does not
# cost the others. PEAK_TFLOPS is the chip's data-sheet dense bf16 rate (989 for H100/H200 SXM).
# ONLY="step_gap lm_1b" runs just the named parts (a short lease); LIMIT_SCALE=2 doubles every
# part's time limit.
set -u
out=${1:?usage: gpu_tables.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DICTLEARN_CPU_KERNELS=0 TQDM_DISABLE=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
peak=${PEAK_TFLOPS:-989}
platform=cuda  # bench/step_gap.py picks the CPU unless told otherwise
if [ -n "${SMALL:-}" ]; then
  widths="2048 4096"; batches="256 512"; wide=8192; wide_batch=512
  parts_widths="4096"; parts_batches="512"
  gap_args="--n-features 2048 --d-model 64 --batch 256 --steps 40 --read-threads 1,0"
  lm_small="--batch 1 --seq 64 --layer 1"; lm_large="--batch 1 --seq 64 --layer 1"; reps=2
  platform=cpu
else
  widths="16384 65536 262144"; batches="4096 8192 16384"; wide=1048576; wide_batch=32768
  parts_widths="65536"; parts_batches="8192"
  gap_args="--n-features 16384 --d-model 640 --batch 4096 --steps 120 --read-threads 1,0,16"
  lm_small="--batch 256 --seq 1024 --layer 17"; lm_large="--batch 32 --seq 1024 --layer 25"; reps=3
fi

run() {  # run NAME SECONDS COMMAND...: output to the terminal and OUT_DIR/NAME.txt
  local name=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} ))
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | grep -v -E "^(W|I|E)[0-9]{4} |absl::InitializeLog" | tee "$out/$name.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"
} | tee "$out/env.txt"
# In order of what matters most, should the whole run be cut short.
# shellcheck disable=SC2086
run train 150 python3 bench/train_throughput.py --features $widths --batches $batches \
  --archs topk jumprelu jumprelu_target batchtopk --encoder-dtypes float32 bfloat16 --repeats $reps
run train_1m 90 python3 bench/train_throughput.py --features $wide --batches $wide_batch \
  --archs topk --encoder-dtypes float32 bfloat16 --parts --repeats $reps
# shellcheck disable=SC2086
# bf16 rows, as `dictlearn generate` writes them.
run step_gap 120 env JAX_PLATFORMS=$platform python3 bench/step_gap.py $gap_args --dtype bfloat16
# The host's side alone (bf16 rows, as `dictlearn generate` writes them): does the stream keep
# up with the step, and how does it scale with read threads on this host's cores?
# shellcheck disable=SC2086
run stream 60 env JAX_PLATFORMS=$platform python3 bench/step_gap.py $gap_args --stream-only \
  --read-threads 1,2,4,8,16 --dtype bfloat16
# AuxK's cost: no latent dead, then 300 (its compact variant) and 3,000 (its sparse one) dead.
# shellcheck disable=SC2086
run auxk 90 python3 bench/train_throughput.py --features $parts_widths --batches $parts_batches \
  --archs topk batchtopk --dead-latents 0 300 3000 --repeats $reps
# shellcheck disable=SC2086
run lm_1b 200 python3 bench/generate_throughput.py --weights random --model 1b \
  --dtype bfloat16 $lm_large --reps $reps --mfu --peak-tflops "$peak"
# shellcheck disable=SC2086
run parts 70 python3 bench/train_throughput.py --features $parts_widths --batches $parts_batches \
  --archs topk jumprelu batchtopk --encoder-dtypes float32 bfloat16 --parts --repeats $reps
# The blockwise top-k's block width around accelerator_block's choice (64 at 65,536, k 32).
for block in 32 128; do
  # shellcheck disable=SC2086
  run "block_$block" 30 python3 bench/train_throughput.py --features $parts_widths \
    --batches $parts_batches --archs topk --encoder-dtypes bfloat16 --parts \
    --accelerator-block $block --repeats $reps
done
# JumpReLU at 1M: its dense overflow fallback holds [batch, F] buffers.
run train_1m_jumprelu 150 python3 bench/train_throughput.py --features $wide \
  --batches $wide_batch --archs jumprelu --encoder-dtypes float32 bfloat16 --repeats $reps
run step_gap_small 30 env JAX_PLATFORMS=$platform python3 bench/step_gap.py
# shellcheck disable=SC2086
run lm_270m 45 python3 bench/generate_throughput.py --weights random --model 270m \
  --dtype bfloat16 $lm_small --reps $reps --mfu --peak-tflops "$peak"
