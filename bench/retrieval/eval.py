#!/usr/bin/python3
"""Passkey exact-match retrieval through the real prefill and decode services, per sparse config.

For each config the two services are started on loopback (prefill with that --sparse_config),
every prompt of passkey.eval_prompts is sent to the decode service's Generate as token ids with
greedy sampling and max_tokens 7, and the generated ids are compared with the answer. Dense
("none") is the reference: a pattern search is only good if its config keeps the rate dense
attention reaches.

  /usr/bin/python3 bench/retrieval/eval.py --model out/passkey \\
      --configs dense=none,ashape=a_shape:sink=64,window=1024 \\
      --configs vs=vertical_slash:vertical=64,slash=256,bs=block_sparse:top_k=8 \\
      --lengths 4096,8192,16384 --prompts 8 --device cuda --out results.json

SPEC is `none` (dense), a sparse config JSON file, or PATTERN:KEY=VALUE,... (every head gets the
pattern; budgets a_shape: sink, window; vertical_slash: vertical, slash, last_q; block_sparse:
top_k; omitted ones take bench/ttft/uniform_sparse_config.py's defaults), written with
dense_below_tokens 0 so every tested length runs sparse.
"""

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import passkey  # pylint: disable=wrong-import-position

try:  # Debian's python3-grpcio; without it (a GPU machine's python) --client_bin is the client.
    import generate  # pylint: disable=wrong-import-position  # clients/python: load_stubs.
    import grpc  # pylint: disable=wrong-import-position
except ImportError:
    grpc = None

UNIFORM_SCRIPT = os.path.join(ROOT, "bench", "ttft", "uniform_sparse_config.py")
PATTERN_KEYS = {
    "dense": (),
    "a_shape": ("sink", "window"),
    "vertical_slash": ("vertical", "slash", "last_q"),
    "block_sparse": ("top_k",),
}
LOG_FIELD = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S*)')


class ServiceError(RuntimeError):
    """A service did not start or died; the config's remaining prompts cannot run."""


def parse_configs(values):
    """[(name, spec)] from --configs values such as `dense=none,as=a_shape:sink=64,window=1024`.

    Commas separate configs and also the budgets of a pattern spec, so a piece starts a new
    config only when its value names one (none, a pattern, a file); `window=1024` continues the
    previous spec. Semicolons always separate configs.
    """
    configs = []
    for value in values:
        for piece in re.split(r"[,;]", value):
            piece = piece.strip()
            if not piece:
                continue
            name, sep, spec = piece.partition("=")
            starts = sep and (spec == "none" or ":" in spec or spec in PATTERN_KEYS or
                              spec.endswith(".json") or os.path.isfile(spec))
            if starts:
                configs.append([name, spec])
            elif configs and ":" in configs[-1][1] and sep:
                configs[-1][1] += "," + piece
            else:
                raise SystemExit("--configs: cannot read %r (NAME=none|FILE|PATTERN:K=V,...)"
                                 % piece)
    names = [name for name, _ in configs]
    if not configs or len(set(names)) != len(names):
        raise SystemExit("--configs: give at least one config, each with its own name")
    return [tuple(c) for c in configs]


def sparse_config_path(spec, model_dir, work_dir, name):
    """The --sparse_config value for spec: 'none', the file, or a uniform config written here."""
    if spec == "none":
        return spec
    if os.path.isfile(spec):
        return os.path.abspath(spec)
    pattern, _, budgets = spec.partition(":")
    if pattern not in PATTERN_KEYS:
        raise SystemExit("config %s: unknown pattern %r (%s)" % (name, pattern,
                                                                ", ".join(PATTERN_KEYS)))
    flags = []
    for item in filter(None, budgets.split(",")):
        key, _, number = item.partition("=")
        if key not in PATTERN_KEYS[pattern] or not number.isdigit():
            raise SystemExit("config %s: %r is not a budget of %s (%s=INT)" % (
                name, item, pattern, "|".join(PATTERN_KEYS[pattern]) or "none"))
        flags += ["--" + key, number]
    path = os.path.join(work_dir, "%s.sparse.json" % name)
    with open(path, "w") as f:
        subprocess.run([sys.executable, UNIFORM_SCRIPT, "--model", model_dir, "--pattern", pattern,
                        "--dense_below_tokens", "0"] + flags, stdout=f, check=True)
    return path


