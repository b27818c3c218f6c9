#!/usr/bin/env python3
"""Merges the engine's decode ITL (decode_bench JSON lines) and the services' (e2e_client decode
phases, one JSON per context) into one summary per (context, batch), next to the memory
bandwidth floor of a decode step (bench/README.md, "Decode ITL: engine and service"):

  bytes per step = weight bytes (bf16, every parameter but the input embedding, which a step
                   reads only the batch's rows of; a tied table counts once, as the LM head)
                 + batch x context x layers x kv_heads x head_dim x 2 (K, V) x 2 bytes
  floor          = bytes per step / HBM bandwidth (the device's spec; the measured copy
                   bandwidth where the device is not known), and / measured copy bandwidth

Targets: service ITL <= 1.05 x engine ITL; engine ITL at batch 1 <= 1.3 x floor.

  summarize.py --engine engine.jsonl --e2e e2e_4096.json e2e_32768.json --e2e_out e2e.json \\
      --config DIR/config.json --device device.txt --contexts 4096,32768 --batches 1,8,32 \\
      --out summary.json
"""

import argparse
import datetime
import importlib.util
import json
import os
import sys

# JSON lines and ratios as bench/e2e/summarize.py reads and forms them.
_E2E = importlib.util.spec_from_file_location(
    "e2e_summarize", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e",
                                  "summarize.py"))
_e2e = importlib.util.module_from_spec(_E2E)
_E2E.loader.exec_module(_e2e)
read_jsonl, ratio = _e2e.read_jsonl, _e2e.ratio

SERVICE_FACTOR = 1.05
FLOOR_FACTOR = 1.3
BF16_BYTES = 2
# HBM bandwidth from the vendors' specs, by a substring of the nvidia-smi name.
SPEC_BYTES_PER_S = [("H200", 4.8e12), ("H100 80GB HBM3", 3.35e12)]


def read_device(path):
    """The nvidia-smi line, and the measured copy bandwidth (bytes read + written per second)."""
    if not path or not os.path.exists(path):
        return None, None
    lines = [line.strip() for line in open(path) if line.strip()]
    copy = None
    for line in lines:
        for field in line.split():
            if field.startswith("copy_bytes_per_s="):
                copy = float(field.split("=", 1)[1])
    return (lines[0] if lines else None), copy


def spec_bandwidth(device):
    for name, bytes_per_s in SPEC_BYTES_PER_S:
        if device and name in device:
            return bytes_per_s
    return None


def shape(config):
    heads = config["num_attention_heads"]
    return {
        "hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
        "layers": config["num_hidden_layers"], "heads": heads,
        "kv_heads": config.get("num_key_value_heads", heads),
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab": config["vocab_size"], "tied": bool(config.get("tie_word_embeddings", False)),
    }


def weight_bytes(s):
    """Bytes of weights one decode step reads: every layer's projections and norms, the final
    norm and the LM head (vocab x hidden, whether or not it shares the embedding table)."""
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * s["intermediate"] + 2 * h
    return BF16_BYTES * (s["layers"] * per_layer + h + s["vocab"] * h)


def kv_bytes(s, batch, context):
    return batch * context * s["layers"] * s["kv_heads"] * s["head_dim"] * 2 * BF16_BYTES


def service_rows(runs):
    """(context, batch) -> the client's decode row, and every failed request, over the runs."""
    rows, failed = {}, []
    for run in runs.values():
        for batch, row in (run.get("decode") or {}).items():
            rows[(run["decode_length"], int(batch))] = row
        failed += [r for r in run.get("requests", []) if not r.get("ok")]
    return rows, failed


def service_fields(row, note):
    """The client's window statistics of one case (None where it did not run or reported an
    error, with the reason in service_note)."""
    ms = lambda key: 1e3 * row[key] if row.get(key) is not None else None
    return {
        "service_itl_ms": ms("itl_median_s"), "service_itl_mean_ms": ms("itl_mean_s"),
        "service_itl_p90_ms": ms("itl_p90_s"), "service_tokens_per_s": row.get("tokens_per_s"),
        "service_window_s": row.get("window_s"), "service_gaps": row.get("gaps"),
        "service_steps_in_window": row.get("steps_in_window"),
        "service_max_tokens": row.get("max_tokens"),
        "service_note": row.get("error") or note or (None if row else "not run"),
    }


