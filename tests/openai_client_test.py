#!/usr/bin/python3
"""The decode service's OpenAI-compatible HTTP API against the official openai npm client.

Starts a prefill and a decode service (with --openai_port) on the tiny random checkpoint with
the Llama 3.1 tokenizer (tools/npm's reference package, as scripts/demo.sh does), then:
- runs tests/openai/openai_client.js: completions and chat, whole and streamed, stop strings,
  seeds, usage, the model list, bad requests raising the client's error classes with their
  HTTP status, and a stream the client leaves after two chunks;
- fails unless its greedy completion is the text clients/python/generate.py (the gRPC API)
  streams for the same prompt;
- fails unless the abandoned stream was cancelled (its Generate call ended CANCELLED, and the
  batch and the KV pool are empty again);
- raw HTTP: /health and /v1/models answer, malformed JSON is 400 with OpenAI's error JSON, an
  unknown URL is 404 with it, and with the prefill service stopped a completion is 503;
- SIGTERM while a stream runs: the stream still ends with its last token, usage and [DONE].
Needs node, tests/openai/node_modules and tools/npm/node_modules (scripts/test.sh installs them).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, free_port, log_has, report, stop, wait_for  # pylint: disable=wrong-import-position
PROMPT = "The capital of France is"
MAX_TOKENS = 12


def tokenizer_files(work):
    """The Llama 3.1 tokenizer as tools/npm/export_tokenizer.sh writes it."""
    npm = os.path.dirname(os.path.realpath(os.path.join(ROOT, "tools", "npm", "package.json")))
    models = os.path.join(npm, "node_modules", "@lenml", "tokenizer-llama3_1", "models")
    if not os.path.isdir(models):
        raise SystemExit("no %s: run scripts/test.sh (or npm ci in tools/npm)" % models)
    out = os.path.join(work, "tokenizer")
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(models, "tokenizer.json"), out)
    with open(os.path.join(models, "tokenizer_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(ROOT, "tools", "npm", "llama3_1_chat_template.jinja")) as f:
        config["chat_template"] = f.read()
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return os.path.join(out, "tokenizer.json")


def http(method, url, body=None):
    """(status, parsed JSON body) of a plain HTTP request."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def is_openai_error(body):
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and error["message"] != "")


def metric(metrics_port, line_prefix):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port, timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return None


def raw_http_checks(base, failures):
    status, body = http("GET", base + "/health")
    if status != 200:
        failures.append("/health: %d %r" % (status, body))
    status, body = http("GET", base + "/v1/models")
    if status != 200 or [m["id"] for m in body.get("data", [])] != ["tiny"]:
        failures.append("/v1/models: %d %r" % (status, body))
    for route in ("/v1/completions", "/v1/chat/completions"):
        status, body = http("POST", base + route, b'{"model": "tiny", "prompt": ')
        if status != 400 or not is_openai_error(body) or body["error"]["type"] != \
                "invalid_request_error":
            failures.append("malformed JSON to %s: %d %r" % (route, status, body))
    status, body = http("POST", base + "/v1/no-such-route", b"{}")
    if status != 404 or not is_openai_error(body):
        failures.append("unknown URL: %d %r" % (status, body))


def grpc_text(server):
    """The text the gRPC Python client streams for PROMPT (greedy)."""
    python = subprocess.run(
        [sys.executable, os.path.join(ROOT, "clients", "python", "generate.py"), "--server", server,
         "--prompt", PROMPT, "--max_tokens", str(MAX_TOKENS)],
        capture_output=True, text=True, timeout=60)
    if python.returncode != 0 or "\npython client: " not in python.stdout:
        raise SystemExit("gRPC client failed: %s %s" % (python.stdout, python.stderr))
    return python.stdout.rsplit("\npython client: ", 1)[0]


def start_prefill(model, port, log):
    return subprocess.Popen(
        [os.path.join(ROOT, "prefill_service", "prefill_server"), "--model_dir", model, "--listen",
         "127.0.0.1:%d" % port, "--metrics_port", "0"], stderr=open(log, "w"))


