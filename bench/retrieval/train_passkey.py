#!/usr/bin/env python3
"""Trains the small Llama that bench/retrieval/eval.py serves: passkey retrieval up to 16K.

Random weights attend almost uniformly, so a sparse pattern cannot lose anything on them; this
model retrieves a key from anywhere in its context, so losing the few keys dense attention
finds shows up as wrong answers. Needs a GPU, torch and transformers (bench/retrieval/README.md).

  python3 bench/retrieval/train_passkey.py --out out/passkey
"""

import argparse
import datetime
import json
import math
import os
import random
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import passkey  # pylint: disable=wrong-import-position


SHAPE = dict(
    vocab_size=passkey.VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=500000.0,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=passkey.BOS, eos_token_id=passkey.EOS)


def build_model():
    config = transformers.LlamaConfig(**SHAPE, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def sample_length(progress, args, rng):
    """Curriculum: the longest length grows geometrically from min_len to max_len over the
    first half of the run; half the batches sit near that cap, half anywhere below it, so
    short prompts are not forgotten."""
    cap = args.min_len * (args.max_len / args.min_len) ** min(1.0, progress / 0.5)
    low = args.min_len if rng.random() < 0.5 else max(args.min_len, cap / 2)
    length = math.exp(rng.uniform(math.log(low), math.log(max(low, cap))))
    return max(args.min_len, int(length) // 64 * 64)


def make_batch(length, args, rng, device):
    """Inputs, targets and loss weights of token_budget // length fresh prompts."""
    rows = []
    for _ in range(max(1, args.token_budget // length)):
        ids, answer = passkey.make_prompt(length, rng.random(), rng.randrange(1000000), rng)
        rows.append(ids + answer + [passkey.EOS])
    seq = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
    weights = torch.ones(seq.shape[0], seq.shape[1] - 1, device=device)
    weights[:, length - 1:] = args.answer_weight  # Predicting the answer and EOS.
    return seq[:, :-1], seq[:, 1:], weights


@torch.no_grad()
def accuracy(model, length, count, seed, device):
    """Greedy exact match of the answer on held-out prompts, teacher forced: all six argmax
    predictions right is the same as greedy decoding producing the answer."""
    prompts = passkey.eval_prompts(length, count, seed)
    per_batch = max(1, 131072 // length)
    correct = 0
    model.eval()
    for start in range(0, count, per_batch):
        chunk = prompts[start:start + per_batch]
        inputs = torch.tensor([ids + answer[:-1] for ids, answer in chunk], device=device)
        answers = torch.tensor([answer for _, answer in chunk], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=inputs, use_cache=False,
                           logits_to_keep=passkey.ANSWER_TOKENS).logits
        correct += (logits.argmax(-1) == answers).all(-1).sum().item()
    model.train()
    return correct / count


def fix_config(out):
    """Writes every field model/checkpoint/config.cc reads into config.json: transformers saves only those
    that differ from LlamaConfig's defaults, and the C++ defaults must never decide the shape."""
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.pop(key, None)
        if rope is not None and rope.get("rope_type", rope.get("type", "default")) != "default":
            raise SystemExit("%s: unexpected %s %r" % (path, key, rope))
    config.update(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama",
                  hidden_act="silu", attention_bias=False, mlp_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": SHAPE["rope_theta"]},
                  dtype="bfloat16", torch_dtype="bfloat16")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--min_len", type=int, default=256)
    parser.add_argument("--max_len", type=int, default=16384)
    parser.add_argument("--token_budget", type=int, default=65536, help="tokens per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--answer_weight", type=float, default=20.0)
    parser.add_argument("--log_every", type=int, default=250)
    parser.add_argument("--eval_lengths", default="1024,4096,16384")
    parser.add_argument("--eval_prompts", type=int, default=16)
    parser.add_argument("--final_prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    eval_lengths = [int(x) for x in args.eval_lengths.split(",")]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)
    torch.set_float32_matmul_precision("high")
    rng = random.Random(args.seed)
    device = torch.device("cuda")
    model = build_model().to(device)  # fp32 master weights; bf16 only inside autocast.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=True)
    budget_s = 60 * args.minutes
    start = time.monotonic()
    step, loss_sum, loss_count, tokens = 0, 0.0, 0, 0
    while step < args.steps and time.monotonic() - start < budget_s:
        # Progress is whichever limit is nearer, so the curriculum and the schedule finish.
        progress = max(step / args.steps, (time.monotonic() - start) / budget_s)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        length = sample_length(progress, args, rng)
        inputs, targets, weights = make_batch(length, args, rng, device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=inputs, use_cache=False).logits
        losses = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        loss = (losses * weights.flatten()).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_sum += loss.item()
        loss_count += 1
        tokens += inputs.numel()
        if step % args.log_every == 0:
            record = {"step": step, "loss": round(loss_sum / loss_count, 4), "lr": lr,
                      "length": length, "seconds": round(time.monotonic() - start, 1),
                      "tokens_per_s": round(tokens / (time.monotonic() - start))}
            for n in eval_lengths:
                record["acc_%d" % n] = accuracy(model, n, args.eval_prompts, args.seed + 1000,
                                                device)
            print(json.dumps(record), flush=True)
            loss_sum, loss_count = 0.0, 0
    seconds = time.monotonic() - start
    final = {str(n): accuracy(model, n, args.final_prompts, args.seed + 2000, device)
             for n in eval_lengths}
    print(json.dumps({"final_accuracy": final, "steps": step, "seconds": round(seconds, 1)}))
    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16)
    try:
        model.save_pretrained(args.out, safe_serialization=True)
    except TypeError:  # Releases where safetensors is the only format drop the argument.
        model.save_pretrained(args.out)
    passkey.write_tokenizer(args.out)
    fix_config(args.out)
    weights_path = os.path.join(args.out, "model.safetensors")
    size = os.path.getsize(weights_path)
    if size > 6 << 20:
        raise SystemExit("%s is %d bytes, more than the 6 MiB meant for it" % (weights_path, size))
    log = {"final_accuracy": final, "final_prompts": args.final_prompts, "steps": step,
           "seconds": round(seconds, 1), "tokens": tokens, "args": vars(args),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0), "model_bytes": size,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
