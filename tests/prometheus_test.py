#!/usr/bin/python3
"""A real Prometheus server (Debian's prometheus 2.42 and promtool) against both services.

Starts a prefill and a decode service on the tiny random CPU checkpoint with --metrics_port,
and a Prometheus scraping both every second into a temporary TSDB; waits until both targets
are up and scraped (after one request, so that the labelled series exist), sends a few more
Generate requests (clients/python/generate.py), waits until Prometheus has scraped their
counters, then fails unless:
- `promtool check metrics` passes with no problem on both services' /metrics;
- every PromQL `expr` of deploy/grafana/sparseaccel.json (Grafana variables substituted)
  answers `success` through /api/v1/query with at least one series, and expressions over
  rate() have a series with a positive value (the requests were seen). Only expressions over
  GPU_ONLY metrics may be empty: the CPU engine never observes them;
- a query of a metric that no service exports returns no series (the check can fail).
Needs the prometheus and promtool binaries (scripts/install_deps.sh installs them).
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, free_port, report, stop, wait_ready  # pylint: disable=wrong-import-position
REQUESTS = 3
MAX_TOKENS = 8
# Histograms observed only on the GPU engine (peak GPU memory of a prefill): on the CPU their
# families have no series, so their dashboard expressions may answer an empty result here.
GPU_ONLY = {"sparseaccel_prefill_peak_gpu_memory_bytes"}
# Concrete values for Grafana's variables, as Grafana would substitute them for a 1 h panel.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def substitute(expr, variables):
    """Grafana variables ($name, ${name}, [[name]]) replaced by concrete values."""
    def value(match):
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in variables:
            raise ValueError("no value for Grafana variable %r in %s" % (name, expr))
        return variables[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def template_values(dashboard):
    """The dashboard's own variables (e.g. a context bucket): their current value, "All" or
    none as the regex .* (for =~ matchers)."""
    values = dict(GRAFANA_VARIABLES)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":
            continue
        current = variable.get("current", {}).get("value", "$__all")
        if isinstance(current, list):
            current = "|".join(current)
        values[variable["name"]] = ".*" if current in ("", "$__all") else current
    return values


def dashboard_exprs():
    """Every "expr" of the dashboard, and the values of its variables."""
    dashboard = json.load(open(os.path.join(ROOT, "deploy", "grafana", "sparseaccel.json")))
    exprs = []

    def walk(node):  # Every "expr", including rows' nested panels.
        if isinstance(node, dict):
            for key, item in node.items():
                if key == "expr" and isinstance(item, str):
                    exprs.append(item)
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(dashboard.get("panels", []))
    return exprs, template_values(dashboard)


class Prometheus:
    def __init__(self, work, targets):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "  evaluation_interval: 1s\nscrape_configs:\n")
            for job, address in targets.items():
                f.write("  - job_name: %s\n    static_configs:\n      - targets: ['%s']\n" %
                        (job, address))
        check = subprocess.run(["promtool", "check", "config", config], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise SystemExit("promtool check config:\n" + check.stdout + check.stderr)
        self.log = os.path.join(work, "prometheus.log")
        self.process = subprocess.Popen(
            ["prometheus", "--config.file=" + config,
             "--storage.tsdb.path=" + tempfile.mkdtemp(prefix="tsdb_", dir=work),
             "--web.listen-address=127.0.0.1:%d" % self.port, "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))

    def api(self, path, **params):
        url = self.url + "/api/v1/" + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return json.loads(get(url))

    def query(self, expr):
        return self.api("query", query=expr)

    def wait(self, condition, what, seconds=20):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit("prometheus exited:\n" + open(self.log).read())
            try:
                if condition():
                    return
            except OSError:  # Not listening yet.
                pass
            time.sleep(0.2)
        raise SystemExit("timed out waiting for " + what + "\n" + open(self.log).read())

    def targets_up(self, jobs):
        active = self.api("targets", state="active")["data"]["activeTargets"]
        up = {t["labels"]["job"] for t in active if t["health"] == "up"}
        return up >= set(jobs)

    def scalar(self, expr):
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=20)


def promtool_check_metrics(name, text, failures):
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True)
    problems = (check.stdout + check.stderr).strip()
    print("promtool check metrics (%s, %d lines): exit %d %s" %
          (name, text.count("\n"), check.returncode, problems or "no problems"))
    if check.returncode != 0 or problems:
        failures.append("promtool check metrics on %s: exit %d\n%s" %
                        (name, check.returncode, problems))


def main():
    for tool in ("prometheus", "promtool"):
        if not shutil.which(tool):
            print("FAIL: %s not on PATH (Debian package prometheus; scripts/install_deps.sh)"
                  % tool)
            return 1
    started = time.monotonic()
    work = os.environ.get("TEST_TMPDIR") or tempfile.mkdtemp(prefix="prometheus_test_")
    model = os.path.join(work, "tiny")
    subprocess.run([os.path.join(ROOT, "model", "tools", "make_checkpoint"), "--out", model, "--preset",
                    "tiny", "--seed", "5"], check=True, stderr=subprocess.DEVNULL)
    prefill_port, decode_port = free_port(), free_port()
    metrics = {"prefill": "127.0.0.1:%d" % free_port(), "decode": "127.0.0.1:%d" % free_port()}
    prefill_log, decode_log = os.path.join(work, "prefill.log"), os.path.join(work, "decode.log")
    processes = [
        subprocess.Popen([os.path.join(ROOT, "prefill_service", "prefill_server"), "--model_dir",
                          model, "--listen", "127.0.0.1:%d" % prefill_port, "--metrics_port",
                          metrics["prefill"].split(":")[1]], stderr=open(prefill_log, "w")),
        subprocess.Popen([os.path.join(ROOT, "decode_service", "decode_server"), "--model_dir",
                          model, "--listen", "127.0.0.1:%d" % decode_port, "--metrics_port",
                          metrics["decode"].split(":")[1], "--prefill_addresses",
                          "127.0.0.1:%d" % prefill_port], stderr=open(decode_log, "w")),
    ]
    prometheus = None
    failures = []
    try:
        if not (wait_ready(prefill_log, "prefill.ready") and wait_ready(decode_log, "decode.ready")):
            raise SystemExit("services did not start")

        def generate():
            client = subprocess.run(
                [sys.executable, os.path.join(ROOT, "clients", "python", "generate.py"),
                 "--server", "127.0.0.1:%d" % decode_port, "--prompt_ids", "3,14,15,92,65",
                 "--max_tokens", str(MAX_TOKENS)], capture_output=True, text=True, timeout=60)
            if client.returncode != 0:
                raise SystemExit("generate.py: exit %d\n%s%s" % (
                    client.returncode, client.stdout, client.stderr))

        # Labelled series appear at their first observation: one request before the first
        # scrape, so that every series is there from the start and rate() sees the others.
        generate()
        prometheus = Prometheus(work, metrics)
        prometheus.wait(lambda: prometheus.targets_up(metrics), "both targets up")
        prometheus.wait(lambda: prometheus.scalar("count(sparseaccel_generate_requests_total)")
                        > 0, "a first scrape")
        for _ in range(REQUESTS):
            generate()
        prometheus.wait(
            lambda: prometheus.scalar("sum(sparseaccel_generate_requests_total)") > REQUESTS and
            prometheus.scalar("sum(sparseaccel_prefill_requests_total)") > REQUESTS,
            "the requests' counters scraped")

        for name, address in metrics.items():
            promtool_check_metrics(name, get("http://%s/metrics" % address), failures)

        exprs, variables = dashboard_exprs()
        if len(exprs) < 10:
            failures.append("found only %d dashboard expressions" % len(exprs))
        for raw in exprs:
            try:
                expr = substitute(raw, variables)
            except ValueError as e:
                failures.append(str(e))
                continue
            answer = prometheus.query(expr)
            result = answer.get("data", {}).get("result", [])
            values = [float(r["value"][1]) for r in result]
            gpu_only = any(m in expr for m in GPU_ONLY)
            print("%-8s %2d series %-40s %s" % (
                answer["status"], len(result),
                " ".join("%.4g" % v for v in values[:4]) or "-",
                expr + ("  [GPU only]" if gpu_only else "")))
            if answer["status"] != "success":
                failures.append("%s: %s %s" % (expr, answer["status"], answer.get("error")))
            elif not result and not gpu_only:
                failures.append("no series for %s" % expr)
            elif "rate(" in expr and result and \
                    not any(math.isfinite(v) and v > 0 for v in values):
                failures.append("no positive rate for %s: %s" % (expr, values))

        # The check itself: a metric nobody exports gives no series.
        control = prometheus.query("sum(rate(sparseaccel_no_such_metric_total[5m]))")
        if control["status"] != "success" or control["data"]["result"]:
            failures.append("control query of a missing metric: %s" % control)
    finally:
        if prometheus:
            prometheus.stop()
        stop(processes)
    print("prometheus test: %d failures in %.1f s" % (len(failures), time.monotonic() - started))
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
