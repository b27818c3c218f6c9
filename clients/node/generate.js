#!/usr/bin/env node
// Streams tokens from the decode service's Generate API with @grpc/grpc-js, the proto loaded at
// run time from proto/sparseaccel.proto (nothing generated is kept).
//
//   cd clients/node && npm ci
//   node clients/node/generate.js --server 127.0.0.1:50052 --prompt_ids 1,2,3 --max_tokens 16
//   node clients/node/generate.js --prompt "The capital of France is" --tls_ca ca.crt
//
// Prints each token (its text for text prompts, its id otherwise), then one line
// "node client: finish=... completion_tokens=... ttft_ms=... mean_itl_ms=...". Exits 1 with the
// gRPC status on failure, 2 on bad flags.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const ROOT = path.resolve(__dirname, "..", "..");

function parseFlags(argv) {
  const flags = {server: "127.0.0.1:50052", max_tokens: "16", temperature: "0", seed: "0",
                 timeout_seconds: "60"};
  for (let i = 0; i < argv.length; ++i) {
    const match = /^--([a-z_]+)(?:=(.*))?$/.exec(argv[i]);
    if (!match) throw new Error(`unexpected argument ${argv[i]}`);
    flags[match[1]] = match[2] !== undefined ? match[2] : argv[++i];
  }
  if ((flags.prompt === undefined) === (flags.prompt_ids === undefined)) {
    throw new Error("give exactly one of --prompt and --prompt_ids");
  }
  return flags;
}

function loadService() {
  const definition = protoLoader.loadSync(path.join(ROOT, "proto", "sparseaccel.proto"), {
    includeDirs: [ROOT], keepCase: true, longs: Number, enums: String, defaults: true,
  });
  return grpc.loadPackageDefinition(definition).sparseaccel.v1.DecodeService;
}

function credentials(flags) {
  if (!flags.tls_ca) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(fs.readFileSync(flags.tls_ca));
}

function requestOf(flags) {
  const request = {
    max_tokens: Number(flags.max_tokens),
    sampling: {temperature: Number(flags.temperature), seed: Number(flags.seed)},
  };
  if (flags.prompt !== undefined) {
    request.text = flags.prompt;
  } else {
    request.token_ids = {ids: flags.prompt_ids.split(",").map(Number)};
  }
  return request;
}

function main() {
  let flags;
  try {
    flags = parseFlags(process.argv.slice(2));
  } catch (error) {
    console.error(error.message);
    process.exit(2);
  }
  const DecodeService = loadService();
  const client = new DecodeService(flags.server, credentials(flags));
  const deadline = new Date(Date.now() + 1000 * Number(flags.timeout_seconds));
  const call = client.Generate(requestOf(flags), {deadline});
  call.on("data", (response) => {
    if (response.token) {
      process.stdout.write(flags.prompt !== undefined ? response.token.text
                                                      : `${response.token.token_id} `);
    } else if (response.result) {
      const r = response.result;
      process.stdout.write(
          `\nnode client: finish=${r.finish_reason} completion_tokens=${r.completion_tokens} ` +
          `ttft_ms=${(1e3 * r.time_to_first_token_seconds).toFixed(2)} ` +
          `mean_itl_ms=${(1e3 * r.mean_inter_token_latency_seconds).toFixed(2)}\n`);
    }
  });
  call.on("error", (error) => {
    console.error(`\nGenerate failed: ${grpc.status[error.code]} ${error.details}`);
    process.exitCode = 1;
  });
  call.on("end", () => client.close());
}

main();