def case(s, context, batch, engine, service, note, bandwidth, copy):
    """One (context, batch): both ITLs, the floor, the ratios and pass/fail."""
    row = {"context": context, "batch": batch,
           "engine_itl_ms": engine.get("itl_ms"), "engine_p90_ms": engine.get("p90_ms"),
           "engine_tokens_per_s": engine.get("tokens_per_s"),
           "engine_note": engine.get("skipped") or (None if engine else "no decode_bench row")}
    row.update(service_fields(service or {}, note))
    weights, kv = weight_bytes(s), kv_bytes(s, batch, context)
    floor = 1e3 * (weights + kv) / bandwidth if bandwidth else None
    floor_copy = 1e3 * (weights + kv) / copy if copy else None
    e, v = row["engine_itl_ms"], row["service_itl_ms"]
    row.update({
        "ratio_service_to_engine": ratio(v, e),
        "weight_bytes": weights, "kv_bytes": kv, "bytes_per_step": weights + kv,
        "floor_ms": floor, "floor_ms_measured_copy": floor_copy,
        "ratio_engine_to_floor": ratio(e, floor), "ratio_service_to_floor": ratio(v, floor),
        "ratio_engine_to_measured_floor": ratio(e, floor_copy),
        "ratio_service_to_measured_floor": ratio(v, floor_copy),
    })
    row["pass"] = {
        "service_vs_engine": None if None in (e, v) else v <= SERVICE_FACTOR * e,
        "engine_vs_floor": None if batch != 1 or None in (e, floor) else e <= FLOOR_FACTOR * floor,
    }
    return row


def print_table(cases):
    fmt = lambda v, f="%.2f": "-" if v is None else f % v
    print("context | batch | engine ITL ms | service ITL ms (x) | floor ms | engine/floor | "
          "tok/s engine/service | notes")
    for r in cases:
        notes = "; ".join(n for n in (r["engine_note"], r["service_note"]) if n)
        print("%7d | %5d | %s | %s (%s) | %s | %s | %s/%s | %s" % (
            r["context"], r["batch"], fmt(r["engine_itl_ms"]), fmt(r["service_itl_ms"]),
            fmt(r["ratio_service_to_engine"]), fmt(r["floor_ms"]),
            fmt(r["ratio_engine_to_floor"]), fmt(r["engine_tokens_per_s"], "%.0f"),
            fmt(r["service_tokens_per_s"], "%.0f"), notes))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", required=True, help="decode_bench JSON lines")
    parser.add_argument("--e2e", nargs="*", default=[], help="e2e_client JSON, one per context")
    parser.add_argument("--e2e_out", help="where the e2e_client runs are written merged")
    parser.add_argument("--config", required=True, help="the checkpoint's config.json")
    parser.add_argument("--device", help="device.txt (nvidia-smi line, copy_bytes_per_s=)")
    parser.add_argument("--contexts", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--kv_blocks", type=int)
    parser.add_argument("--kv_block_tokens", type=int)
    parser.add_argument("--skipped", action="append", default=[],
                        help="CONTEXT,BATCH,why: a service case that was not run")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def main():
    args = parse_args()
    runs = {}
    for path in args.e2e:
        run = json.load(open(path))
        runs[str(run.get("decode_length"))] = run
    if args.e2e_out:
        with open(args.e2e_out, "w") as f:
            json.dump({"runs": runs}, f, indent=1)
    s = shape(json.load(open(args.config)))
    device, copy = read_device(args.device)
    spec = spec_bandwidth(device)
    engine = {(r["context"], r["batch"]): r for r in read_jsonl(args.engine)}
    service, failed = service_rows(runs)
    notes = {(int(c), int(b)): why for c, b, why in (n.split(",", 2) for n in args.skipped)}
    cases = [case(s, c, b, engine.get((c, b), {}), service.get((c, b)), notes.get((c, b)),
                  spec or copy, copy)
             for c in map(int, args.contexts.split(",")) for b in map(int, args.batches.split(","))]
    passes = [v for r in cases for v in r["pass"].values() if v is not None]
    summary = {
        "date": datetime.date.today().isoformat(), "device": device,
        "spec_bytes_per_s": spec, "measured_copy_bytes_per_s": copy,
        "floor_bandwidth": "spec" if spec else ("measured copy" if copy else None),
        "model": dict(s, weight_bytes_per_step=weight_bytes(s)),
        "setup": {"kv_blocks": args.kv_blocks, "kv_block_tokens": args.kv_block_tokens,
                  "one_gpu_both_services": True},
        "targets": {"service_vs_engine": SERVICE_FACTOR, "engine_batch1_vs_floor": FLOOR_FACTOR},
        "cases": cases, "failed_requests": failed,
        "all_pass": bool(passes) and all(passes) and not failed,
        "engine": list(engine.values()),
        "service": {c: run.get("decode") for c, run in runs.items()},
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print_table(cases)
    if failed:
        print("failed requests: %d" % len(failed))
    print("all_pass", summary["all_pass"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
