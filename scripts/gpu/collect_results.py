#!/usr/bin/env python3
"""Merges what scripts/gpu/engine.sh wrote into <out>/gpu_engine.json and prints a table."""
import datetime
import json
import os
import sys


def jsonl(path):
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def main():
    out = sys.argv[1]
    device = open(os.path.join(out, "device.txt")).read().strip()
    result = {"date": datetime.date.today().isoformat(), "device": device}
    for name in ("hf_parity_small", "hf_parity_8b"):
        path = os.path.join(out, name + ".json")
        if os.path.exists(path):
            result[name] = json.load(open(path))
    ours = {r["tokens"]: r for r in jsonl(os.path.join(out, "ttft_ours.jsonl"))}
    hf = {r["tokens"]: r for r in jsonl(os.path.join(out, "ttft_hf.jsonl"))}
    sparse = {}
    for r in jsonl(os.path.join(out, "ttft_sparse.jsonl")):
        sparse.setdefault(r["tokens"], {})[r["attention"]] = r
    result["ttft"] = [{"tokens": n, "ours": ours.get(n), "hf_sdpa": hf.get(n),
                       "ours_sparse": sparse.get(n, {})}
                      for n in sorted(set(ours) | set(hf) | set(sparse))]
    result["decode"] = jsonl(os.path.join(out, "decode.jsonl"))
    with open(os.path.join(out, "gpu_engine.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("device:", device)
    for m in result.get("hf_parity_small", {}).get("models", []) + \
            result.get("hf_parity_8b", {}).get("models", [])[1:]:
        print("parity %-20s ours~fp32 %.2e (bound %.2e)  hf_bf16~fp32 %.2e  greedy==fp32 %s"
              "  pass %s" % (m["model"], m["ours_vs_hf_fp32"]["norm_rel"], m["bound_norm_rel"],
                             m["hf_bf16_vs_hf_fp32"]["norm_rel"], m["greedy_equal_hf_fp32"],
                             m["pass"]))
    print("tokens | ours TTFT s | ours peak GiB | HF TTFT s | HF peak GiB | sparse: TTFT s "
          "(path, peak GiB)")
    for row in result["ttft"]:
        o, h = row["ours"] or {}, row["hf_sdpa"] or {}
        sparse_cells = ["%s %s (%s, %s)" % (label, r.get("ttft_s", r.get("error")), r.get("path"),
                                            r.get("peak_allocated_gib"))
                        for label, r in sorted(row["ours_sparse"].items())]
        print("%6d | %s | %s | %s | %s | %s" % (row["tokens"], o.get("ttft_s", o.get("error")),
                                                o.get("peak_allocated_gib"),
                                                h.get("ttft_s", h.get("error")),
                                                h.get("peak_allocated_gib"),
                                                "; ".join(sparse_cells)))
    for row in result["decode"]:
        print("decode ctx %6d batch %3d: %s" % (row["context"], row["batch"],
                                                row.get("itl_ms", row.get("skipped"))))


if __name__ == "__main__":
    main()
