#!/usr/bin/env node
// Validates Kubernetes manifests (YAML, several documents a file) against the Kubernetes API
// schemas, with no API server:
//  1. kubernetes-models' validate() for the document's apiVersion and kind (JSON schemas
//     generated from Kubernetes' OpenAPI spec: types, formats such as int32, required fields,
//     enums);
//  2. the TypeScript compiler over the same documents typed with kubernetes-models' interfaces:
//     an object literal's excess property check rejects fields the API does not have (a
//     misspelled field, which the OpenAPI schemas let through and an API server drops, or
//     rejects under kubectl's --validate=strict).
// YAML is read as YAML 1.1, as Kubernetes reads it. Usage: validate_k8s.js FILE.yaml...
// Prints one line per document; exits 1 if any document fails.
"use strict";
const fs = require("fs");
const path = require("path");
const ts = require("typescript");
const YAML = require("yaml");

const failures = [];
const documents = []; // {where, object, module, kind}

function fail(where, message) {
  failures.push(`${where}: ${message}`);
}

for (const file of process.argv.slice(2)) {
  const parsed = YAML.parseAllDocuments(fs.readFileSync(file, "utf8"), { version: "1.1" });
  parsed.forEach((doc, index) => {
    const where = `${path.basename(file)}#${index}`;
    for (const problem of [...doc.errors, ...doc.warnings]) fail(where, `YAML: ${problem.message}`);
    const object = doc.toJS();
    if (object === null || object === undefined) return; // An empty document.
    if (typeof object !== "object" || Array.isArray(object)) {
      fail(where, "not a Kubernetes object");
      return;
    }
    const { apiVersion, kind } = object;
    if (typeof apiVersion !== "string" || typeof kind !== "string" || !/^\w+$/.test(kind)) {
      fail(where, "no apiVersion and kind");
      return;
    }
    const module = `kubernetes-models/${apiVersion}/${kind}`;
    let Model;
    try {
      Model = require(module)[kind];
    } catch (e) {
      Model = undefined;
    }
    if (typeof Model !== "function") {
      fail(where, `unknown apiVersion/kind ${apiVersion} ${kind}`);
      return;
    }
    const name = `${kind}/${(object.metadata || {}).name || "?"}`;
    try {
      new Model(object).validate();
    } catch (e) {
      fail(`${where} ${name}`, `schema: ${e.message}`);
    }
    documents.push({ where: `${where} ${name}`, object, module, kind });
  });
}

// One virtual TypeScript file: each document as an object literal of its kind's interface.
const virtual = path.join(__dirname, "__manifests__.ts");
const lines = [];
const spans = []; // [first line, last line] of each document's literal
documents.forEach((d, i) => {
  lines.push(`import type { I${d.kind} as T${i} } from ${JSON.stringify(d.module)};`);
});
documents.forEach((d, i) => {
  const first = lines.length;
  lines.push(...`export const doc${i}: T${i} = ${JSON.stringify(d.object, null, 1)};`.split("\n"));
  spans.push([first, lines.length - 1]);
});
const text = lines.join("\n") + "\n";
const options = {
  strict: true,
  noEmit: true,
  skipLibCheck: true,
  target: ts.ScriptTarget.ES2020,
  module: ts.ModuleKind.CommonJS,
  moduleResolution: ts.ModuleResolutionKind.Node10,
  types: [],
  lib: ["lib.es2020.d.ts"],
};
const host = ts.createCompilerHost(options);
const getSourceFile = host.getSourceFile.bind(host);
host.getSourceFile = (name, language, ...rest) =>
  path.resolve(name) === virtual
    ? ts.createSourceFile(name, text, language)
    : getSourceFile(name, language, ...rest);
const fileExists = host.fileExists.bind(host);
host.fileExists = (name) => path.resolve(name) === virtual || fileExists(name);
const readFile = host.readFile.bind(host);
host.readFile = (name) => (path.resolve(name) === virtual ? text : readFile(name));
if (documents.length) {
  const program = ts.createProgram([virtual], options, host);
  for (const diagnostic of ts.getPreEmitDiagnostics(program)) {
    const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, " ");
    let where = "typescript";
    if (diagnostic.file && diagnostic.start !== undefined) {
      const { line } = diagnostic.file.getLineAndCharacterOfPosition(diagnostic.start);
      const at = spans.findIndex(([first, last]) => line >= first && line <= last);
      if (at >= 0) {
        where = documents[at].where;
        // The field's path, from the indentation of the literal's lines (one space a level).
        const keys = [];
        for (const l of lines.slice(spans[at][0] + 1, line)) {
          const m = l.match(/^( *)(?:"([^"]+)": )?[[{]$/);
          if (!m) continue;
          keys.length = m[1].length - 1;
          keys.push(m[2] === undefined ? "[]" : m[2]);
        }
        const field = lines[line].match(/^( *)"([^"]+)"/);
        const trail = field ? [...keys.slice(0, field[1].length - 1), field[2]] : keys;
        if (trail.length) where += ` (${trail.join(".").replace(/\.\[\]/g, "[]")})`;
      } else if (diagnostic.file.fileName !== virtual) {
        where = diagnostic.file.fileName;
      }
    }
    fail(where, `type: ${message}`);
  }
}

for (const d of documents) {
  if (!failures.some((f) => f.startsWith(d.where))) console.log(`ok   ${d.where}`);
}
for (const f of failures) console.log(`FAIL ${f}`);
console.log(
  `k8s validation (kubernetes-models ${require("kubernetes-models/package.json").version}, ` +
    `typescript ${ts.version}): ${documents.length} documents, ${failures.length} failures`
);
process.exit(failures.length ? 1 : 0);
