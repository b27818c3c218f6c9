#!/usr/bin/python3
"""A bounded soak of both services on loopback, under faults (CPU, a tiny random model).

For SOAK_SECONDS (default 60) CLIENTS threads send Generate calls: valid ones (random prompts
and lengths, greedy or seeded, some cancelled after a few tokens, some with short deadlines)
and invalid ones (a token id outside the vocabulary, max_tokens 0, too many stop strings, no
prompt). The prefill service is killed (SIGKILL) and restarted twice on its port meanwhile.
At the end:
  * every call ended with a status allowed for its kind: invalid calls INVALID_ARGUMENT, valid
    ones OK, or CANCELLED / DEADLINE_EXCEEDED where the client asked for it, or UNAVAILABLE
    while the prefill service was down; no call outlived its deadline by more than 5 s;
  * calls made after the last restart succeed again, both services answer grpc.health.v1;
  * sparseaccel_kv_pool_blocks{state="used"} is 0 (nothing stranded);
  * the decode service's resident memory grew by less than RSS_BOUND_MIB (64) from the end of
    the warm-up to the end.
Prints the figures. Exits non-zero on any failure.
"""
import collections
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, free_port  # pylint: disable=wrong-import-position
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import generate  # pylint: disable=wrong-import-position  # load_stubs

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
CLIENTS = 8
RSS_BOUND_MIB = 64
VOCAB = 512  # make_checkpoint --preset tiny
KILLS_AT = (0.3, 0.6)  # Fractions of the run at which the prefill service is killed.
DOWN_SECONDS = 2.0
RECONNECT_SECONDS = 2.0  # decode_service/remote_prefill.cc: kMaxReconnectBackoffMs, doubled.


def binary(folder, name):
    return os.path.join(ROOT, folder, name)


class Prefill:
    """The prefill service on a fixed port, killed and restarted on demand."""

    def __init__(self, model, port, log):
        self.address = "127.0.0.1:%d" % port
        self.command = [binary("prefill_service", "prefill_server"), "--model_dir", model,
                        "--listen", "127.0.0.1:%d" % port, "--metrics_port", "0",
                        "--sparse_config", "none"]
        self.log = log
        self.process = None
        self.down = []  # [from, to] monotonic seconds while not serving.

    def start(self):
        self.process = subprocess.Popen(self.command, stderr=self.log)

    def kill_and_restart(self):
        outage = [time.monotonic(), float("inf")]
        self.down.append(outage)  # Before the kill: calls failing from now on see it.
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        time.sleep(DOWN_SECONDS)
        self.start()
        # Until it answers health checks again (loading takes longer on a busy machine), plus
        # the decode service's longest reconnect backoff (1 s) with a margin.
        wait_healthy(self.address)
        outage[1] = time.monotonic() + RECONNECT_SECONDS


def health(address):
    channel = grpc.insecure_channel(address)
    try:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        return check(b"", timeout=5) == b"\x08\x01"
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def wait_healthy(address, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if health(address):
            return True
        time.sleep(0.1)
    return False


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def used_blocks(metrics_port):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port,
                                  timeout=5).read().decode()
    match = re.search(r'sparseaccel_kv_pool_blocks\{state="used"\} (\S+)', text)
    return float(match.group(1)) if match else None


def valid_request(pb, rng):
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 300))]
    sampling = pb.SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1 << 30))
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=rng.randint(1, 32),
                              sampling=sampling, request_id="soak-%d" % rng.randrange(1 << 30))


def make_request(pb, rng):
    """A random call: (kind, request, timeout seconds, tokens after which to cancel or None)."""
    request = valid_request(pb, rng)
    roll = rng.random()
    if roll < 0.2:
        bad = rng.choice(["id", "max_tokens", "stops", "empty"])
        if bad == "id":
            request.token_ids.ids.append(VOCAB + rng.randrange(1000))
        elif bad == "max_tokens":
            request.max_tokens = 0
        elif bad == "stops":
            request.stop.extend(["s%d" % i for i in range(17)])
        else:
            request.ClearField("token_ids")
        return "invalid", request, 20.0, None
    if roll < 0.35:
        return "cancel", request, 20.0, rng.randint(1, 4)
    if roll < 0.45:
        return "deadline", request, rng.uniform(0.005, 0.2), None
    return "valid", request, 20.0, None


# What each kind of call may end with; UNAVAILABLE too for valid calls made while (or shortly
# before) the prefill service was down.
ALLOWED = {
    "invalid": {"INVALID_ARGUMENT"},
    "valid": {"OK"},
    "cancel": {"OK", "CANCELLED"},
    "deadline": {"OK", "DEADLINE_EXCEEDED"},
}


def call(stub, kind, request, timeout, cancel_after):
    """Runs one call; returns (status name, seconds it took)."""
    start = time.monotonic()
    responses = stub.Generate(request, timeout=timeout)
    tokens = 0
    try:
        for response in responses:
            if response.HasField("token"):
                tokens += 1
                if cancel_after is not None and tokens >= cancel_after:
                    responses.cancel()
        return "OK", time.monotonic() - start
    except grpc.RpcError as error:
        return error.code().name, time.monotonic() - start


