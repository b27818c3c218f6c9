#!/usr/bin/env bash
# Copies built binaries and the shared libraries they need beyond glibc/libstdc++ (which the GPU
# machine has) into out/device/, the folder carried to the GPU machine. CUDA libraries are not
# copied: the GPU machine has them in /usr/local/cuda/lib64. STAGE_DIR overrides the folder.
#   scripts/stage_device.sh bazel-bin/model/tools/run_model bazel-bin/model/tools/make_checkpoint ...
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${STAGE_DIR:-out/device}"
mkdir -p "$dest"
for bin in "$@"; do
  cp -f "$bin" "$dest/"
  ldd "$bin" | awk '/=> \//{print $1" "$3}' | while read -r name path; do
    case "$name" in
      libc.so*|libm.so*|libstdc++*|libgcc_s*|libpthread*|libdl.so*|librt.so*|ld-linux*|libcuda*|libcublas*|libcudart*) ;;
      # Always replaced: a library built from this tree may have changed since the last staging.
      *) cp -fL "$path" "$dest/$name" ;;
    esac
  done
done
du -sh "$dest"
