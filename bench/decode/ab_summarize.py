"""summary.json of bench/decode/ab.sh: base against candidate per point.

attention.jsonl holds decode_attention_bench reports (a "results" list of batch, context,
median_ms, kv_gb_per_s) and engine.jsonl decode_bench lines (context, batch, itl_ms), each
tagged with "build" (base or candidate) and "round". Per point and build: the rounds' values
and their median; per point: candidate / base of the medians (below 1: the candidate is faster).
Prints one table line per point.
"""

import argparse
import datetime
import json
import statistics
import sys


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(samples, value_key):
    """samples: {(point, build): [values]} -> rows with medians and the ratio."""
    rows = []
    for point in sorted({p for p, _ in samples}):
        row = dict(point)
        for build in ("base", "candidate"):
            values = samples.get((point, build), [])
            row[build + "_" + value_key] = values
            row[build] = statistics.median(values) if values else None
        row["ratio"] = (row["candidate"] / row["base"]
                        if row["base"] and row["candidate"] is not None else None)
        rows.append(row)
    return rows


def attention_rows(records):
    samples = {}
    for report in records:
        for r in report.get("results", []):
            point = (("batch", r["batch"]), ("context", r["context"]))
            samples.setdefault((point, report["build"]), []).append(r["median_ms"])
    return compare(samples, "ms")


def engine_rows(records):
    samples = {}
    for r in records:
        if "itl_ms" not in r:
            continue  # A point the pool did not fit ("skipped").
        point = (("batch", r["batch"]), ("context", r["context"]))
        samples.setdefault((point, r["build"]), []).append(r["itl_ms"])
    return compare(samples, "itl_ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--attention", required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--base_commit", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.device) as f:
        device = f.readline().strip()
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "device": device,
        "base_commit": args.base_commit,
        "decode_attention_ms": attention_rows(read_jsonl(args.attention)),
        "engine_itl_ms": engine_rows(read_jsonl(args.engine)),
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    for name in ("decode_attention_ms", "engine_itl_ms"):
        for row in summary[name]:
            ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
            print(f"{name} batch {row['batch']} context {row['context']}: "
                  f"base {row['base']} candidate {row['candidate']} ratio {ratio}")
    complete = all(row["ratio"] is not None
                   for name in ("decode_attention_ms", "engine_itl_ms") for row in summary[name])
    return 0 if complete and summary["engine_itl_ms"] else 1


if __name__ == "__main__":
    sys.exit(main())
