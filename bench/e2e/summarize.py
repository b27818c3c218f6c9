#!/usr/bin/env python3
"""Merges the in-process TTFT (ttft_bench JSON lines) and the service numbers (e2e_client JSON)
into one summary with the ratios and a pass/fail per target (bench/e2e/README.md):

  service TTFT          <= 1.1 x in-process TTFT                      (per length)
  second token          <= 1.1 x in-process TTFT + one ITL            (per length)
  KV transfer           >= 5 GB/s                                     (per length)
  concurrent wall time  <= 1.2 x (N x in-process TTFT at that length)

  summarize.py --ttft ttft.jsonl --e2e e2e.json --device device.txt --out summary.json
"""

import argparse
import datetime
import json
import os
import sys

TTFT_FACTOR = 1.1
KV_GBPS_MIN = 5.0
CONCURRENT_FACTOR = 1.2


def read_jsonl(path):
    rows = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def ratio(a, b):
    return a / b if a is not None and b else None


def per_length(tokens, inprocess, service):
    """The comparison of one length: in-process row, service medians, ratios, pass/fail."""
    ttft = inprocess.get("ttft_s") if inprocess else None
    s_ttft = service.get("ttft_s")
    second = service.get("second_token_s")
    itl = service.get("itl_after_second_s") or service.get("mean_inter_token_latency_seconds")
    kv = service.get("kv_gbps")
    row = {
        "tokens": tokens,
        "inprocess_ttft_s": ttft,
        "inprocess_path": inprocess.get("path") if inprocess else None,
        "inprocess_peak_device_used_gib": inprocess.get("peak_device_used_gib") if inprocess
        else None,
        "service_ttft_s": s_ttft,
        "service_server_ttft_s": service.get("time_to_first_token_seconds"),
        "service_prefill_seconds": service.get("prefill_seconds"),
        "second_token_s": second,
        "itl_s": itl,
        "kv_transfer_bytes": service.get("kv_transfer_bytes"),
        "kv_transfer_seconds": service.get("kv_transfer_seconds"),
        "kv_gbps": kv,
        "ratio_service_ttft_to_inprocess": ratio(s_ttft, ttft),
        "ratio_server_ttft_to_inprocess": ratio(service.get("time_to_first_token_seconds"), ttft),
        "ratio_prefill_to_inprocess": ratio(service.get("prefill_seconds"), ttft),
        "ratio_second_token_to_inprocess_plus_itl":
            ratio(second, ttft + itl) if ttft is not None and itl is not None else None,
        "requests_ok": service.get("ok"),
        "requests": service.get("requests"),
    }
    row["pass"] = {
        "ttft": s_ttft is not None and ttft is not None and s_ttft <= TTFT_FACTOR * ttft,
        "second_token": None not in (second, ttft, itl) and second <= TTFT_FACTOR * ttft + itl,
        "kv_gbps": kv is not None and kv >= KV_GBPS_MIN,
    }
    return row


def concurrent_summary(concurrent, inprocess_by_tokens):
    if not concurrent:
        return None
    n, tokens, wall = concurrent["n"], concurrent["prompt_tokens"], concurrent.get("wall_s")
    single = (inprocess_by_tokens.get(tokens) or {}).get("ttft_s")
    back_to_back = n * single if single is not None else None
    median = concurrent.get("median") or {}
    all_ok = median.get("ok") == n
    r = ratio(wall, back_to_back)
    return {
        "n": n, "prompt_tokens": tokens, "wall_s": wall,
        "inprocess_ttft_s": single, "inprocess_back_to_back_s": back_to_back,
        "ratio_wall_to_back_to_back": r,
        "ratio_max_ttft_to_back_to_back": ratio(concurrent.get("max_ttft_s"), back_to_back),
        "max_ttft_s": concurrent.get("max_ttft_s"),
        "median_ttft_s": median.get("ttft_s"),
        "median_kv_gbps": median.get("kv_gbps"),
        "requests_ok": median.get("ok"),
        "pass": all_ok and r is not None and r <= CONCURRENT_FACTOR,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttft", required=True, help="ttft_bench JSON lines")
    parser.add_argument("--e2e", required=True, help="e2e_client JSON")
    parser.add_argument("--device", help="device.txt (nvidia-smi line)")
    parser.add_argument("--kv_blocks", type=int)
    parser.add_argument("--kv_block_tokens", type=int)
    parser.add_argument("--dense_below", type=int, default=24576)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    inprocess = {r["tokens"]: r for r in read_jsonl(args.ttft) if "ttft_s" in r}
    e2e = json.load(open(args.e2e)) if os.path.exists(args.e2e) else {}
    device = open(args.device).read().strip() if args.device and os.path.exists(args.device) \
        else None
    lengths = [per_length(int(k), inprocess.get(int(k)), v)
               for k, v in (e2e.get("lengths") or {}).items()]
    concurrent = concurrent_summary(e2e.get("concurrent"), inprocess)
    failed = [r for r in e2e.get("requests", []) if not r.get("ok")]
    passes = [v for row in lengths for v in row["pass"].values()]
    if concurrent:
        passes.append(concurrent["pass"])
    summary = {
        "date": e2e.get("date") or datetime.date.today().isoformat(),
        "device": device,
        "label": e2e.get("label"),
        "setup": {"sparse_config": "a_shape sink 128 window 4096, dense below %d tokens"
                  % args.dense_below,
                  "max_tokens": e2e.get("max_tokens"), "reps": e2e.get("reps"),
                  "warmup": e2e.get("warmup"), "kv_blocks": args.kv_blocks,
                  "kv_block_tokens": args.kv_block_tokens, "one_gpu_both_services": True},
        "targets": {"ttft_factor": TTFT_FACTOR, "kv_gbps_min": KV_GBPS_MIN,
                    "concurrent_factor": CONCURRENT_FACTOR},
        "lengths": lengths,
        "concurrent": concurrent,
        "failed_requests": failed,
        "all_pass": bool(passes) and all(passes) and not failed,
        "inprocess": list(inprocess.values()),
        "service": e2e,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print("tokens | in-process TTFT s | service TTFT s (x) | 2nd token s (x) | ITL ms | "
          "KV GB/s | pass ttft/2nd/kv")
    for r in lengths:
        fmt = lambda v, f="%.4f": "-" if v is None else f % v
        print("%6d | %s | %s (%s) | %s (%s) | %s | %s | %s/%s/%s" % (
            r["tokens"], fmt(r["inprocess_ttft_s"]), fmt(r["service_ttft_s"]),
            fmt(r["ratio_service_ttft_to_inprocess"], "%.2f"), fmt(r["second_token_s"]),
            fmt(r["ratio_second_token_to_inprocess_plus_itl"], "%.2f"),
            fmt(r["itl_s"] and 1e3 * r["itl_s"], "%.2f"), fmt(r["kv_gbps"], "%.2f"),
            r["pass"]["ttft"], r["pass"]["second_token"], r["pass"]["kv_gbps"]))
    if concurrent:
        print("concurrent %d x %d: wall %s s, %s x back-to-back in-process, pass %s" % (
            concurrent["n"], concurrent["prompt_tokens"], concurrent["wall_s"],
            concurrent["ratio_wall_to_back_to_back"], concurrent["pass"]))
    if failed:
        print("failed requests: %d" % len(failed))
    print("all_pass", summary["all_pass"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
