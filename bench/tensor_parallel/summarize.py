#!/usr/bin/env python3
"""Summarises bench/tensor_parallel/tensor_parallel.sh: per --gpus value, the in-process TTFT
(ttft_bench JSON lines, dense and A-shape) and the service TTFT (e2e_client JSON), with the
ratio of each value's TTFT to the first value's and the targets of a two-GPU run:

  TTFT with --gpus 2 <= 0.6 x --gpus 1 at 128K        (dense and sparse, in process)
  peak device memory per GPU <= 12 GiB at 128K       (--gpus 2, sparse)

  summarize.py --ttft ttft.jsonl --e2e_dir DIR --gpus 1,2 --device device.txt --out summary.json
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "e2e"))
from summarize import ratio, read_jsonl  # noqa: E402

SPEEDUP_TARGET = 0.6
PEAK_GIB_TARGET = 12.0
LONG = 131072


def service_ttft(e2e_dir, gpus):
    path = os.path.join(e2e_dir, "e2e_gpus%d.json" % gpus)
    if not os.path.exists(path):
        return {}
    lengths = json.load(open(path)).get("lengths") or {}
    # The services take 131040 tokens where ttft_bench takes 131072: one row per context.
    return {(LONG if int(k) == 131040 else int(k)): v.get("ttft_s") for k, v in lengths.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ttft", required=True)
    p.add_argument("--e2e_dir", required=True)
    p.add_argument("--gpus", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    gpus_values = [int(g) for g in args.gpus.split(",")]
    inprocess = {(r["gpus"], r["attention"], r["tokens"]): r for r in read_jsonl(args.ttft)
                 if "ttft_s" in r}
    services = {g: service_ttft(args.e2e_dir, g) for g in gpus_values}
    base = gpus_values[0]
    rows = []
    for (gpus, attention, tokens), r in sorted(inprocess.items()):
        first = inprocess.get((base, attention, tokens), {})
        row = {
            "gpus": gpus, "attention": attention, "path": r["path"], "tokens": tokens,
            "ttft_s": r["ttft_s"], "peak_device_used_gib": r["peak_device_used_gib"],
            "weights_gib": r["weights_gib"],
            "ratio_to_gpus%d" % base: ratio(r["ttft_s"], first.get("ttft_s")),
            "service_ttft_s": services.get(gpus, {}).get(tokens) if attention == "a_shape"
            else None,
        }
        if base == 1 and gpus == 2 and tokens == LONG:
            row["pass"] = {"speedup": row["ratio_to_gpus1"] is not None and
                           row["ratio_to_gpus1"] <= SPEEDUP_TARGET}
            if attention == "a_shape":
                row["pass"]["peak_memory"] = r["peak_device_used_gib"] <= PEAK_GIB_TARGET
        rows.append(row)
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": open(args.device).read().strip(),
        "gpus_compared": gpus_values,
        "targets": {"ttft_gpus2_vs_gpus1_at_128k": SPEEDUP_TARGET,
                    "peak_gib_per_gpu_at_128k": PEAK_GIB_TARGET},
        "rows": rows,
    }
    json.dump(summary, open(args.out, "w"), indent=1)
    print("%-5s %-8s %-7s %8s %9s %9s %10s %9s" % ("gpus", "attn", "path", "tokens", "ttft_s",
                                                   "service", "ratio", "peak_gib"))
    for row in rows:
        print("%-5d %-8s %-7s %8d %9.3f %9s %10s %9.2f" % (
            row["gpus"], row["attention"], row["path"], row["tokens"], row["ttft_s"],
            "%.3f" % row["service_ttft_s"] if row["service_ttft_s"] else "-",
            "%.3f" % row["ratio_to_gpus%d" % base] if row["ratio_to_gpus%d" % base] else "-",
            row["peak_device_used_gib"]))
    failed = [r for r in rows if "pass" in r and not all(r["pass"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
