#!/usr/bin/env python3
"""Times torch SDPA (cuDNN and flash backends) on the shapes of prefill_attention_bench:
one Llama-3.1-8B layer, 32 query heads, 8 KV heads, head_dim 128, bf16, causal, batch 1.
Prints one JSON object."""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def time_backend(backend, n):
    q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def run_gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    group = HEADS // KV_HEADS
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def run_expanded():
        return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    with sdpa_kernel([BACKENDS[backend]]):
        try:
            run_gqa()
            run, gqa = run_gqa, True
        except RuntimeError:
            run, gqa = run_expanded, False
            run()
        torch.cuda.synchronize()
        repeats = 20 if n <= 16384 else 10 if n <= 32768 else 5
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    median = statistics.median(times)
    flops = 2.0 * n * n * HEADS * HEAD_DIM
    return {"context": n, "median_ms": median, "min_ms": min(times), "repeats": repeats,
            "tflops": flops / (median * 1e-3) / 1e12, "native_gqa": gqa}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "backends": {}}
    for backend in BACKENDS:
        rows = []
        for n in contexts:
            try:
                rows.append(time_backend(backend, n))
            except RuntimeError as error:  # Out of memory or backend unavailable.
                rows.append({"context": n, "error": str(error).splitlines()[0]})
            torch.cuda.empty_cache()
        report["backends"][backend] = rows
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