def log_fields(line):
    """The key=value fields of one service log line (common/log.h), quotes removed."""
    fields = {}
    for key, value in LOG_FIELD.findall(line):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        fields[key] = value
    return fields


class Service:
    """One server process with its log file; stopped with SIGTERM, then SIGKILL if it hangs."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")
        # Its own process group: Ctrl-C reaches this script only, which then stops the server
        # in order instead of both receiving the signal at once.
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def log_text(self, offset=0):
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")

    def log_size(self):
        return os.path.getsize(self.log_path)

    def tail(self, lines=8):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, event, timeout_s):
        """The fields of the `event` line (e.g. prefill.ready) once logged; ServiceError if the
        process exits first or the line does not come within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                if (" %s " % event) in line + " ":
                    return log_fields(line)
            if self.process.poll() is not None:
                raise ServiceError("%s exited with %s before it was ready:\n%s" % (
                    self.name, self.process.returncode, self.tail()))
            time.sleep(0.2)
        raise ServiceError("%s not ready after %d s:\n%s" % (self.name, timeout_s, self.tail()))

    def alive(self):
        return self.process.poll() is None

    def stop(self, grace_s=20):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                # A hung drain, or a second Ctrl-C while waiting: never leave it running.
                self.process.kill()
                self.process.wait()
        self.log.close()


def start_services(args, sparse_config, log_dir, max_length):
    """Prefill then decode (which needs the prefill port), on free loopback ports."""
    services = []
    try:
        prefill = Service("prefill_server", [
            args.prefill_bin, "--model_dir", args.model,
            "--device=" + args.device, "--sparse_config", sparse_config,
            "--listen", "127.0.0.1:0", "--metrics_port", "0", "--shutdown_grace_seconds", "10",
        ], os.path.join(log_dir, "prefill.log"))
        services.append(prefill)
        ready = prefill.wait_ready("prefill.ready", args.ready_timeout_s)
        # Room for one prompt and its answer at a time, twice over.
        kv_blocks = 2 * ((max_length + passkey.ANSWER_TOKENS + 63) // 64) + 16
        decode = Service("decode_server", [
            args.decode_bin, "--model_dir", args.model,
            "--device=" + args.device, "--prefill_addresses", "127.0.0.1:" + ready["port"],
            "--listen", "127.0.0.1:0", "--metrics_port", "0", "--kv_block_tokens", "64",
            "--kv_blocks", str(kv_blocks), "--shutdown_grace_seconds", "10",
        ], os.path.join(log_dir, "decode.log"))
        services.append(decode)
        decode_port = decode.wait_ready("decode.ready", args.ready_timeout_s)["port"]
        return services, "127.0.0.1:" + decode_port
    except BaseException:
        stop_services(services)
        raise


def stop_services(services):
    """Decode first (it holds calls into prefill), then prefill."""
    for service in reversed(services):
        service.stop()


def densities(log_text):
    """Density values the prefill service logged (any field named like *density)."""
    values = []
    for line in log_text.splitlines():
        for key, value in log_fields(line).items():
            if key.endswith("density") and key != "target_density":
                try:
                    values.append(float(value))
                except ValueError:
                    pass
    return values


def generate_once(pb, stub, request_id, ids, timeout_s):
    """Greedy Generate of the answer's length; (generated ids, ttft seconds, error or None)."""
    request = pb.GenerateRequest(
        request_id=request_id, token_ids=pb.TokenIds(ids=ids),
        max_tokens=passkey.ANSWER_TOKENS, ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0.0))
    tokens, ttft = [], None
    try:
        for response in stub.Generate(request, timeout=timeout_s):
            if response.HasField("token"):
                tokens.append(response.token.token_id)
            else:
                ttft = response.result.time_to_first_token_seconds
    except grpc.RpcError as error:
        return tokens, ttft, "%s: %s" % (error.code().name, error.details())
    return tokens, ttft, None


