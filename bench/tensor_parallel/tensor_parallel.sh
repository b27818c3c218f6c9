#!/usr/bin/env bash
# Tensor-parallel prefill (prefill_server --gpus N) against one GPU, in one device call: the GPU
# tests, then TTFT in process (ttft_bench) and through the service pair (e2e_client), dense and
# A-shape sparse, with peak memory per GPU (bench/tensor_parallel/README.md).
#
# Here (build machine):  bench/tensor_parallel/tensor_parallel.sh stage   # = bench/e2e/e2e.sh stage
# GPU machine (out/e2e carried):
#                        bench/tensor_parallel/tensor_parallel.sh run
# GPUS: the --gpus values compared (default "0,1" on one GPU: one GPU without NCCL against the
# NCCL path on that GPU; "1,2" where the machine has two). LENGTHS (32768,131072; the services
# take 131040, room for the generated tokens), REPS (2), SKIP_TESTS, SKIP_SERVICES. Results in
# $OUT (default /tmp/tp_out): device.txt, tp.log, ttft.jsonl, e2e_gpus<N>.json, summary.json.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
case "${1:-}" in
  stage) exec bench/e2e/e2e.sh stage ;;
  run) ;;
  *) echo "usage: bench/tensor_parallel/tensor_parallel.sh stage|run" >&2; exit 2 ;;
esac

out="${OUT:-/tmp/tp_out}"
log="$out/tp.log"
# NVLink multicast can take a shared host's GPUs down: never on.
export NCCL_NVLS_ENABLE=0
source bench/e2e/services.sh
# libnccl.so.2: the toolkit's, else the one PyTorch ships.
if [[ ! -e /usr/local/cuda/lib64/libnccl.so.2 ]]; then
  nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
  [[ -n "$nccl_lib" ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$nccl_lib"
fi
lengths="${LENGTHS:-32768,131072}"
service_lengths="${lengths//131072/131040}"
reps="${REPS:-2}"
status=0
record_device
gpu_count=$(nvidia-smi -L 2>/dev/null | wc -l)
default_gpus="0,1"
(( gpu_count >= 2 )) && default_gpus="1,2"
gpus_list="${GPUS:-$default_gpus}"
phase "GPUs on this machine: $gpu_count; comparing --gpus $gpus_list"

run_gpu_tests "^tensor_parallel " || status=1

prepare_model
: > "$out/ttft.jsonl"
for gpus in ${gpus_list//,/ }; do
  for attention in dense a_shape; do
    phase "in-process TTFT, --gpus $gpus, $attention"
    sparse_args=()
    [[ "$attention" == a_shape ]] && sparse_args=(--sparse_config "$config")
    timeout 200 "$bin/ttft_bench" --model "$model" --lengths "$lengths" --reps "$reps" \
      --gpus "$gpus" --label "$attention" "${sparse_args[@]}" 2>> "$log" | tee -a "$out/ttft.jsonl"
    (( PIPESTATUS[0] == 0 )) || { echo "ttft_bench --gpus $gpus failed" | tee -a "$log"; status=1; }
  done
done

[[ -n "${SKIP_SERVICES:-}" ]] || for gpus in ${gpus_list//,/ }; do
  phase "services, prefill --gpus $gpus (A-shape config)"
  PREFILL_FLAGS="--gpus=$gpus" start_services 2400 || { stop_services; status=1; continue; }
  gpu_used
  timeout $(( $(left) - 30 )) "$bin/e2e_client" --decode_address 127.0.0.1:50052 \
    --lengths "$service_lengths" --reps 1 --concurrent 0 --max_tokens 8 --deadline_seconds 120 \
    --out "$out/e2e_gpus$gpus.json" --label "gpus$gpus" >> "$log" 2>&1 || status=1
  gpu_used
  stop_services
  copy_logs
done

phase "summary"
python3 bench/tensor_parallel/summarize.py --ttft "$out/ttft.jsonl" --device "$out/device.txt" \
  --gpus "$gpus_list" --e2e_dir "$out" --out "$out/summary.json" || status=1
phase "done (status $status)"
exit $status
