#!/usr/bin/env python3
"""One Llama-3.1-8B attention layer (32 query heads, 8 KV heads, head_dim 128, bf16, causal):
our sparse path (index estimation + attention), our dense kernel, and torch SDPA's cuDNN and
flash backends, on the same tensors in the same process (ours through ctypes from
libsparse_attention_capi.so).

Two kinds of input per context length, fresh for each:
  random:     Q, K, V ~ N(0, 1). Attention is nearly uniform: no sparse pattern fits it.
  structured: random plus planted structure of the kind real heads show: 4 attention sinks,
              512 key columns every query attends to, and locality: a score of 10 at offset 0
              fading as exp(-offset / 4000).
For each: median time of repeated runs, the index's cost (tiles computed / dense tiles) and
exact density on a few heads, recall (dense attention mass on the selected keys, sampled
rows) and the output's relative error against cuDNN. Prints one JSON object (progress lines
go to stderr).
"""

import argparse
import ctypes
import datetime
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64
GROUP = HEADS // KV_HEADS
LOCAL_LOGITS, LOCAL_LENGTH = 10.0, 4000.0  # Structured inputs' locality: peak score, decay.
KIND = {"dense": 0, "a_shape": 1, "vertical_slash": 2, "block_sparse": 3}


class Ours:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        c = ctypes
        self.lib.sa_create.restype = c.c_void_p
        self.lib.sa_create.argtypes = [c.c_int64] * 4 + [c.POINTER(c.c_int64), c.c_char_p, c.c_int]
        self.lib.sa_destroy.argtypes = [c.c_void_p]
        self.lib.sa_workspace_bytes.restype = c.c_int64
        self.lib.sa_workspace_bytes.argtypes = [c.c_void_p]
        self.lib.sa_build_index.argtypes = [c.c_void_p] * 4 + [c.c_char_p, c.c_int]
        self.lib.sa_attend.argtypes = [c.c_void_p] * 6 + [c.c_char_p, c.c_int]
        self.lib.sa_dense.argtypes = [c.c_void_p] * 4 + [c.c_int64] * 4 + [c.c_void_p, c.c_char_p,
                                                                          c.c_int]
        self.lib.sa_index_stats.argtypes = [c.c_void_p, c.c_void_p, c.c_int64,
                                            c.POINTER(c.c_double), c.POINTER(c.c_double),
                                            c.c_char_p, c.c_int]
        self.lib.sa_block_keys.restype = c.c_int64
        self.lib.sa_block_keys.argtypes = [c.c_void_p, c.c_int64, c.c_int64,
                                           c.POINTER(c.c_int32), c.c_int64]
        self.error = ctypes.create_string_buffer(512)

    def check(self, rc):
        if rc != 0:
            raise RuntimeError(self.error.value.decode())

    @staticmethod
    def stream():
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def layer(self, n, pattern):
        """pattern: (kind, sink, window, vertical, slash, last_q, top_k) for every head."""
        flat = (ctypes.c_int64 * (7 * HEADS))(*(list(pattern) * HEADS))
        handle = self.lib.sa_create(n, HEADS, KV_HEADS, HEAD_DIM, flat, self.error, 512)
        if not handle:
            raise RuntimeError(self.error.value.decode())
        return handle

    def sparse(self, handle, q, k, v, out, build=True, attend=True):
        s = self.stream()
        if build:
            self.check(self.lib.sa_build_index(handle, q.data_ptr(), k.data_ptr(), s,
                                               self.error, 512))
        if attend:
            self.check(self.lib.sa_attend(handle, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                          out.data_ptr(), s, self.error, 512))

    def dense(self, q, k, v, out):
        self.check(self.lib.sa_dense(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                     q.shape[0], HEADS, KV_HEADS, HEAD_DIM, self.stream(),
                                     self.error, 512))

    def stats(self, handle, density_heads):
        cost = (ctypes.c_double * HEADS)()
        density = (ctypes.c_double * HEADS)()
        self.check(self.lib.sa_index_stats(handle, self.stream(), density_heads, cost, density,
                                           self.error, 512))
        return list(cost), [d for d in density if d >= 0]

    def block_keys(self, handle, head, block):
        capacity = (block + 1) * BLOCK
        keys = (ctypes.c_int32 * capacity)()
        count = self.lib.sa_block_keys(handle, head, block, keys, capacity)
        if count < 0:
            raise RuntimeError("sa_block_keys")
        return list(keys[:count])


