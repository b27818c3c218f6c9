#!/usr/bin/python3
"""Checks deploy/: the Kubernetes manifests parse and are consistent with the services' flags and
ports (every --flag is one the binary defines; both run --device=cuda on as many nvidia.com/gpu
as they use),
and every metric the Grafana dashboard queries is one the services export."""
import glob
import json
import os
import re
import sys

import yaml

ROOT = os.environ.get("TEST_SRCDIR", "")
if ROOT:
    ROOT = os.path.join(ROOT, os.environ.get("TEST_WORKSPACE", "sparseaccel"))
else:
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def source(path):
    return open(os.path.join(ROOT, path)).read()


def flags_in(*paths):
    return set().union(*(re.findall(r"ABSL_FLAG\([^,]+, (\w+),", source(p)) for p in paths))


# Both servers also take the TLS and health-port flags of common/server_flags.cc.
flags = {
    "prefill_server": flags_in("prefill_service/main.cc", "common/server_flags.cc"),
    "decode_server": flags_in("decode_service/main.cc", "common/server_flags.cc"),
}
documents = []
for path in sorted(glob.glob(os.path.join(ROOT, "deploy/k8s/*.yaml"))):
    documents += [d for d in yaml.safe_load_all(open(path)) if d]
kinds = [d["kind"] for d in documents]
check(kinds.count("Deployment") == 2, "expected two Deployments, got %s" % kinds)
for doc in documents:
    if doc["kind"] != "Deployment":
        continue
    container = doc["spec"]["template"]["spec"]["containers"][0]
    binary = os.path.basename(container["command"][0])
    check(binary in flags, "unknown binary %s" % binary)
    # The image has the binaries under /app/ (deploy/Dockerfile).
    check(container["command"][0] == "/app/" + binary, "%s is not under /app/" % binary)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Every --flag of the command line (command and args) is one the binary defines; absl
    # also takes --noflag for booleans. A flag without =value is a boolean set to true.
    args = {}
    for arg in container["command"][1:] + container.get("args", []):
        if not arg.startswith("--"):
            failures.append("%s: %r is not a --flag" % (binary, arg))
            continue
        name, _, value = arg[2:].partition("=")
        defined = flags.get(binary, ())
        check(name in defined or (name.startswith("no") and name[2:] in defined),
              "%s has no flag --%s" % (binary, name))
        check(name not in args, "%s: --%s given twice" % (binary, name))
        args[name] = value
    # Both services run the GPU engine on the GPUs their pod asks for: the prefill service on
    # --gpus of them (0: one GPU without NCCL), the decode service on one.
    check(args.get("device") == "cuda", "%s does not run --device=cuda" % binary)
    limits = container.get("resources", {}).get("limits", {})
    uses = max(1, int(args.get("gpus", "0")))
    check(str(limits.get("nvidia.com/gpu")) == str(uses),
          "%s: resources.limits nvidia.com/gpu is %s, the command uses %d" %
          (binary, limits.get("nvidia.com/gpu"), uses))
    check(args["listen"].endswith(":%d" % ports["grpc"]), "%s listen/port mismatch" % binary)
    check(int(args["metrics_port"]) == ports["metrics"], "%s metrics port mismatch" % binary)
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    check(int(annotations["prometheus.io/port"]) == ports["metrics"],
          "%s scrape annotation port mismatch" % binary)
    # gRPC probes speak plaintext: with TLS on the gRPC port they go to the health port.
    probe_port = ports["health"] if "tls_cert" in args else ports["grpc"]
    for probe in ("readinessProbe", "livenessProbe"):
        check(container[probe]["grpc"]["port"] == probe_port, "%s %s port" % (binary, probe))
    if "health_port" in args:
        check(int(args["health_port"]) == ports["health"], "%s health port mismatch" % binary)
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
    for name, value in args.items():
        if "tls" in name and value.startswith("/"):
            mount = os.path.dirname(value)
            check(mount in mounts and "secret" in volumes.get(mounts[mount], {}),
                  "%s --%s is not on a mounted Secret" % (binary, name))
    grace = int(args.get("shutdown_grace_seconds", 30))
    check(doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace,
          "%s terminationGracePeriodSeconds must exceed --shutdown_grace_seconds" % binary)

exported = set()
for path in ("decode_service/request_metrics.cc", "prefill_service/prefill_server.cc"):
    exported |= set(re.findall(r'\.Name\("(sparseaccel_\w+)"\)', source(path)))
check(len(exported) >= 10, "found only %d exported metrics" % len(exported))
dashboard = json.load(open(os.path.join(ROOT, "deploy/grafana/sparseaccel.json")))
queried = set()
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        for name in re.findall(r"sparseaccel_\w+", target["expr"]):
            queried.add(re.sub(r"_(bucket|sum|count)$", "", name))
check(queried, "dashboard queries no metrics")
for name in sorted(queried - exported):
    failures.append("dashboard queries %s, which no service exports" % name)
for name in sorted(exported):
    check(re.search(r"_(seconds|bytes|total|blocks|depth|sequences|requests)$", name),
          "metric %s lacks a unit or _total suffix" % name)

for failure in failures:
    print("FAIL:", failure)
print("deploy checks: %d failures (%d manifests, %d metrics exported, %d queried)" %
      (len(failures), len(documents), len(exported), len(queried)))
sys.exit(1 if failures else 0)
