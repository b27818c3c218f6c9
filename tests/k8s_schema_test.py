#!/usr/bin/python3
"""Validates deploy/k8s/*.yaml against the Kubernetes API schemas, without an API server.

Runs deploy/validate/validate_k8s.js (kubernetes-models' validate(): JSON schemas from
Kubernetes' OpenAPI spec; and TypeScript over the documents typed with kubernetes-models'
interfaces, which rejects fields the API does not have) on the manifests: every document must
pass. Then on broken copies, each of which must fail with the expected message: a misspelled
field, a string where an int is required, a misspelled resources.limits, a missing required
field, an unknown kind, and a YAML syntax error. Needs node and deploy/validate/node_modules
(scripts/test.sh installs them).
"""
import glob
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, report  # pylint: disable=wrong-import-position
VALIDATOR = os.path.realpath(os.path.join(ROOT, "deploy", "validate", "validate_k8s.js"))

# (what, manifest, text in it, replacement, expected in the validator's output)
BROKEN = [
    ("misspelled field", "decode.yaml", "periodSeconds: 5", "periodSecnds: 5",
     "readinessProbe.periodSecnds): type: Object literal may only specify known properties"),
    ("string for an int", "prefill.yaml", "containerPort: 50051}", 'containerPort: "50051"}',
     "containerPort must be integer"),
    ("misspelled resources.limits", "prefill.yaml", "limits: {nvidia.com/gpu: 2",
     "limts: {nvidia.com/gpu: 2", "resources.limts): type: Object literal"),
    ("missing container name", "decode.yaml", "- name: decode\n          image:",
     "- image:", "containers/0 must have required property name"),
    ("unknown kind", "prefill.yaml", "kind: Service", "kind: Servise",
     "unknown apiVersion/kind v1 Servise"),
    ("YAML syntax", "decode.yaml", "replicas: 1", "replicas: [1", "YAML:"),
]


def validate(paths):
    result = subprocess.run(["node", VALIDATOR] + paths, capture_output=True, text=True,
                            timeout=60)
    return result.returncode, result.stdout + result.stderr


def main():
    started = time.monotonic()
    failures = []
    manifests = sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml")))
    code, output = validate(manifests)
    print(output, end="")
    documents = sum(open(p).read().count("\nkind: ") + open(p).read().startswith("kind: ")
                    for p in manifests)
    if code != 0 or "%d documents, 0 failures" % documents not in output:
        failures.append("manifests: exit %d, expected %d documents and no failures" %
                        (code, documents))

    # All broken copies in one run (node and TypeScript start once): each must fail, with its
    # message on its own file's lines.
    work = os.environ.get("TEST_TMPDIR") or tempfile.mkdtemp(prefix="k8s_schema_test_")
    broken = []
    for index, (what, name, old, new, expected) in enumerate(BROKEN):
        text = open(os.path.join(ROOT, "deploy", "k8s", name)).read()
        if old not in text:
            failures.append("%s: %r is not in %s any more; update the test" % (what, old, name))
            continue
        path = os.path.join(work, "broken%d-%s" % (index, name))
        with open(path, "w") as f:
            f.write(text.replace(old, new, 1))
        broken.append((what, os.path.basename(path), expected))
    code, output = validate([os.path.join(work, b[1]) for b in broken])
    if code != 1:
        failures.append("broken copies: exit %d" % code)
    for what, name, expected in broken:
        lines = [l for l in output.splitlines() if l.startswith("FAIL %s#" % name)]
        caught = any(expected in l for l in lines)
        print("%-28s %s" % (what, "rejected" if caught else "NOT REJECTED"))
        if not caught:
            failures.append("%s: expected %r in:\n%s" % (what, expected, "\n".join(lines)))
    if failures:
        print(output)
    print("k8s schema test: %d failures in %.1f s" % (len(failures), time.monotonic() - started))
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
