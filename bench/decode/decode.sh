#!/usr/bin/env bash
# Decode inter-token latency on one GPU, in one device call: the engine alone (decode_bench)
# against requests through the service pair (e2e_client's decode phase), next to the memory
# bandwidth floor of a decode step (bench/README.md, "Decode ITL: engine and service").
#
# Here (build machine):  bench/decode/decode.sh stage   # bench/e2e/e2e.sh stage: out/e2e
# GPU machine (out/e2e carried, python3; torch for the copy bandwidth, skipped without it):
#                        bench/decode/decode.sh run
# Results go to $OUT (default /tmp/decode_out), 7 files: device.txt (nvidia-smi line, measured
# copy bandwidth), decode.log, engine.jsonl (decode_bench), e2e.json (e2e_client, one run per
# context), summary.json (ITL, ratios, floors, pass/fail), prefill.log.tail, decode.log.tail.
# Environment: CONTEXTS (4096,32768), BATCHES (1,8,32), POOL_GIB (decode_bench's pool, 40),
# SERVICE_POOL_GIB (most GiB of the decode service's pool, 36: it sits beside two copies of the
# weights), DECODE_MAX_TOKENS (tokens per service request; default per context, see
# max_tokens_for), PREFILL_TOKENS_PER_S (36000, the prefill rate that default assumes); the
# checkpoint, the services and the budget: bench/e2e/services.sh.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
mode="${1:-}"
if [[ "$mode" == stage ]]; then
  exec bench/e2e/e2e.sh stage
fi
if [[ "$mode" != run ]]; then
  echo "usage: bench/decode/decode.sh stage|run" >&2
  exit 2
fi

out="${OUT:-/tmp/decode_out}"
log="$out/decode.log"
source bench/e2e/services.sh
contexts="${CONTEXTS:-4096,32768}"
batches="${BATCHES:-1,8,32}"
prefill_tps="${PREFILL_TOKENS_PER_S:-36000}"
declare -A case_batches case_tokens
skipped=()
e2e_files=()
started_kv_blocks=0
status=0
rm -f "$work"/e2e_decode_*.json

# Service requests' max_tokens at context $1 with batches up to $2: the last of $2 prefills
# (about $1 / PREFILL_TOKENS_PER_S s each, one after another) ends that many seconds after the
# release, while the first request has decoded at most one token per 8 ms; 64 more tokens keep
# the window in which all streams decode above 48 steps. At most 1024.
max_tokens_for() {
  local tokens=$(( 64 + ($2 * $1 * 125 + prefill_tps - 1) / prefill_tps ))
  (( tokens > 1024 )) && tokens=1024
  echo "${DECODE_MAX_TOKENS:-$tokens}"
}

