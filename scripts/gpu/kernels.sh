#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with binaries staged (here) by
#   scripts/gpu/kernels.sh --stage [--baseline REV]
# into out/device/. On the device: the CUDA kernel tests (dense and sparse), the prefill
# attention benchmark and torch SDPA (cuDNN, flash) on the same shapes, and the sparse attention
# benchmark (bench/attention/sparse_attention_bench.py); results JSON under $OUT (default
# out/results), with the GPU's clocks, power and temperature before and after (gpu_state.csv).
#
# --baseline REV also stages git revision REV's two benchmarks into out/device/baseline/; the
# device run then times each right after ours (the sparse one on the same seeded inputs) and
# prints both side by side.
# Compare kernel variants that way: between device calls the same code has measured up to 8%
# apart.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Benchmarks that a baseline build provides too.
baseline_targets=(//bench/attention:prefill_attention_bench
  //bench/attention:libsparse_attention_capi.so)

# Copies bazel-bin BIN's file FILE into DIR, with the non-glibc shared libraries it needs
# (into out/device, shared by both builds; CUDA's own come from the device).
stage_file() {
  local bin="$1" file="$2" dir="$3"
  install -m 755 "$bin/$file" "$dir/"
  ldd "$bin/$file" | awk '/=> \// {print $3}' |
    grep -Ev '/(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux)[.-]' |
    grep -v /usr/local/cuda | xargs -r -I{} cp -L -n {} out/device/
  if LD_LIBRARY_PATH=out/device ldd "$dir/${file##*/}" | grep 'not found'; then
    echo "missing libraries for $file" >&2
    exit 1
  fi
}

if [[ "${1:-}" == "--stage" ]]; then
  bazel build //kernels/cuda:cuda_kernels_test //kernels/cuda:sparse_attention_test \
    //bench/attention:prefill_attention_bench //bench/attention:decode_attention_bench \
    //bench/attention:libsparse_attention_capi.so
  bin="$(bazel info bazel-bin 2>/dev/null)"
  mkdir -p out/device
  for b in kernels/cuda/cuda_kernels_test kernels/cuda/sparse_attention_test \
    bench/attention/prefill_attention_bench bench/attention/decode_attention_bench \
    bench/attention/libsparse_attention_capi.so; do
    stage_file "$bin" "$b" out/device
  done
  rm -rf out/device/baseline
  if [[ "${2:-}" == "--baseline" ]]; then
    rev="${3:?--baseline needs a git revision}"
    tree="$(mktemp -d)"
    git worktree add --detach "$tree/src" "$rev" >/dev/null
    (cd "$tree/src" && bazel --output_base="$tree/output" build "${baseline_targets[@]}")
    mkdir -p out/device/baseline
    base_bin="$(cd "$tree/src" && bazel --output_base="$tree/output" info bazel-bin 2>/dev/null)"
    for target in "${baseline_targets[@]}"; do
      target="${target#//}"
      stage_file "$base_bin" "${target/://}" out/device/baseline
    done
    git -C "$tree/src" rev-parse HEAD > out/device/baseline/REVISION
    (cd "$tree/src" && bazel --output_base="$tree/output" shutdown)
    git worktree remove --force "$tree/src"
    rm -rf "$tree"
  fi
  du -sh out/device
  exit 0
fi

OUT="${OUT:-out/results}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="out/device:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true

gpu_state() {
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader >> "$OUT/gpu_state.csv" 2>/dev/null || true
}
gpu_state

status=0
for test in cuda_kernels_test sparse_attention_test; do
  "out/device/$test" --gtest_output="xml:$OUT/$test.xml" 2>&1 | tee "$OUT/$test.log" |
    grep -E '^\[( +OK|  FAILED|  PASSED|==========)' || true
  grep -q '^\[  PASSED' "$OUT/$test.log" || { status=1; tail -40 "$OUT/$test.log"; }
done

out/device/prefill_attention_bench > "$OUT/ours.json" || status=1
if [[ -d out/device/baseline ]]; then
  out/device/baseline/prefill_attention_bench > "$OUT/baseline_ours.json" || status=1
fi
out/device/decode_attention_bench > "$OUT/decode_attention.json" || status=1
python3 bench/attention/torch_sdpa.py > "$OUT/torch.json" || status=1
sparse_contexts=4096,8192,16384,24576,32768,65536,131072
# With a baseline, both builds' sparse runs take the same (random) inputs.
sparse_seed=()
[[ -d out/device/baseline ]] && sparse_seed=(--seed "$((RANDOM * 32768 + RANDOM))")
python3 bench/attention/sparse_attention_bench.py --lib out/device/libsparse_attention_capi.so \
  --contexts "$sparse_contexts" "${sparse_seed[@]}" > "$OUT/sparse_attention.json" || status=1
gpu_state
if [[ -d out/device/baseline ]]; then
  python3 bench/attention/sparse_attention_bench.py \
    --lib out/device/baseline/libsparse_attention_capi.so --contexts "$sparse_contexts" \
    "${sparse_seed[@]}" > "$OUT/baseline_sparse_attention.json" || status=1
  gpu_state
fi

python3 - "$OUT" <<'PY'
import datetime, json, os, sys
out = sys.argv[1]
ours, torch_ = json.load(open(f"{out}/ours.json")), json.load(open(f"{out}/torch.json"))
merged = {"date": datetime.date.today().isoformat(), "device": ours["device"],
          "shape": ours["shape"], "ours": ours, "torch_sdpa": torch_}
json.dump(merged, open(f"{out}/prefill_attention.json", "w"), indent=2)
by = {b: {r["context"]: r for r in rs} for b, rs in torch_["backends"].items()}
print("| context | ours | ours ms | ours TFLOP/s | cuDNN ms | cuDNN TFLOP/s | flash ms | flash TFLOP/s |")
print("|---|---|---|---|---|---|---|---|")
fmt = lambda r, k: f"{r[k]:.2f}" if r and k in r else "-"
for r in ours["results"]:
    n = r["context"]
    c, f = by["cudnn"].get(n), by["flash"].get(n)
    print(f"| {n//1024}K | {r['inner_loop']} | {fmt(r,'median_ms')} | {r['tflops']:.0f} | "
          f"{fmt(c,'median_ms')} | {fmt(c,'tflops')} | {fmt(f,'median_ms')} | {fmt(f,'tflops')} |")
if os.path.exists(f"{out}/baseline_ours.json"):
    base = json.load(open(f"{out}/baseline_ours.json"))
    revision = open("out/device/baseline/REVISION").read().strip()[:10]
    print(f"\n| context | inner loop | ours ms | baseline {revision} ms | ours / baseline |")
    print("|---|---|---|---|---|")
    base_by = {(r["context"], r["inner_loop"]): r for r in base["results"]}
    for r in ours["results"]:
        b = base_by.get((r["context"], r["inner_loop"]))
        if b:
            print(f"| {r['context']//1024}K | {r['inner_loop']} | {r['median_ms']:.2f} | "
                  f"{b['median_ms']:.2f} | {r['median_ms'] / b['median_ms']:.3f} |")
    sparse = {(r["context"], r["input"]): r
              for r in json.load(open(f"{out}/sparse_attention.json"))["results"]}
    print(f"\n| context | input | vertical-slash ms (tile cost) | baseline ms (tile cost) |")
    print("|---|---|---|---|")
    for r in json.load(open(f"{out}/baseline_sparse_attention.json"))["results"]:
        o = sparse.get((r["context"], r["input"]))
        if o:
            ov, bv = o["vertical_slash"], r["vertical_slash"]
            print(f"| {r['context']//1024}K | {r['input']} | "
                  f"{ov['total_ms']:.2f} ({ov['tile_cost']:.3f}) | "
                  f"{bv['total_ms']:.2f} ({bv['tile_cost']:.3f}) |")
decode = json.load(open(f"{out}/decode_attention.json"))
print("\n| decode batch | context | ms | K/V GB/s |\n|---|---|---|---|")
for r in decode["results"]:
    print(f"| {r['batch']} | {r['context']//1024}K | {r['median_ms']:.3f} | {r['kv_gb_per_s']:.0f} |")
PY
exit $status
