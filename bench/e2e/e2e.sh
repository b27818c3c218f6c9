#!/usr/bin/env bash
# End-to-end benchmark of the service pair on one GPU (bench/e2e/README.md), in one device call.
#
# Here (build machine):  bench/e2e/e2e.sh stage   # builds, copies binaries + libs to out/e2e
# GPU machine (out/e2e carried, python3 with numpy):
#                        bench/e2e/e2e.sh run     # in-process TTFT, then both services + client
# Results go to $OUT (default /tmp/e2e_out), at most 7 files: device.txt, e2e.log, ttft.jsonl
# (in-process ttft_bench), e2e.json (e2e_client), prefill.log.tail, decode.log.tail and
# summary.json (both merged, with the ratios and pass/fail per target).
# Environment: KV_BLOCKS (decode KV pool, 64-token blocks; default: room for 4 x 32K and one
# 131040-token request at once), MAX_TOKENS (32), REPS (2), LENGTHS (4096,32768,131040),
# CONCURRENT (4), CONCURRENT_LENGTH (32768), DENSE_BELOW (24576).
set -uo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-}"

if [[ "$mode" == stage ]]; then
  set -e
  targets=(//prefill_service:prefill_server //decode_service:decode_server //model:make_checkpoint
           //bench/ttft:ttft_bench //bench/e2e:e2e_client
           //model:llama_cuda_test //decode_service:decode_engine_cuda_test)
  bazel build "${targets[@]}"
  bin="$(bazel info bazel-bin 2>/dev/null)"
  rm -rf out/e2e
  STAGE_DIR=out/e2e scripts/stage_device.sh \
    $(printf '%s\n' "${targets[@]}" | sed "s|^//|$bin/|; s|:|/|")
  # A device call carries at most 64 MiB; libopenblas alone is 36 MB. Packed, the folder is
  # about a third of that: run unpacks it.
  if (( $(du -sb out/e2e | cut -f1) > 48 * 1048576 )); then
    tar czf out/e2e.tgz -C out e2e
    rm -rf out/e2e && mkdir out/e2e && mv out/e2e.tgz out/e2e/bundle.tgz
  fi
  du -sh out/e2e
  exit 0
fi
if [[ "$mode" != run ]]; then
  echo "usage: bench/e2e/e2e.sh stage|run" >&2
  exit 2
fi

out="${OUT:-/tmp/e2e_out}"
work=/tmp/e2e
bin=out/e2e
if [[ -f out/e2e/bundle.tgz ]]; then
  mkdir -p "$work" && rm -rf "$work/e2e" && tar xzf out/e2e/bundle.tgz -C "$work" || exit 1
  bin="$work/e2e"
fi
bin="$(cd "$bin" && pwd)"
export LD_LIBRARY_PATH="$bin:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
# MODEL_DIR / MODEL_ARGS (make_checkpoint flags) / DEVICE: a rehearsal of the script on the
# build machine runs DEVICE=cpu with a small checkpoint (ttft_bench, CUDA-only, then fails).
model="${MODEL_DIR:-$work/llama-3.1-8b}"
model_args="${MODEL_ARGS:---preset llama-3.1-8b --dtype bfloat16 --seed 1}"
device_flag="${DEVICE:-cuda}"
config="$work/a_shape.json"
log="$out/e2e.log"
lengths="${LENGTHS:-4096,32768,131040}"
reps="${REPS:-2}"
max_tokens="${MAX_TOKENS:-32}"
concurrent="${CONCURRENT:-4}"
concurrent_length="${CONCURRENT_LENGTH:-32768}"
block_tokens=64
dense_below="${DENSE_BELOW:-24576}"
# Every request reserves blocks for its prompt and max_tokens until it ends.
blocks_for() { echo $(( ($1 + max_tokens + block_tokens - 1) / block_tokens )); }
longest=$(tr ',' '\n' <<< "$lengths" | sort -n | tail -1)
kv_blocks=$(( concurrent * $(blocks_for "$concurrent_length") + $(blocks_for "$longest") ))
kv_blocks="${KV_BLOCKS:-$kv_blocks}"
# What the concurrent phase or the longest prompt needs alone (retried with this if the pool
# above does not fit next to the two copies of the weights).
kv_blocks_min=$(( concurrent * $(blocks_for "$concurrent_length") ))
(( kv_blocks_min < $(blocks_for "$longest") )) && kv_blocks_min=$(blocks_for "$longest")
mkdir -p "$out" "$work"
: > "$log"
t0=$(date +%s)
# Seconds left of the run's budget (a device call ends at 10 minutes).
left() { echo $(( t0 + ${BUDGET_SECONDS:-530} - $(date +%s) )); }
phase() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - t0 ))s $*" | tee -a "$log"; }
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>&1 | tee -a "$log"; }
status=0

phase "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee "$out/device.txt"
[[ -s "$out/device.txt" ]] || echo "unknown device" > "$out/device.txt"
device=$(awk '{print tolower($2)}' "$out/device.txt" | head -1)

# The GPU tests of the engine paths the services use (export beside the compute, pool uploads),
# on the same build, before the numbers.
phase "GPU tests"
[[ -n "${SKIP_TESTS:-}" ]] || for test in llama_cuda_test decode_engine_cuda_test; do
  if [[ -x "$bin/$test" && "$device_flag" == cuda ]]; then
    TEST_TMPDIR=/tmp/e2e_test timeout 300 "$bin/$test" > "$work/$test.log" 2>&1
    rc=$?
    grep -E "^\[  (PASSED|FAILED) |tests? ran" "$work/$test.log" | tee -a "$log"
    (( rc == 0 )) || { echo "$test failed (rc $rc)" | tee -a "$log";
                       grep -B2 -A8 "Failure" "$work/$test.log" | head -60 >> "$log"; status=1; }
  fi
