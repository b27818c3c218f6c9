#!/usr/bin/env bash
# GPU checks and benchmarks of the CUDA engine, in one call on the GPU machine.
#
# Here (build machine):   scripts/gpu/engine.sh stage [STAGES]  # builds, copies to out/engine
#   (only the binaries STAGES need, default all: the carried folder must stay under 64 MiB)
# GPU machine (out/engine carried, torch + transformers installed):
#   scripts/gpu/engine.sh check    # GPU tests + HF parity on the small model (~1 min)
#   scripts/gpu/engine.sh bench    # 8B-shape checkpoint, HF parity, TTFT vs HF, decode ITL
#   scripts/gpu/engine.sh sparse   # 8B-shape checkpoint, TTFT: sparse prefill vs dense vs HF
#   scripts/gpu/engine.sh all      # all three (or a comma list: check,sparse)
# SEARCHED_CONFIG=path skips the pattern search of the sparse stage and times that config.
# Results go to $OUT (default /tmp/gpe_out): engine.log, JSON lines, and gpu_engine.json (at
# most 8 files, what the GPU machine sends back).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage="${1:-all}"
[[ "$stage" == stage ]] && stage="${2:-all}" && building=1
# Whether the stage list asks for $1.
wants() { [[ "$stage" == all || ",$stage," == *",$1,"* ]]; }

if [[ -n "${building:-}" ]]; then
  set -e
  targets=()
  wants check && targets+=(//model/cuda:llama_cuda_test //decode_service:decode_engine_cuda_test
                           //model/tools:run_model //model/tools:make_checkpoint)
  wants bench && targets+=(//model/tools:run_model //bench/decode:decode_bench)
  (wants bench || wants sparse) && targets+=(//model/tools:make_checkpoint //bench/ttft:ttft_bench)
  wants sparse && targets+=(//model/tools:pattern_search)
  bazel build "${targets[@]}"
  bin="$(bazel info bazel-bin 2>/dev/null)"
  rm -rf out/engine
  STAGE_DIR=out/engine scripts/stage_device.sh \
    $(printf '%s\n' "${targets[@]}" | sort -u | sed "s|^//|$bin/|; s|:|/|")
  exit 0
fi

export LD_LIBRARY_PATH="$PWD/out/engine:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpe_out}"
mkdir -p "$out"
bin=out/engine
big=/tmp/gpe/llama-3.1-8b
log="$out/engine.log"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

if wants check; then
  echo "== GPU tests"
  for test in llama_cuda_test decode_engine_cuda_test; do
    TEST_TMPDIR=/tmp/gpe_test "$bin/$test" > /tmp/gpe_test.log 2>&1 || status=1
    cat /tmp/gpe_test.log >> "$log"
    grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|_rel_error" /tmp/gpe_test.log
  done
  echo "== HF parity (small)"
  python3 scripts/gpu/hf_parity_cuda.py --bin "$bin" --out "$out/hf_parity_small.json" \
    >> "$log" 2>&1 || status=1
fi

if wants bench || wants sparse; then
  echo "== 8B-shape checkpoint"
  mkdir -p /tmp/gpe
  if [[ ! -f "$big/config.json" ]]; then
    time "$bin/make_checkpoint" --out "$big" --preset llama-3.1-8b --dtype bfloat16 --seed 1 \
      >> "$log" 2>&1 || { tail "$log"; exit 1; }
  fi
fi

if wants bench; then
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

if wants sparse; then
  # Every head with the same budget: random weights have no structure for a search to find,
  # so these time the sparse path at fixed budgets (vertical-slash's cost depends on how
  # concentrated the estimated pattern is; A-shape's does not).
  # dense_below_tokens: the break-even that bench/attention/sparse_attention_bench.py measures
  # for vertical-slash (v=1000, s=6096) against our dense kernel on structured inputs.
  sparse_lengths=16384,32768,65536,131072
  dense_below="${DENSE_BELOW:-24576}"
  python3 bench/ttft/uniform_sparse_config.py --model "$big" --pattern vertical_slash \
    --vertical 1000 --slash 6096 --dense_below_tokens "$dense_below" > /tmp/gpe/vs.json
  python3 bench/ttft/uniform_sparse_config.py --model "$big" --pattern a_shape \
    --sink 128 --window 4096 --dense_below_tokens "$dense_below" > /tmp/gpe/a_shape.json
  if [[ -n "${SEARCHED_CONFIG:-}" ]]; then
    python3 - "$SEARCHED_CONFIG" "$dense_below" > /tmp/gpe/searched.json <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["dense_below_tokens"] = int(sys.argv[2])
print(json.dumps(config))
PY
  else
    echo "== pattern search on the GPU engine (8B shape, one 4096-token calibration prompt)"
    start_search=$(date +%s)
    "$bin/pattern_search" --device cuda --model "$big" --out /tmp/gpe/searched.json \
      --tokens 4096 --prompts 1 --target_density 0.1 --dense_below "$dense_below" \
      2> /tmp/gpe/search.log || { status=1; tail /tmp/gpe/search.log; }
    cat /tmp/gpe/search.log >> "$log"
    grep -E "pattern_search.(done|failed)" /tmp/gpe/search.log
    echo "search_seconds $(( $(date +%s) - start_search ))"
  fi
  cp /tmp/gpe/searched.json "$out/searched_config.json" 2>/dev/null
  echo "== TTFT, ours dense"
  "$bin/ttft_bench" --model "$big" --lengths "$sparse_lengths" 2>> "$log" \
    | tee "$out/ttft_ours.jsonl"
  for config in vs a_shape searched; do
    echo "== TTFT, ours sparse ($config)"
    "$bin/ttft_bench" --model "$big" --lengths "$sparse_lengths" \
      --sparse_config "/tmp/gpe/$config.json" --label "$config" 2>> "$log" \
      | tee -a "$out/ttft_sparse.jsonl"
  done
  echo "== TTFT, HF sdpa"
  python3 bench/ttft/hf_ttft.py --model "$big" --lengths "$sparse_lengths" 2>> "$log" \
    | tee "$out/ttft_hf.jsonl"
fi

python3 scripts/gpu/collect_results.py "$out"
exit $status