def generate_with_client(client_bin, address, ids, timeout_s):
    """generate_once through the C++ generate_client (its `tokens:` and `ttft_ms=` output)."""
    command = [client_bin, "--server", address, "--prompt_ids", ",".join(str(i) for i in ids),
               "--max_tokens", str(passkey.ANSWER_TOKENS), "--timeout_seconds",
               str(max(1, int(timeout_s)))]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 30,
                             check=False)
    except subprocess.TimeoutExpired:
        return [], None, "generate_client did not return"
    tokens_line = re.search(r"^tokens:([ 0-9]*)$", run.stdout, re.M)
    tokens = [int(t) for t in tokens_line.group(1).split()] if tokens_line else []
    ttft = re.search(r"ttft_ms=([0-9.]+)", run.stdout)
    error = None if run.returncode == 0 else (run.stderr.strip() or "exit %d" % run.returncode)
    return tokens, float(ttft.group(1)) / 1e3 if ttft else None, error


def run_config(args, stubs, name, spec, sparse_config, work_dir, prompts):
    """Results of one config at every length; never leaves its services running."""
    pb, pb_grpc = stubs
    log_dir = os.path.join(work_dir, name)
    os.makedirs(log_dir, exist_ok=True)
    results = {length: {"config": name, "spec": spec, "sparse_config": sparse_config,
                        "length": length, "items": []} for length in args.lengths}
    services = []
    try:
        services, address = start_services(args, sparse_config, log_dir, max(args.lengths))
        prefill = services[0]
        channel = stub = None
        if args.client_bin is None:
            channel = grpc.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20)])
            stub = pb_grpc.DecodeServiceStub(channel)
        for length in args.lengths:
            for i, (ids, answer) in enumerate(prompts[length]):
                offset = prefill.log_size()
                start = time.monotonic()
                if not all(s.alive() for s in services):
                    tokens, ttft, error = [], None, "service exited"
                elif args.client_bin is not None:
                    tokens, ttft, error = generate_with_client(args.client_bin, address, ids,
                                                               args.rpc_timeout_s)
                else:
                    tokens, ttft, error = generate_once(pb, stub, "%s-%d-%d" % (name, length, i),
                                                        ids, args.rpc_timeout_s)
                wall = time.monotonic() - start
                time.sleep(0.05)  # The prefill log line follows the trailer it sent.
                item = {"index": i, "depth": round(passkey.eval_depths(len(prompts[length]))[i], 4),
                        "answer": passkey.decode(answer), "generated": passkey.decode(tokens),
                        "generated_ids": tokens, "correct": error is None and tokens == answer,
                        "ttft_ms": None if ttft is None else 1e3 * ttft,
                        "wall_s": round(wall, 3), "density": None}
                found = densities(prefill.log_text(offset))
                if found:
                    item["density"] = statistics.mean(found)
                if error:
                    item["error"] = error
                results[length]["items"].append(item)
                print("%s %6d #%d depth %.2f: %-8r -> %-8r %s%s" % (
                    name, length, i, item["depth"], item["answer"], item["generated"],
                    "ok" if item["correct"] else "WRONG", " (%s)" % error if error else ""),
                    flush=True)
        if channel is not None:
            channel.close()
    except ServiceError as error:
        print("%s: %s" % (name, error), file=sys.stderr)
        for result in results.values():
            result["error"] = str(error)
    finally:
        stop_services(services)
    for result in results.values():
        items = result["items"]
        result["total"] = len(prompts[result["length"]])
        result["correct"] = sum(item["correct"] for item in items)
        result["exact_match"] = result["correct"] / result["total"]
        ttfts = [item["ttft_ms"] for item in items if item["ttft_ms"] is not None]
        result["ttft_ms_median"] = statistics.median(ttfts) if ttfts else None
        found = [item["density"] for item in items if item["density"] is not None]
        result["density_mean"] = statistics.mean(found) if found else None
        result["failed_rpcs"] = sum("error" in item for item in items)
    return [results[length] for length in args.lengths]


