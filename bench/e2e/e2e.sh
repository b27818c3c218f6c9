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
# CONCURRENT (4), CONCURRENT_LENGTH (32768), DENSE_BELOW (24576); the checkpoint, the
# services and the budget: bench/e2e/services.sh (shared with bench/decode/decode.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-}"

if [[ "$mode" == stage ]]; then
  set -e
  targets=(//prefill_service:prefill_server //decode_service:decode_server //model/tools:make_checkpoint
           //bench/ttft:ttft_bench //bench/e2e:e2e_client
           //kernels/cuda:cuda_kernels_test //model/cuda:llama_cuda_test
           //decode_service:decode_engine_cuda_test //bench/decode:decode_bench
           //bench/attention:decode_attention_bench)
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
log="$out/e2e.log"
# Sets bin, model, config, block_tokens, dense_below and the run's clock (t0); DEVICE=cpu with
# MODEL_DIR=<small checkpoint> rehearses the script on the build machine (ttft_bench, CUDA-only,
# then fails).
source bench/e2e/services.sh
lengths="${LENGTHS:-4096,32768,131040}"
reps="${REPS:-2}"
max_tokens="${MAX_TOKENS:-32}"
concurrent="${CONCURRENT:-4}"
concurrent_length="${CONCURRENT_LENGTH:-32768}"
# Every request reserves blocks for its prompt and max_tokens until it ends.
blocks_for() { echo $(( ($1 + max_tokens + block_tokens - 1) / block_tokens )); }
longest=$(tr ',' '\n' <<< "$lengths" | sort -n | tail -1)
kv_blocks=$(( concurrent * $(blocks_for "$concurrent_length") + $(blocks_for "$longest") ))
kv_blocks="${KV_BLOCKS:-$kv_blocks}"
# What the concurrent phase or the longest prompt needs alone (retried with this if the pool
# above does not fit next to the two copies of the weights).
kv_blocks_min=$(( concurrent * $(blocks_for "$concurrent_length") ))
(( kv_blocks_min < $(blocks_for "$longest") )) && kv_blocks_min=$(blocks_for "$longest")
status=0

record_device

# The GPU tests of the engine paths the services use (export beside the compute, pool uploads),
# on the same build, before the numbers.
run_gpu_tests || status=1

prepare_model

phase "in-process TTFT (ttft_bench, a_shape)"
[[ -n "${SKIP_TTFT:-}" ]] || timeout 180 "$bin/ttft_bench" --model "$model" --lengths "$lengths" --sparse_config "$config" \
  --reps "$reps" --label a_shape 2>> "$log" | tee "$out/ttft.jsonl"
(( PIPESTATUS[0] == 0 )) || { echo "ttft_bench failed"; status=1; }

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
