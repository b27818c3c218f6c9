#!/usr/bin/python3
"""The Node gRPC client example (clients/node, @grpc/grpc-js) against both services on the CPU.

Starts a prefill and a decode service on a tiny random checkpoint, streams a greedy request
through clients/node/generate.js and through clients/python/generate.py, and fails unless both
print the same token ids (max_tokens of them) and a finish line, and unless a bad request
(max_tokens 0) makes the Node client exit 1 with INVALID_ARGUMENT. Needs node and
clients/node/node_modules (scripts/test.sh installs them).
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, free_port, report, stop, wait_ready  # pylint: disable=wrong-import-position
MAX_TOKENS = 12


def token_ids(output):
    return [int(t) for t in re.findall(r"^([\d ]+)\n", output, re.M)[0].split()]


def main():
    work = os.environ.get("TEST_TMPDIR") or tempfile.mkdtemp(prefix="node_client_test_")
    model = os.path.join(work, "tiny")
    subprocess.run([os.path.join(ROOT, "model", "tools", "make_checkpoint"), "--out", model, "--preset",
                    "tiny", "--seed", "5"], check=True, stderr=subprocess.DEVNULL)
    prefill_port, decode_port = free_port(), free_port()
    prefill_log, decode_log = os.path.join(work, "prefill.log"), os.path.join(work, "decode.log")
    services = [
        subprocess.Popen([os.path.join(ROOT, "prefill_service", "prefill_server"), "--model_dir",
                          model, "--listen", "127.0.0.1:%d" % prefill_port, "--metrics_port", "0"],
                         stderr=open(prefill_log, "w")),
        subprocess.Popen([os.path.join(ROOT, "decode_service", "decode_server"), "--model_dir",
                          model, "--listen", "127.0.0.1:%d" % decode_port, "--metrics_port", "0",
                          "--prefill_addresses", "127.0.0.1:%d" % prefill_port],
                         stderr=open(decode_log, "w")),
    ]
    failures = []
    try:
        if not (wait_ready(prefill_log, "prefill.ready") and wait_ready(decode_log, "decode.ready")):
            raise SystemExit("services did not start")
        server = "127.0.0.1:%d" % decode_port
        node_script = os.path.realpath(os.path.join(ROOT, "clients", "node", "generate.js"))
        request = ["--server", server, "--prompt_ids", "3,14,15,92,65", "--max_tokens",
                   str(MAX_TOKENS)]
        node = subprocess.run(["node", node_script] + request, capture_output=True, text=True,
                              timeout=60)
        python = subprocess.run(
            [sys.executable, os.path.join(ROOT, "clients", "python", "generate.py")] + request,
            capture_output=True, text=True, timeout=60)
        print("node:\n" + node.stdout + node.stderr)
        print("python:\n" + python.stdout + python.stderr)
        if node.returncode != 0 or python.returncode != 0:
            failures.append("exit codes node %d python %d" % (node.returncode, python.returncode))
        else:
            node_ids, python_ids = token_ids(node.stdout), token_ids(python.stdout)
            if len(node_ids) != MAX_TOKENS or node_ids != python_ids:
                failures.append("node %s, python %s" % (node_ids, python_ids))
            if "node client: finish=FINISH_REASON_LENGTH completion_tokens=%d" % MAX_TOKENS \
                    not in node.stdout:
                failures.append("no finish line from the node client")
        bad = subprocess.run(["node", node_script, "--server", server, "--prompt_ids", "1",
                              "--max_tokens", "0"], capture_output=True, text=True, timeout=60)
        if bad.returncode != 1 or "INVALID_ARGUMENT" not in bad.stderr:
            failures.append("bad request: exit %d, stderr %r" % (bad.returncode, bad.stderr))
    finally:
        stop(services)
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