def device_name(device):
    if device == "cuda":
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "cuda (unknown GPU)"
    return "cpu: %s, %d cores" % (platform.processor() or platform.machine(), os.cpu_count())


def table(results, lengths):
    """Markdown table, config x length, of exact-match counts and rates."""
    lines = ["| config | " + " | ".join("%d" % n for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    rows = {}
    for r in results:
        rows.setdefault(r["config"], {})[r["length"]] = r
    for config, by_length in rows.items():
        cells = []
        for n in lengths:
            r = by_length[n]
            cell = "%d/%d (%.0f%%)" % (r["correct"], r["total"], 100 * r["exact_match"])
            if r["density_mean"] is not None:
                cell += " d %.3f" % r["density_mean"]
            if r["failed_rpcs"] or r.get("error"):
                cell += " [%d failed]" % (r["total"] - len(r["items"]) + r["failed_rpcs"])
            cells.append(cell)
        lines.append("| %s | %s |" % (config, " | ".join(cells)))
    return "\n".join(lines)


def raise_on_sigterm(signum, frame):
    """SIGTERM ends the run like Ctrl-C, so the finally blocks stop the services."""
    del signum, frame
    raise KeyboardInterrupt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--bin_dir", default=None,
                        help="folder with prefill_server and decode_server (default: bazel-bin)")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--configs", action="append", required=True,
                        help="NAME=SPEC,... (repeatable); SPEC: none | FILE | PATTERN:K=V,...")
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per length")
    parser.add_argument("--seed", type=int, default=0, help="seed of passkey.eval_prompts")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--work_dir", default=None,
                        help="service logs and written configs (default: a new temp folder)")
    parser.add_argument("--ready_timeout_s", type=float, default=300)
    parser.add_argument("--rpc_timeout_s", type=float, default=600,
                        help="deadline of each Generate call")
    parser.add_argument("--client_bin", default=None,
                        help="C++ generate_client to call instead of python grpc (which it "
                        "needs when python3-grpcio is missing)")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    configs = parse_configs(args.configs)
    if args.bin_dir is None:
        args.bin_dir = os.path.join(ROOT, "bazel-bin")
        binaries = [os.path.join(args.bin_dir, d, b) for d, b in
                    (("prefill_service", "prefill_server"), ("decode_service", "decode_server"))]
    else:
        binaries = [os.path.join(args.bin_dir, b) for b in ("prefill_server", "decode_server")]
    missing = [b for b in binaries if not os.access(b, os.X_OK)]
    if missing:
        raise SystemExit("not found: %s (bazel build //prefill_service:prefill_server "
                         "//decode_service:decode_server, or --bin_dir)" % ", ".join(missing))
    args.prefill_bin, args.decode_bin = binaries
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="passkey_eval_")
    os.makedirs(work_dir, exist_ok=True)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    # Also when started from a script that ignores SIGINT in the background.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    # Every spec is checked (and written) before any service starts.
    configs = [(name, spec, sparse_config_path(spec, args.model, work_dir, name))
               for name, spec in configs]
    if args.client_bin is None and grpc is None:
        raise SystemExit("python grpc is missing: install python3-grpcio or pass --client_bin")
    stubs = generate.load_stubs() if args.client_bin is None else (None, None)
    prompts = {n: passkey.eval_prompts(n, args.prompts, args.seed) for n in args.lengths}
    print("work dir (service logs, configs): %s" % work_dir, flush=True)
    results = []
    started = time.monotonic()
    try:
        for name, spec, sparse_config in configs:
            results += run_config(args, stubs, name, spec, sparse_config, work_dir, prompts)
    except KeyboardInterrupt:
        print("interrupted; services stopped", file=sys.stderr)
        return 130
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "%s (%s)" % (args.device, device_name(args.device)),
        "model": os.path.abspath(args.model),
        "lengths": args.lengths,
        "prompts": args.prompts,
        "seed": args.seed,
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(table(results, args.lengths))
    print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
