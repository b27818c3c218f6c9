#!/usr/bin/python3
"""Streams tokens from the decode service's Generate API (python3-grpcio from Debian).

Stubs are generated at run time from proto/sparseaccel.proto with Debian's protoc and
grpc_python_plugin into a temporary folder, so nothing generated is kept in the repository.

  /usr/bin/python3 clients/python/generate.py --server 127.0.0.1:50052 --prompt_ids 1,2,3
"""
import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_stubs():
    out = tempfile.mkdtemp(prefix="sparseaccel_py_")
    subprocess.run(["protoc", "-I", ROOT, "--python_out", out, "--grpc_out", out,
                    "--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin",
                    os.path.join(ROOT, "proto", "sparseaccel.proto")], check=True)
    sys.path.insert(0, out)
    return (importlib.import_module("proto.sparseaccel_pb2"),
            importlib.import_module("proto.sparseaccel_pb2_grpc"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="127.0.0.1:50052")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt (the model needs tokenizer.json)")
    prompt.add_argument("--prompt_ids", help="comma-separated prompt token ids")
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pb, pb_grpc = load_stubs()
    stub = pb_grpc.DecodeServiceStub(grpc.insecure_channel(args.server))
    if args.prompt is not None:
        prompt_field = {"text": args.prompt}
    else:
        prompt_field = {"token_ids": pb.TokenIds(ids=[int(x) for x in args.prompt_ids.split(",")])}
    request = pb.GenerateRequest(
        **prompt_field,
        max_tokens=args.max_tokens,
        sampling=pb.SamplingParams(temperature=args.temperature, seed=args.seed))
    start = time.monotonic()
    tokens = []
    try:
        for response in stub.Generate(request, timeout=60):
            if response.HasField("token"):
                tokens.append(response.token.token_id)
                # Text when the service has a tokenizer, token ids otherwise.
                if args.prompt is not None:
                    print(response.token.text, end="", flush=True)
                else:
                    print(response.token.token_id, end=" ", flush=True)
            else:
                r = response.result
                print("\npython client: finish=%s completion_tokens=%d ttft_ms=%.2f "
                      "mean_itl_ms=%.2f wall_ms=%.2f" % (
                          pb.FinishReason.Name(r.finish_reason), r.completion_tokens,
                          1e3 * r.time_to_first_token_seconds,
                          1e3 * r.mean_inter_token_latency_seconds,
                          1e3 * (time.monotonic() - start)))
    except grpc.RpcError as error:
        print("\nGenerate failed: %s %s" % (error.code().name, error.details()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
