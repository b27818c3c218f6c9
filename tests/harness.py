"""What the service tests in tests/ share: where the built files are, free ports, and waiting
for a service's log line or any other condition."""
import os
import socket
import time

# The runfiles root under `bazel test`; the checkout when a test is run by hand.
ROOT = os.environ.get("TEST_SRCDIR", "")
if ROOT:
    ROOT = os.path.join(ROOT, os.environ.get("TEST_WORKSPACE", "sparseaccel"))
else:
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds, interval=0.05):
    """Polls `predicate` until it is true (True) or `seconds` have passed (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def log_has(path, text):
    with open(path) as f:
        return text in f.read()


def wait_ready(log_path, event, seconds=60):
    """Waits for a service's ready event (e.g. "decode.ready") in its log."""
    return wait_for(lambda: log_has(log_path, event), seconds, interval=0.1)


def stop(processes):
    """Terminates the services a test started and waits for them to exit."""
    for process in processes:
        process.terminate()
        process.wait(timeout=40)


def report(failures):
    """Prints one FAIL line per failure; the test's exit code."""
    for failure in failures:
        print("FAIL: " + failure)
    return 1 if failures else 0
