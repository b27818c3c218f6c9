#!/usr/bin/env bash
# Installs the Debian bookworm packages the build and tests need (as root; idempotent).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
  bazel-bootstrap bazel-rules-java pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libgtest-dev libgmock-dev libbenchmark-dev zlib1g-dev libxxhash-dev libssl-dev libre2-dev
  prometheus-cpp-dev libcpp-httplib-dev nlohmann-json3-dev libopenblas-dev
  python3 python3-grpcio python3-protobuf python3-numpy python3-yaml curl
  prometheus
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
