#!/usr/bin/env node
// Lints a Dockerfile with dockerfile-utils (the parser and validator behind the VS Code Docker
// extension's Dockerfile diagnostics): unknown instructions, bad arguments, flags, ports,
// duplicate CMD/ENTRYPOINT/HEALTHCHECK, relative WORKDIR, deprecated instructions.
// Usage: lint_dockerfile.js Dockerfile. Exits 1 on any diagnostic (errors and warnings).
"use strict";
const fs = require("fs");
const utils = require("dockerfile-utils");

const file = process.argv[2];
const diagnostics = utils.validate(fs.readFileSync(file, "utf8"));
const severity = { 1: "error", 2: "warning", 3: "information", 4: "hint" };
for (const d of diagnostics) {
  console.log(`${file}:${d.range.start.line + 1}: ${severity[d.severity] || d.severity}: ` +
              `${d.message} (code ${d.code})`);
}
console.log(`dockerfile-utils ${require("dockerfile-utils/package.json").version}: ` +
            `${diagnostics.length} diagnostics`);
process.exit(diagnostics.length ? 1 : 0);
