#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with binaries staged (here) by
#   scripts/gpu/kernels.sh --stage
# into out/device/. On the device: the CUDA kernel tests (dense and sparse), the prefill
# attention benchmark and torch SDPA (cuDNN, flash) on the same shapes, and the sparse attention
# benchmark (bench/attention/sparse_attention_bench.py); results JSON under $OUT (default
# out/results).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "--stage" ]]; then
  bazel build //kernels/cuda:cuda_kernels_test //kernels/cuda:sparse_attention_test \
    //bench/attention:prefill_attention_bench //bench/attention:decode_attention_bench \
    //bench/attention:libsparse_attention_capi.so
  bin="$(bazel info bazel-bin 2>/dev/null)"
  mkdir -p out/device
  for b in kernels/cuda/cuda_kernels_test kernels/cuda/sparse_attention_test \
    bench/attention/prefill_attention_bench bench/attention/decode_attention_bench \
    bench/attention/libsparse_attention_capi.so; do
    install -m 755 "$bin/$b" out/device/
    # Non-glibc shared libraries the binaries need (CUDA's own come from the device).
    ldd "$bin/$b" | awk '/=> \// {print $3}' |
      grep -Ev '/(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux)[.-]' |
      grep -v /usr/local/cuda | xargs -r -I{} cp -L -n {} out/device/
    if LD_LIBRARY_PATH=out/device ldd "out/device/${b##*/}" | grep 'not found'; then
      echo "missing libraries for $b" >&2
      exit 1
    fi
  done
  du -sh out/device
  exit 0
fi

OUT="${OUT:-out/results}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="out/device:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true

status=0
for test in cuda_kernels_test sparse_attention_test; do
  "out/device/$test" --gtest_output="xml:$OUT/$test.xml" 2>&1 | tee "$OUT/$test.log" |
    grep -E '^\[( +OK|  FAILED|  PASSED|==========)' || true
  grep -q '^\[  PASSED' "$OUT/$test.log" || { status=1; tail -40 "$OUT/$test.log"; }
done

out/device/prefill_attention_bench > "$OUT/ours.json" || status=1
out/device/decode_attention_bench > "$OUT/decode_attention.json" || status=1
python3 bench/attention/torch_sdpa.py > "$OUT/torch.json" || status=1
python3 bench/attention/sparse_attention_bench.py --lib out/device/libsparse_attention_capi.so \
  --contexts 4096,8192,16384,24576,32768,65536,131072 > "$OUT/sparse_attention.json" ||
  status=1

python3 - "$OUT" <<'PY'
import datetime, json, sys
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
decode = json.load(open(f"{out}/decode_attention.json"))
print("\n| decode batch | context | ms | K/V GB/s |\n|---|---|---|---|")
for r in decode["results"]:
    print(f"| {r['batch']} | {r['context']//1024}K | {r['median_ms']:.3f} | {r['kv_gb_per_s']:.0f} |")
PY
exit $status