# Per context, the batches whose requests fit $1 pool blocks at once (every request holds
# blocks for its prompt and max_tokens until it ends): sets case_batches[context] (ascending),
# case_tokens[context], skipped (notes) and kv_blocks (what the largest case needs).
plan_cases() {
  local cap=$1 c b tokens need
  kv_blocks=0
  skipped=()
  for c in ${contexts//,/ }; do
    case_batches[$c]=
    case_tokens[$c]=
    for b in $(tr ',' '\n' <<< "$batches" | sort -rn); do
      if [[ -z "${case_tokens[$c]}" ]]; then
        tokens=$(max_tokens_for "$c" "$b")
        need=$(( b * ((c + tokens + block_tokens - 1) / block_tokens) ))
        if (( need > cap )); then
          skipped+=("$c,$b,K/V needs $need blocks of $block_tokens tokens, pool at most $cap")
          continue
        fi
        case_tokens[$c]=$tokens
        (( need > kv_blocks )) && kv_blocks=$need
      fi
      case_batches[$c]="$b${case_batches[$c]:+,${case_batches[$c]}}"
    done
  done
}

# The pool cap in blocks: SERVICE_POOL_GIB of bf16 K and V (block_tokens positions, all layers).
service_cap_blocks() {
  python3 - "$model/config.json" "$block_tokens" "${SERVICE_POOL_GIB:-36}" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
block = int(sys.argv[2]) * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 2 * 2
print(int(float(sys.argv[3]) * (1 << 30) // block))
EOF
}

# One e2e_client decode phase per context that has cases, each within what is left of the
# budget (less the time to stop the services and summarise).
run_clients() {
  local c seconds
  for c in ${contexts//,/ }; do
    [[ -n "${case_batches[$c]}" ]] || continue
    seconds=$(( $(left) - 40 ))
    if (( seconds < 10 )); then
      echo "no time left for the service at $c tokens" | tee -a "$log"
      status=1
      return
    fi
    phase "e2e_client: $c tokens, batches ${case_batches[$c]}," \
      "max_tokens ${case_tokens[$c]} (at most ${seconds} s)"
    timeout "$seconds" "$bin/e2e_client" --decode_address 127.0.0.1:50052 --lengths "" \
      --concurrent 0 --decode_length "$c" --decode_batches "${case_batches[$c]}" \
      --decode_max_tokens "${case_tokens[$c]}" --deadline_seconds 300 \
      --prefill_metrics_url http://127.0.0.1:9464/metrics \
      --decode_metrics_url http://127.0.0.1:9465/metrics \
      --out "$work/e2e_decode_$c.json" --label "$device-decode" 2>&1 | tee -a "$log"
    (( PIPESTATUS[0] == 0 )) || { echo "e2e_client failed at $c tokens" | tee -a "$log"; status=1; }
    [[ -f "$work/e2e_decode_$c.json" ]] && e2e_files+=("$work/e2e_decode_$c.json")
  done
}

# Both services with a pool for the largest case that fits (half of that, re-planned, if they
# do not start with it), then the clients.
run_services() {
  plan_cases "$(service_cap_blocks)"
  local note
  for note in "${skipped[@]}"; do echo "service case skipped: $note" | tee -a "$log"; done
  (( kv_blocks > 0 )) || { echo "no service case fits" | tee -a "$log"; status=1; return; }
  # Every request of a batch in one decode step.
  local largest
  largest=$(tr ',' '\n' <<< "$batches" | sort -n | tail -1)
  DECODE_FLAGS="--max_batch $(( largest > 32 ? largest : 32 )) ${DECODE_FLAGS:-}"
  phase "services (decode KV pool: $kv_blocks x $block_tokens-token blocks)"
  trap 'stop_services; copy_logs' EXIT
  if ! start_services "$kv_blocks"; then
    stop_services
    plan_cases $(( kv_blocks / 2 ))
    for note in "${skipped[@]}"; do echo "service case skipped: $note" | tee -a "$log"; done
    phase "retrying with $kv_blocks blocks"
    if (( kv_blocks == 0 )) || ! start_services "$kv_blocks"; then
      echo "services did not start" | tee -a "$log"
      status=1
      return
    fi
  fi
  gpu_used
  run_clients
  gpu_used
  phase "stopping services"
  stop_services
  trap - EXIT
  copy_logs
}

record_device
phase "copy bandwidth (torch, 4 GiB device to device)"
if python3 bench/decode/copy_bandwidth.py >> "$out/device.txt" 2>> "$log"; then
  tail -n 1 "$out/device.txt" | tee -a "$log"
else
  echo "copy bandwidth skipped" | tee -a "$log"
fi
prepare_model

# The engine first, alone on the GPU: its pool (POOL_GIB) leaves no room for the services.
phase "engine (decode_bench, contexts $contexts, batches $batches)"
timeout 240 "$bin/decode_bench" --model "$model" --contexts "$contexts" --batches "$batches" \
  --steps 32 --pool_gib "${POOL_GIB:-40}" 2>> "$log" | tee "$out/engine.jsonl"
(( PIPESTATUS[0] == 0 )) || { echo "decode_bench failed" | tee -a "$log"; status=1; }

run_services

phase "summary"
skipped_args=()
for note in "${skipped[@]}"; do skipped_args+=(--skipped "$note"); done
python3 bench/decode/summarize.py --engine "$out/engine.jsonl" --e2e "${e2e_files[@]}" \
  --e2e_out "$out/e2e.json" --config "$model/config.json" --device "$out/device.txt" \
  --contexts "$contexts" --batches "$batches" --kv_blocks "$started_kv_blocks" \
  --kv_block_tokens "$block_tokens" "${skipped_args[@]}" --out "$out/summary.json" || status=1
phase "done (status $status)"
exit $status