def drain_check(base, decode, failures):
    """SIGTERM during a stream: the HTTP request drains before the gRPC server stops."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        first = response.readline()
        decode.send_signal(signal.SIGTERM)
        rest = response.read().decode()
    lines = (first.decode() + rest).splitlines()
    events = [line[6:] for line in lines if line.startswith("data: ")]
    usage = json.loads(events[-2]).get("usage") if len(events) >= 2 else None
    if events[-1:] != ["[DONE]"] or not usage or usage["completion_tokens"] != 64:
        failures.append("stream during SIGTERM: %r" % events[-3:])
    if decode.wait(timeout=40) != 0:
        failures.append("the decode service exited %d after SIGTERM" % decode.returncode)


def main():
    work = os.environ.get("TEST_TMPDIR") or tempfile.mkdtemp(prefix="openai_client_test_")
    model = os.path.join(work, "tiny")
    subprocess.run([os.path.join(ROOT, "model", "tools", "make_checkpoint"), "--out", model, "--preset",
                    "tiny", "--seed", "5", "--tokenizer_json", tokenizer_files(work)],
                   check=True, stderr=subprocess.DEVNULL)
    prefill_port, decode_port, metrics_port, openai_port = (free_port() for _ in range(4))
    prefill_log, decode_log = os.path.join(work, "prefill.log"), os.path.join(work, "decode.log")
    prefill = start_prefill(model, prefill_port, prefill_log)
    decode = subprocess.Popen(
        [os.path.join(ROOT, "decode_service", "decode_server"), "--model_dir", model, "--listen",
         "127.0.0.1:%d" % decode_port, "--metrics_port", str(metrics_port), "--prefill_addresses",
         "127.0.0.1:%d" % prefill_port, "--openai_port", str(openai_port)],
        stderr=open(decode_log, "w"))
    base = "http://127.0.0.1:%d" % openai_port
    failures = []
    try:
        if not (wait_for(lambda: log_has(prefill_log, "prefill.ready"), 60) and
                wait_for(lambda: log_has(decode_log, "decode.ready"), 60)):
            raise SystemExit("services did not start")
        raw_http_checks(base, failures)
        script = os.path.realpath(os.path.join(ROOT, "tests", "openai", "openai_client.js"))
        node = subprocess.run(["node", script, "--base_url", base + "/v1", "--model", "tiny",
                               "--prompt", PROMPT, "--max_tokens", str(MAX_TOKENS)],
                              capture_output=True, text=True, timeout=120)
        print("openai client:\n" + node.stdout + node.stderr)
        if node.returncode != 0:
            failures.append("the openai client's checks failed (exit %d)" % node.returncode)
        result = json.loads(node.stdout.strip().splitlines()[-1]) if node.stdout.strip() else {}
        expected = grpc_text("127.0.0.1:%d" % decode_port)
        if result.get("completion") != expected or not expected:
            failures.append("OpenAI completion %r != gRPC client's text %r" %
                            (result.get("completion"), expected))
        abandoned = result.get("abandoned_id")
        if not abandoned or not wait_for(lambda: re.search(
                r"generate\.done request_id=%s status=\"CANCELLED" % re.escape(abandoned),
                open(decode_log).read()), 10):
            failures.append("the abandoned stream %s was not cancelled" % abandoned)
        if not wait_for(lambda: metric(metrics_port, "sparseaccel_decode_running_sequences") == 0
                        and metric(metrics_port, 'sparseaccel_kv_pool_blocks{state="used"}') == 0,
                        10):
            failures.append("the batch or the KV pool is not empty after the requests")
        prefill.terminate()
        prefill.wait(timeout=40)
        status, body = http("POST", base + "/v1/completions",
                            json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode())
        if status != 503 or not is_openai_error(body) or body["error"]["code"] != \
                "service_unavailable":
            failures.append("prefill down: %d %r" % (status, body))
        prefill = start_prefill(model, prefill_port, prefill_log)
        if not wait_for(lambda: http("POST", base + "/v1/completions", json.dumps(
                {"prompt": PROMPT, "max_tokens": 1}).encode())[0] == 200, 30):
            raise SystemExit("the decode service did not reach the restarted prefill service")
        drain_check(base, decode, failures)
    finally:
        stop((prefill, decode))
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
