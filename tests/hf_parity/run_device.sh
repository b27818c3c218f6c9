#!/usr/bin/env bash
# On the GPU machine (torch + transformers, no bazel): runs the HF parity check with binaries
# staged by `scripts/stage_device.sh bazel-bin/model/tools/run_model bazel-bin/model/tools/make_checkpoint`.
# Writes $OUT/hf_parity.json (or ./hf_parity.json without $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH="$PWD/out/device:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
python3 tests/hf_parity/hf_parity.py --bin out/device --out "${OUT:-.}/hf_parity.json"
