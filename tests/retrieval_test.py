#!/usr/bin/python3
"""Passkey retrieval through both services on the CPU: the searched config keeps it, A-shape loses it.

Runs pattern_search on two passkey prompts (2K and 4K tokens, target density 0.15), then
bench/retrieval/eval.py on 8 held-out prompts of 4K tokens with dense attention, the searched
config and a small A-shape window. Fails unless dense finds the keys, the searched config keeps
at least 95% of dense's exact matches at a mean density of at most the target, and A-shape,
which cannot see a needle outside its window, loses at least three of them
(bench/retrieval/README.md). The target is 0.15, not the 0.1 the GPU run holds at 16K: at 4K
the diagonal band of 64-token blocks alone is a sixteenth of the causal tiles, and the
vertical-slash heads that keep the needle measure 0.10-0.12 there, so a 0.1 search on 4K
prompts has only A-shape and block-sparse left and loses the keys (5 of 8).
"""
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT  # pylint: disable=wrong-import-position
MODEL = os.path.join(ROOT, "bench", "retrieval", "passkey_model")
RETRIEVAL = os.path.join(ROOT, "bench", "retrieval")
TARGET = 0.15


def run(command, **kwargs):
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def main():
    work = os.environ.get("TEST_TMPDIR") or tempfile.mkdtemp(prefix="retrieval_test_")
    bin_dir = os.path.join(work, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for folder, name in (("prefill_service", "prefill_server"), ("decode_service", "decode_server")):
        link = os.path.join(bin_dir, name)
        if not os.path.exists(link):
            os.symlink(os.path.join(ROOT, folder, name), link)
    calibration = os.path.join(work, "calibration.txt")
    with open(calibration, "w") as f:
        for tokens in (2048, 4096):
            run([sys.executable, os.path.join(RETRIEVAL, "passkey.py"), "--tokens", str(tokens),
                 "--count", "1", "--seed", "100"], stdout=f)
    searched = os.path.join(work, "searched.json")
    run([os.path.join(ROOT, "model", "tools", "pattern_search"), "--model", MODEL, "--prompt_file",
         calibration, "--out", searched, "--target_density", str(TARGET), "--dense_below", "0"],
        stderr=subprocess.DEVNULL)
    results = os.path.join(work, "results.json")
    run([sys.executable, os.path.join(RETRIEVAL, "eval.py"), "--bin_dir", bin_dir, "--model", MODEL,
         "--configs", "dense=none", "--configs", "searched=" + searched,
         "--configs", "ashape=a_shape:sink=64,window=256", "--lengths", "4096", "--prompts", "8",
         "--work_dir", os.path.join(work, "eval"), "--rpc_timeout_s", "300", "--out", results])
    with open(results) as f:
        by_config = {r["config"]: r for r in json.load(f)["results"]}
    dense, searched, ashape = (by_config[n] for n in ("dense", "searched", "ashape"))
    failures = []
    if dense["correct"] < 7:
        failures.append("dense found %d of 8 keys" % dense["correct"])
    if searched["correct"] < math.ceil(0.95 * dense["correct"]):
        failures.append("searched config found %d keys, dense %d" % (searched["correct"],
                                                                      dense["correct"]))
    if searched["density_mean"] is None or searched["density_mean"] > TARGET:
        failures.append("searched config density %s (target %s)" % (searched["density_mean"],
                                                                    TARGET))
    if ashape["correct"] > dense["correct"] - 3:
        failures.append("A-shape (window 256) found %d keys, dense %d: the test cannot tell a "
                        "pattern that drops the needle" % (ashape["correct"], dense["correct"]))
    print("retrieval at 4096 tokens: dense %d/8, searched %d/8 (density %.3f), A-shape %d/8" % (
        dense["correct"], searched["correct"], searched["density_mean"] or -1, ashape["correct"]))
    for failure in failures:
        print("FAIL: " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
