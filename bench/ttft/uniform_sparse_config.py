#!/usr/bin/env python3
"""Writes a sparse attention config (docs/sparse_attention.md) giving every head of a model the
same pattern, for timing the sparse prefill at a fixed budget. A searched config
(pattern_search) is what serves a real model: random-weight checkpoints have no structure for
a search to find.

  uniform_sparse_config.py --model DIR --pattern vertical_slash --vertical 1000 --slash 6096 \\
      --dense_below_tokens 24576 > vs.json
"""

import argparse
import json
import os
import sys


def head(args):
    if args.pattern == "vertical_slash":
        return {"pattern": "vertical_slash", "vertical": args.vertical, "slash": args.slash,
                "last_q": args.last_q}
    if args.pattern == "block_sparse":
        return {"pattern": "block_sparse", "top_k": args.top_k}
    if args.pattern == "a_shape":
        return {"pattern": "a_shape", "sink": args.sink, "window": args.window}
    return {"pattern": "dense"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json)")
    parser.add_argument("--pattern", required=True,
                        choices=["dense", "a_shape", "vertical_slash", "block_sparse"])
    parser.add_argument("--vertical", type=int, default=1000)
    parser.add_argument("--slash", type=int, default=6096)
    parser.add_argument("--last_q", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=100)
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--dense_below_tokens", type=int, required=True)
    args = parser.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        model = json.load(f)
    layers, heads = model["num_hidden_layers"], model["num_attention_heads"]
    config = {
        "version": 1,
        "model": {"num_layers": layers, "num_heads": heads},
        "dense_below_tokens": args.dense_below_tokens,
        "target_density": 1.0,
        "layers": [[head(args) for _ in range(heads)] for _ in range(layers)],
    }
    json.dump(config, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
