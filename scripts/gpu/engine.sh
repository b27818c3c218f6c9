#!/usr/bin/env bash
# GPU checks and benchmarks of the CUDA engine, in one call on the GPU machine.
#
# Here (build machine):   scripts/gpu/engine.sh stage      # builds, copies binaries to out/device
# GPU machine (out/device carried, torch + transformers installed):
#   scripts/gpu/engine.sh check    # GPU tests + HF parity on the small model (~1 min)
#   scripts/gpu/engine.sh bench    # 8B-shape checkpoint, HF parity, TTFT vs HF, decode ITL
#   scripts/gpu/engine.sh all      # both
# Results go to $OUT (default /tmp/gpe_out): engine.log, JSON lines, and gpu_engine.json (at
# most 8 files, what the GPU machine sends back).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage="${1:-all}"

if [[ "$stage" == stage ]]; then
  set -e
  targets=(//model:llama_cuda_test //model:run_cuda //model:make_checkpoint
           //bench/ttft:ttft_bench //bench/decode:decode_bench)
  bazel --output_base=/tmp/bazel_gpe build "${targets[@]}"
  bin="$(bazel --output_base=/tmp/bazel_gpe info bazel-bin 2>/dev/null)"
  scripts/stage_device.sh "$bin/model/llama_cuda_test" "$bin/model/run_cuda" \
    "$bin/model/make_checkpoint" "$bin/bench/ttft/ttft_bench" "$bin/bench/decode/decode_bench"
  exit 0
fi

export LD_LIBRARY_PATH="$PWD/out/device:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpe_out}"
mkdir -p "$out"
bin=out/device
big=/tmp/gpe/llama-3.1-8b
log="$out/engine.log"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

if [[ "$stage" == check || "$stage" == all ]]; then
  echo "== GPU tests"
  TEST_TMPDIR=/tmp/gpe_test "$bin/llama_cuda_test" > /tmp/gpe_test.log 2>&1 || status=1
  cat /tmp/gpe_test.log >> "$log"
  grep -E "^\[  (PASSED|FAILED) |_rel_error" /tmp/gpe_test.log
  echo "== HF parity (small)"
  python3 scripts/gpu/hf_parity_cuda.py --bin "$bin" --out "$out/hf_parity_small.json" \
    >> "$log" 2>&1 || status=1
fi

if [[ "$stage" == bench || "$stage" == all ]]; then
  echo "== 8B-shape checkpoint"
  if [[ ! -f "$big/config.json" ]]; then
    time "$bin/make_checkpoint" --out "$big" --preset llama-3.1-8b --dtype bfloat16 --seed 1 \
      >> "$log" 2>&1 || { tail "$log"; exit 1; }
  fi
  echo "== HF parity (8B shape)"
  python3 scripts/gpu/hf_parity_cuda.py --bin "$bin" --big_model "$big" \
    --out "$out/hf_parity_8b.json" >> "$log" 2>&1 || status=1
  echo "== TTFT, ours"
  "$bin/ttft_bench" --model "$big" 2>> "$log" | tee "$out/ttft_ours.jsonl"
  echo "== TTFT, HF sdpa"
  python3 bench/ttft/hf_ttft.py --model "$big" 2>> "$log" | tee "$out/ttft_hf.jsonl"
  echo "== decode ITL"
  "$bin/decode_bench" --model "$big" 2>> "$log" | tee "$out/decode.jsonl"
fi

python3 scripts/gpu/collect_results.py "$out"
exit $status
