"""Where the time of BuildSparseIndex goes: per-kernel GPU time of the vertical-slash index build
(and, for comparison, the attention that follows) on the sparse bench's structured inputs
(--input random: the structure-less case, where every block keeps nearly every tile).

  LD_LIBRARY_PATH=out/device python3 bench/attention/profile_sparse_index.py \
      --lib out/device/libsparse_attention_capi.so

Prints JSON (per context: each kernel's mean time per build, in ms) on stdout and a table on
stderr. Uses torch.profiler (CUPTI), so it sees the library's kernels without hardware counters.
"""

import argparse
import collections
import datetime
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_attention_bench as bench  # noqa: E402


def kernel_times(fn, repeats):
    """Mean GPU milliseconds per call of each kernel that fn launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1000.0
    return {name: ms / repeats for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def short(name):
    """Kernel name without namespaces' noise and parameter list, at most 70 characters."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    return name.split("(")[0][:70]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", default="out/device/libsparse_attention_capi.so")
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--vertical", type=int, default=1000)
    parser.add_argument("--slash", type=int, default=6096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--input", choices=("structured", "random"), default="structured")
    args = parser.parse_args()
    ours = bench.Ours(args.lib)
    gen = torch.Generator(device="cuda")
    gen.seed()
    results = []
    for n in [int(c) for c in args.contexts.split(",")]:
        q, k, v = bench.make_inputs(n, args.input, gen)
        out = torch.empty_like(q)
        handle = ours.layer(
            n, (bench.KIND["vertical_slash"], 0, 0, args.vertical, args.slash, 64, 0))
        build = kernel_times(lambda: ours.sparse(handle, q, k, v, out, attend=False), args.repeats)
        attend = kernel_times(lambda: ours.sparse(handle, q, k, v, out, build=False), args.repeats)
        ours.lib.sa_destroy(handle)
        results.append({"context": n, "build_kernels_ms": build, "attend_kernels_ms": attend})
        print(f"# {n}: build {sum(build.values()):.3f} ms, attend {sum(attend.values()):.3f} ms",
              file=sys.stderr)
        for name, ms in build.items():
            print(f"#   {ms:8.3f} ms  {short(name)}", file=sys.stderr)
        del q, k, v, out
        torch.cuda.empty_cache()
    print(json.dumps({"date": datetime.date.today().isoformat(),
                      "device": torch.cuda.get_device_name(), "input": args.input, "vertical": args.vertical,
                      "slash": args.slash, "results": results}, indent=2))


if __name__ == "__main__":
    main()
