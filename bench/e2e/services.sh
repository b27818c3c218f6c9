# Shared by bench/e2e/e2e.sh and bench/decode/decode.sh on the GPU machine; sourced from the
# repository root after the caller set `out` (results folder) and `log` (its phase log).
# Unpacks the staged bundle (out/e2e), sets the paths and the run's clock, and defines the
# phase log, the checkpoint and A-shape config, and starting and stopping both services on one
# GPU (prefill 127.0.0.1:50051, metrics 9464; decode 127.0.0.1:50052, metrics 9465).
# Environment: MODEL_DIR, MODEL_ARGS (make_checkpoint flags), DEVICE (cuda; cpu rehearses the
# scripts on a machine without a GPU), DENSE_BELOW (24576), READY_TIMEOUT (180),
# BUDGET_SECONDS (530), PREFILL_FLAGS, DECODE_FLAGS.

work=/tmp/e2e
bin=out/e2e
if [[ -f out/e2e/bundle.tgz ]]; then
  mkdir -p "$work" && rm -rf "$work/e2e" && tar xzf out/e2e/bundle.tgz -C "$work" || exit 1
  bin="$work/e2e"
fi
bin="$(cd "$bin" && pwd)"
export LD_LIBRARY_PATH="$bin:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
model="${MODEL_DIR:-$work/llama-3.1-8b}"
model_args="${MODEL_ARGS:---preset llama-3.1-8b --dtype bfloat16 --seed 1}"
device_flag="${DEVICE:-cuda}"
config="$work/a_shape.json"
dense_below="${DENSE_BELOW:-24576}"
block_tokens=64
mkdir -p "$out" "$work"
: > "$log"
t0=$(date +%s)

# Seconds left of the run's budget (a device call ends at 10 minutes).
left() { echo $(( t0 + ${BUDGET_SECONDS:-530} - $(date +%s) )); }
phase() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - t0 ))s $*" | tee -a "$log"; }
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>&1 | tee -a "$log"; }

# The nvidia-smi line into $out/device.txt; sets `device` (e.g. h100) for labels.
record_device() {
  phase "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee "$out/device.txt"
  [[ -s "$out/device.txt" ]] || echo "unknown device" > "$out/device.txt"
  device=$(awk '{print tolower($2)}' "$out/device.txt" | head -1)
}

# The GPU tests of the kernels and the CUDA engine (cuda_kernels_test, llama_cuda_test,
# decode_engine_cuda_test) unless SKIP_TESTS is set: their summary lines (and, with $1, lines matching it) into the log; 1 if one failed.
run_gpu_tests() {
  local test rc failed=0
  phase "GPU tests"
  [[ -n "${SKIP_TESTS:-}" || "$device_flag" != cuda ]] && return 0
  for test in cuda_kernels_test llama_cuda_test decode_engine_cuda_test; do
    [[ -x "$bin/$test" ]] || continue
    TEST_TMPDIR=/tmp/e2e_test timeout 300 "$bin/$test" > "$work/$test.log" 2>&1
    rc=$?
    grep -E "^\[  (PASSED|FAILED) |tests? ran${1:+|$1}" "$work/$test.log" | tee -a "$log"
    (( rc == 0 )) || { echo "$test failed (rc $rc)" | tee -a "$log";
                       grep -B2 -A8 "Failure" "$work/$test.log" | head -60 >> "$log"; failed=1; }
  done
  return $failed
}

# The checkpoint (written once per machine) and the A-shape config: 128 sinks, 4K window;
# prompts below DENSE_BELOW tokens stay dense.
prepare_model() {
  phase "checkpoint $model"
  if [[ ! -f "$model/config.json" ]]; then
    # shellcheck disable=SC2086
    "$bin/make_checkpoint" --out "$model" $model_args >> "$log" 2>&1 || { tail "$log"; exit 1; }
  fi
  python3 bench/ttft/uniform_sparse_config.py --model "$model" --pattern a_shape \
    --sink 128 --window 4096 --dense_below_tokens "$dense_below" > "$config" ||
    { echo "sparse config failed"; exit 1; }
}

# Both services on the one GPU, in the background, the decode pool $1 blocks; returns once both
# logged ready (1: one exited or the wait timed out). Sets started_kv_blocks.
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