def make_inputs(n, kind, gen):
    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen)

    if kind == "random":
        q, k, v = randn(n, HEADS, HEAD_DIM), randn(n, KV_HEADS, HEAD_DIM), randn(n, KV_HEADS,
                                                                                HEAD_DIM)
    else:
        q, k, v = 0.5 * randn(n, HEADS, HEAD_DIM), 0.5 * randn(n, KV_HEADS, HEAD_DIM), randn(
            n, KV_HEADS, HEAD_DIM)

        def unit(*shape):
            x = randn(*shape, HEAD_DIM)
            return x / x.norm(dim=-1, keepdim=True)

        def plant(logits):  # Amplitude giving `logits` of score when both sides carry it.
            return math.sqrt(logits * math.sqrt(HEAD_DIM))

        expand = lambda x: x.repeat_interleave(GROUP, 0)  # [kv_heads, d] -> [heads, d]
        sink = unit(KV_HEADS)
        q += plant(6) * expand(sink)
        k[:4] += plant(6) * sink
        stripe = unit(KV_HEADS)
        columns = torch.randperm(n, device="cuda", generator=gen)[:512]
        q += plant(4) * expand(stripe)
        k[columns] += plant(4) * stripe
        # Locality: a score that depends on the offset only and fades smoothly and
        # monotonically over thousands of tokens, as heads' slash patterns do: 64 rotations of
        # low frequency in both Q and K (q_p . k_j = sum_i a_i cos(f_i (p - j))), weighted so
        # the sum approximates LOCAL_LOGITS * exp(-|p - j| / LOCAL_LENGTH). Frequencies are
        # spaced pi / 131072 apart: the sum repeats only after 262144 tokens.
        freqs = (torch.arange(HEAD_DIM // 2, device="cuda") + 0.5) * (math.pi / 131072)
        weights = 1.0 / (1.0 + (freqs * LOCAL_LENGTH) ** 2)  # Lorentzian: exponential decay.
        weights *= LOCAL_LOGITS * math.sqrt(HEAD_DIM) / weights.sum()
        angles = torch.arange(n, device="cuda")[:, None].float() * freqs[None, :]
        local = torch.empty(n, 1, HEAD_DIM, device="cuda")
        local[..., 0::2] = (weights.sqrt() * angles.cos())[:, None, :]
        local[..., 1::2] = (weights.sqrt() * angles.sin())[:, None, :]
        q += local
        k += local
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def median_ms(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def sdpa(backend, q, k, v):
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    with sdpa_kernel([backend]):
        try:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            run = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                         enable_gqa=True)
        except RuntimeError:
            ke, ve = kt.repeat_interleave(GROUP, 1), vt.repeat_interleave(GROUP, 1)
            run = lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True)
            out = run()
    return run, out[0].transpose(0, 1)


def relative_error(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def recall(ours, handle, q, k, n, gen, heads=4, rows=32):
    """Mean dense attention mass on the selected keys, over sampled rows of a few heads."""
    total, count = 0.0, 0
    scale = 1.0 / math.sqrt(HEAD_DIM)
    for h in range(heads):
        picks = torch.randint(0, n, (rows,), device="cuda", generator=gen).tolist()
        for i in picks:
            keys = [j for j in ours.block_keys(handle, h, i // BLOCK) if j <= i]
            scores = (k[: i + 1, h // GROUP].float() @ q[i, h].float()) * scale
            probs = torch.softmax(scores, dim=0)
            total += probs[torch.tensor(keys, device="cuda")].sum().item()
            count += 1
    return total / count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", default="out/device/libsparse_attention_capi.so")
    parser.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--vertical", type=int, default=1000)
    parser.add_argument("--slash", type=int, default=6096)
    # Fresh inputs by default; a seed repeats them, so two builds can be timed on the same ones.
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    ours = Ours(args.lib)
    gen = torch.Generator(device="cuda")
    if args.seed is None:
        gen.seed()
    else:
        gen.manual_seed(args.seed)
    results = []
    for n in [int(c) for c in args.contexts.split(",")]:
        repeats = 10 if n <= 32768 else 5
        for kind in ("random", "structured"):
            q, k, v = make_inputs(n, kind, gen)
            row = {"context": n, "input": kind}
            cudnn_run, reference = sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)
            row["cudnn_ms"] = median_ms(cudnn_run, repeats)
            flash_run, flash_out = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)
            row["flash_ms"] = median_ms(flash_run, repeats)
            del flash_out
            out = torch.empty_like(q)
            row["ours_dense_ms"] = median_ms(lambda: ours.dense(q, k, v, out), repeats)
            row["ours_dense_error"] = relative_error(out, reference)
            nb = (n + BLOCK - 1) // BLOCK
            vs = ours.layer(n, (KIND["vertical_slash"], 0, 0, args.vertical, args.slash, 64, 0))
            patterns = {"vertical_slash": vs}
            row["vertical_slash"] = {"vertical": args.vertical, "slash": args.slash}
            for name in ("vertical_slash", "block_sparse"):
                handle = patterns[name]
                entry = row.setdefault(name, {})
                entry["total_ms"] = median_ms(lambda: ours.sparse(handle, q, k, v, out), repeats)
                entry["index_ms"] = median_ms(
                    lambda: ours.sparse(handle, q, k, v, out, attend=False), repeats)
                entry["attention_ms"] = median_ms(
                    lambda: ours.sparse(handle, q, k, v, out, build=False), repeats)
                ours.sparse(handle, q, k, v, out)
                entry["error"] = relative_error(out, reference)
                cost, density = ours.stats(handle, 2 if n > 32768 else 4)
                entry["tile_cost"] = sum(cost) / len(cost)
                entry["density"] = sum(density) / len(density)
                entry["recall"] = recall(ours, handle, q, k, n, gen)
                entry["speedup_vs_cudnn"] = row["cudnn_ms"] / entry["total_ms"]
                entry["speedup_vs_ours_dense"] = row["ours_dense_ms"] / entry["total_ms"]
                if name == "vertical_slash":
                    # Block-sparse with the same kernel cost: top-k blocks per query block.
                    top_k = max(1, round(entry["tile_cost"] * (nb + 1) / 2))
                    row["block_sparse"] = {"top_k": top_k}
                    patterns["block_sparse"] = ours.layer(
                        n, (KIND["block_sparse"], 0, 0, 0, 0, 0, top_k))
            for handle in patterns.values():
                ours.lib.sa_destroy(handle)
            results.append(row)
            vs_, bs_ = row["vertical_slash"], row["block_sparse"]
            print(f"# {n:>6} {kind:>10}: cudnn {row['cudnn_ms']:.2f} flash {row['flash_ms']:.2f} "
                  f"dense {row['ours_dense_ms']:.2f} | vs {vs_['total_ms']:.2f} "
                  f"(idx {vs_['index_ms']:.2f}) cost {vs_['tile_cost']:.3f} err {vs_['error']:.3f}"
                  f" rec {vs_['recall']:.3f} | bs {bs_['total_ms']:.2f} cost {bs_['tile_cost']:.3f}"
                  f" err {bs_['error']:.3f}", file=sys.stderr, flush=True)
            del q, k, v, out, reference
            torch.cuda.empty_cache()
    # Break-even: from this length on, the sparse path beat our dense kernel at every measured
    # length (structured inputs, vertical-slash budgets as given).
    structured = [r for r in results if r["input"] == "structured"]
    break_even = None
    for r in sorted(structured, key=lambda r: -r["context"]):
        if r["vertical_slash"]["total_ms"] < r["ours_dense_ms"]:
            break_even = r["context"]
        else:
            break
    print(json.dumps({
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bf16",
                  "causal": True},
        "break_even_tokens": break_even,
        "seed": args.seed,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
