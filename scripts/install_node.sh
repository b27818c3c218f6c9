#!/usr/bin/env bash
# node and npm (Debian's packages) unless the machine already has npm: the tokenizer reference
# package (tools/npm) needs them.
set -euo pipefail
command -v npm >/dev/null && exit 0
as_root=()
[ "$(id -u)" = 0 ] || as_root=(sudo -n)
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends nodejs npm
