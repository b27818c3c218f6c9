#!/usr/bin/env bash
# A decode change against its base in one device call: the candidate's GPU tests, then decode
# attention alone (decode_attention_bench) and the engine's decode step (decode_bench), base
# and candidate alternating ROUNDS times so that both see the same GPU, clocks and checkpoint.
#
# Here (build machine), the base first, then the candidate:
#   git checkout BASE && bench/decode/ab.sh stage-base   # its two benches: out/ab_base
#   git checkout CANDIDATE && bench/decode/decode.sh stage   # everything else: out/e2e
# GPU machine (out/e2e and out/ab_base carried, python3):
#   bench/decode/ab.sh run
# Results go to $OUT (default /tmp/ab_out): device.txt, ab.log, attention.jsonl and
# engine.jsonl (one line per build, round and point), summary.json (medians per build, the
# candidate / base ratio per point; bench/decode/ab_summarize.py).
# Environment: ROUNDS (2), CONTEXTS (4096,32768), BATCHES (1,8), STEPS (32), POOL_GIB (40),
# SKIP_TESTS; the checkpoint and the budget: bench/e2e/services.sh.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
mode="${1:-}"
base_dir=out/ab_base
benches=(//bench/decode:decode_bench //bench/attention:decode_attention_bench)

if [[ "$mode" == stage-base ]]; then
  set -e
  bazel build "${benches[@]}"
  bazel_bin="$(bazel info bazel-bin 2>/dev/null)"
  rm -rf "$base_dir" && mkdir -p "$base_dir"
  cp "$bazel_bin/bench/decode/decode_bench" "$bazel_bin/bench/attention/decode_attention_bench" \
    "$base_dir/"
  { git rev-parse HEAD; git status --porcelain --untracked-files=no; } > "$base_dir/commit.txt"
  du -sh "$base_dir"
  exit 0
fi
if [[ "$mode" != run ]]; then
  echo "usage: bench/decode/ab.sh stage-base|run" >&2
  exit 2
fi

out="${OUT:-/tmp/ab_out}"
log="$out/ab.log"
# Sets bin (the candidate's unpacked bundle, whose libraries serve the base's binaries too),
# model, the clock and the phase log.
source bench/e2e/services.sh
base_bin="$(cd "$base_dir" && pwd)" || exit 1
rounds="${ROUNDS:-2}"
status=0
: > "$out/attention.jsonl"
: > "$out/engine.jsonl"

# Runs "$@", tagging each JSON line it prints with build $1 and round $2 into file $3.
tagged() {
  local build=$1 round=$2 file=$3
  shift 3
  "$@" 2>> "$log" | python3 -c '
import json, sys
build, round_ = sys.argv[1], int(sys.argv[2])
text = sys.stdin.read()
# decode_attention_bench prints one JSON object; decode_bench one per line.
try:
    records = [json.loads(text)]
except ValueError:
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
for record in records:
    record.update(build=build, round=round_)
    print(json.dumps(record))
' "$build" "$round" >> "$file"
  local rc=("${PIPESTATUS[@]}")
  (( rc[0] == 0 && rc[1] == 0 )) || { echo "$build round $round failed: $*" | tee -a "$log"; status=1; }
}

record_device
echo "base: $(head -1 "$base_bin/commit.txt" 2>/dev/null)" | tee -a "$log"
run_gpu_tests || status=1

phase "decode attention, $rounds rounds"
for (( r = 1; r <= rounds; ++r )); do
  tagged base "$r" "$out/attention.jsonl" timeout 120 "$base_bin/decode_attention_bench"
  tagged candidate "$r" "$out/attention.jsonl" timeout 120 "$bin/decode_attention_bench"
done

prepare_model
phase "engine decode steps, $rounds rounds"
engine_args=(--model "$model" --contexts "${CONTEXTS:-4096,32768}" --batches "${BATCHES:-1,8}"
             --steps "${STEPS:-32}" --pool_gib "${POOL_GIB:-40}")
for (( r = 1; r <= rounds; ++r )); do
  for build in base candidate; do
    exe="$bin/decode_bench"
    [[ $build == base ]] && exe="$base_bin/decode_bench"
    seconds=$(( $(left) - 20 ))
    (( seconds > 10 )) || { echo "no time left for $build round $r" | tee -a "$log"; status=1; break 2; }
    phase "$build round $r (at most $seconds s)"
    tagged "$build" "$r" "$out/engine.jsonl" timeout "$seconds" "$exe" "${engine_args[@]}"
  done
done

phase "summary"
python3 bench/decode/ab_summarize.py --attention "$out/attention.jsonl" \
  --engine "$out/engine.jsonl" --device "$out/device.txt" \
  --base_commit "$(head -1 "$base_bin/commit.txt" 2>/dev/null)" --out "$out/summary.json" ||
  status=1
phase "done (status $status)"
exit $status