done

phase "checkpoint $model"
if [[ ! -f "$model/config.json" ]]; then
  # shellcheck disable=SC2086
  "$bin/make_checkpoint" --out "$model" $model_args >> "$log" 2>&1 || { tail "$log"; exit 1; }
fi
# A-shape heads (128 sinks, 4K window); prompts below DENSE_BELOW tokens stay dense.
python3 bench/ttft/uniform_sparse_config.py --model "$model" --pattern a_shape \
  --sink 128 --window 4096 --dense_below_tokens "$dense_below" > "$config" ||
  { echo "sparse config failed"; exit 1; }

phase "in-process TTFT (ttft_bench, a_shape)"
[[ -n "${SKIP_TTFT:-}" ]] || timeout 180 "$bin/ttft_bench" --model "$model" --lengths "$lengths" --sparse_config "$config" \
  --reps "$reps" --label a_shape 2>> "$log" | tee "$out/ttft.jsonl"
(( PIPESTATUS[0] == 0 )) || { echo "ttft_bench failed"; status=1; }

# Both services on the one GPU, in the background; returns once both logged ready (1: one
# exited or the wait timed out).
start_services() {
  started_kv_blocks=$1
  "$bin/prefill_server" --model_dir "$model" --device="$device_flag" --sparse_config "$config" \
    --listen 127.0.0.1:50051 --metrics_port 9464 --shutdown_grace_seconds 10 \
    ${PREFILL_FLAGS:-} 2> "$work/prefill.log" &
  prefill_pid=$!
  "$bin/decode_server" --model_dir "$model" --device="$device_flag" \
    --prefill_addresses 127.0.0.1:50051 --listen 127.0.0.1:50052 --metrics_port 9465 \
    --kv_block_tokens "$block_tokens" --kv_blocks "$1" --shutdown_grace_seconds 10 \
    ${DECODE_FLAGS:-} 2> "$work/decode.log" &
  decode_pid=$!
  local deadline=$(( $(date +%s) + ${READY_TIMEOUT:-180} )) name pid
  while (( $(date +%s) < deadline )); do
    if grep -q 'prefill\.ready' "$work/prefill.log" && grep -q 'decode\.ready' "$work/decode.log"
    then
      grep -h -E 'prefill\.ready|decode\.ready' "$work"/{prefill,decode}.log >> "$log"
      return 0
    fi
    for name in prefill decode; do
      pid="${name}_pid"
      if ! kill -0 "${!pid}" 2>/dev/null; then
        echo "${name}_server exited before ready:" | tee -a "$log"
        tail -n 5 "$work/$name.log" | tee -a "$log"
        return 1
      fi
    done
    sleep 1
  done
  echo "services not ready after ${READY_TIMEOUT:-180} s" | tee -a "$log"
  return 1
}

# SIGTERM to both (they drain), then SIGKILL after 15 s each.
stop_services() {
  local pid
  for pid in ${decode_pid:-} ${prefill_pid:-}; do kill -TERM "$pid" 2>/dev/null; done
  for pid in ${decode_pid:-} ${prefill_pid:-}; do
    for _ in $(seq 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  decode_pid=; prefill_pid=
}

copy_logs() {
  tail -n 200 "$work/prefill.log" > "$out/prefill.log.tail" 2>/dev/null
  tail -n 200 "$work/decode.log" > "$out/decode.log.tail" 2>/dev/null
}

phase "services (decode KV pool: $kv_blocks x $block_tokens-token blocks)"
trap 'stop_services; copy_logs' EXIT
if ! start_services "$kv_blocks"; then
  stop_services
  phase "retrying with $kv_blocks_min blocks"
  start_services "$kv_blocks_min" || exit 1
fi
gpu_used

# What is left of the budget, less the time to stop and summarise; e2e.json is rewritten after
# every length, so a client stopped by the timeout still leaves its numbers.
client_seconds=$(( $(left) - 40 ))
phase "e2e_client (at most ${client_seconds} s)"
# CPU use of the machine while the client runs (both services share it).
vmstat 1 > "$work/vmstat.log" 2>&1 &
vmstat_pid=$!
timeout "$client_seconds" "$bin/e2e_client" --decode_address 127.0.0.1:50052 --lengths "$lengths" \
  --reps "$reps" --concurrent "$concurrent" --concurrent_length "$concurrent_length" \
  --max_tokens "$max_tokens" --deadline_seconds 240 \
  --prefill_metrics_url http://127.0.0.1:9464/metrics \
  --decode_metrics_url http://127.0.0.1:9465/metrics \
  --out "$out/e2e.json" --label "$device-a_shape" 2>&1 | tee -a "$log"
(( PIPESTATUS[0] == 0 )) || { echo "e2e_client failed (see e2e.json)"; status=1; }
kill "$vmstat_pid" 2>/dev/null
awk 'NR > 2 && $15 < 90 { us += $13; sy += $14; id += $15; n++ }
     END { if (n) printf "cpu while busy (%d s): user %.0f%% system %.0f%% idle %.0f%%\n",
                         n, us / n, sy / n, id / n }' "$work/vmstat.log" | tee -a "$log"
gpu_used

phase "stopping services"
stop_services
trap - EXIT
copy_logs

phase "summary"
python3 bench/e2e/summarize.py --ttft "$out/ttft.jsonl" --e2e "$out/e2e.json" \
  --device "$out/device.txt" --kv_blocks "$started_kv_blocks" --kv_block_tokens "$block_tokens" \
  --dense_below "$dense_below" --out "$out/summary.json" || status=1
phase "done (status $status)"
exit $status