def client(stub, pb, seed, stop_at, prefill, record):
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        kind, request, timeout, cancel_after = make_request(pb, rng)
        began = time.monotonic()
        status, seconds = call(stub, kind, request, timeout, cancel_after)
        during_outage = any(a - 5.0 <= began <= b for a, b in prefill.down)
        record(kind, status, seconds, timeout, during_outage)


def main():
    work = os.environ.get("TEST_TMPDIR") or tempfile.mkdtemp(prefix="soak_test_")
    model = os.path.join(work, "tiny")
    subprocess.run([binary("model/tools", "make_checkpoint"), "--out", model, "--preset", "tiny",
                    "--seed", "3"], check=True, stderr=subprocess.DEVNULL)
    pb, pb_grpc = generate.load_stubs()
    prefill_port, decode_port, metrics_port = free_port(), free_port(), free_port()
    log = open(os.path.join(work, "services.log"), "w")
    prefill = Prefill(model, prefill_port, log)
    prefill.start()
    decode = subprocess.Popen(
        [binary("decode_service", "decode_server"), "--model_dir", model,
         "--listen", "127.0.0.1:%d" % decode_port, "--metrics_port", str(metrics_port),
         "--prefill_addresses", prefill.address, "--kv_blocks", "2048",
         "--max_batch", "8", "--max_waiting", "16"], stderr=log)
    decode_address = "127.0.0.1:%d" % decode_port
    failures = []
    try:
        if not (wait_healthy(prefill.address) and wait_healthy(decode_address)):
            raise SystemExit("services did not become healthy")
        channel = grpc.insecure_channel(decode_address)
        stub = pb_grpc.DecodeServiceStub(channel)
        counts = collections.Counter()
        lock = threading.Lock()
        overruns = []

        def record(kind, status, seconds, timeout, during_outage):
            with lock:
                counts[(kind, status)] += 1
                outage = during_outage and kind != "invalid" and status == "UNAVAILABLE"
                if status not in ALLOWED[kind] and not outage:
                    failures.append("%s call ended %s" % (kind, status))
                if seconds > timeout + 5:
                    overruns.append(seconds - timeout)

        # Warm-up: a few calls before the memory baseline.
        for s in range(20):
            call(stub, "valid", valid_request(pb, random.Random(s)), 20.0, None)
        rss_start = rss_mib(decode.pid)
        start = time.monotonic()
        stop_at = start + SOAK_SECONDS
        threads = [threading.Thread(target=client, args=(stub, pb, seed, stop_at, prefill, record))
                   for seed in range(CLIENTS)]
        for t in threads:
            t.start()
        for fraction in KILLS_AT:
            time.sleep(max(0.0, start + fraction * SOAK_SECONDS - time.monotonic()))
            prefill.kill_and_restart()
        for t in threads:
            t.join(timeout=SOAK_SECONDS + 60)
            if t.is_alive():
                failures.append("a client thread hung")
        # After the last restart the pair serves again.
        wait_healthy(prefill.address)
        after = [call(stub, "valid", valid_request(pb, random.Random(s)), 20.0, None)[0]
                 for s in range(5)]
        if any(status != "OK" for status in after):
            failures.append("calls after the restarts: %s" % after)
        healthy = health(decode_address) and health(prefill.address)
        if not healthy:
            failures.append("a service does not answer health checks")
        used = None
        for _ in range(50):
            used = used_blocks(metrics_port)
            if used == 0:
                break
            time.sleep(0.1)
        if used != 0:
            failures.append("kv pool blocks still used: %s" % used)
        rss_end = rss_mib(decode.pid)
        if rss_end - rss_start >= RSS_BOUND_MIB:
            failures.append("decode resident memory grew %.1f MiB (bound %d)" %
                            (rss_end - rss_start, RSS_BOUND_MIB))
        if overruns:
            failures.append("%d calls outlived their deadline by > 5 s" % len(overruns))
        total = sum(counts.values())
        print("soak: %.0f s, %d clients, %d calls, prefill killed %d times" %
              (SOAK_SECONDS, CLIENTS, total, len(prefill.down)))
        for (kind, status), n in sorted(counts.items()):
            print("  %-8s %-18s %d" % (kind, status, n))
        print("kv pool used blocks at the end: %s; decode RSS %.1f -> %.1f MiB (bound +%d); "
              "healthy: %s" % (used, rss_start, rss_end, RSS_BOUND_MIB, healthy))
        if total < 100:
            failures.append("only %d calls: the soak did not exercise the services" % total)
    finally:
        for process in (decode, prefill.process):
            process.send_signal(signal.SIGTERM)
        for process in (decode, prefill.process):
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                failures.append("a service did not stop on SIGTERM")
    for failure in sorted(set(failures)):
        print("FAIL: " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
