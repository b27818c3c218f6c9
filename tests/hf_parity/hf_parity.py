#!/usr/bin/env python3
"""Checks the CPU reference engine against Hugging Face transformers on the same checkpoint.

For each model shape: writes a random-weight checkpoint with make_checkpoint, runs run_model on a
pseudo-random prompt (logits at every prompt position plus greedy decode steps), runs
transformers in fp32 (eager and sdpa attention) on the same ids, and compares:
  - max relative error per logits row, max|ours - hf| / max|hf|, worst row reported;
  - the greedy tokens, which must be identical.
Writes a JSON result with the device, date and library versions.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

MODELS = [
    # name, make_checkpoint flags. Both use GQA and llama3 rope scaling.
    ("small-gqa-llama3", ["--preset", "small", "--init_std", "0.06"]),
    ("tiny-tied", ["--preset", "tiny", "--tie_embeddings", "--init_std", "0.08", "--vocab", "1000"]),
]


def run_hf(model_dir, prompt, steps, attn, device):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    rows = []
    generated = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        rows.append(out.logits[0].float().cpu().numpy())
        past = out.past_key_values
        for step in range(steps):
            token = int(torch.argmax(out.logits[0, -1]).item())
            generated.append(token)
            if step + 1 == steps:
                break
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0].float().cpu().numpy())
    return np.concatenate(rows, axis=0), generated


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="out/device")
    parser.add_argument("--work", default="/tmp/hf_parity")
    parser.add_argument("--prompt_len", type=int, default=300)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="hf_parity.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_len": args.prompt_len,
        "decode_steps": args.steps,
        "bound_max_rel_error": 1e-3,
        "models": [],
    }
    ok = True
    os.makedirs(args.work, exist_ok=True)
    for name, flags in MODELS:
        model_dir = os.path.join(args.work, name)
        subprocess.run([os.path.join(args.bin, "make_checkpoint"), "--out", model_dir,
                        "--dtype", "float32", "--seed", "11"] + flags, check=True)
        dump = os.path.join(args.work, name + ".logits")
        ours = subprocess.run([os.path.join(args.bin, "run_model"), "--model", model_dir,
                               "--random_prompt", str(args.prompt_len), "--seed", "5",
                               "--decode", str(args.steps), "--dump_logits", dump],
                              check=True, capture_output=True, text=True)
        ours_json = json.loads(ours.stdout)
        vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
        ours_logits = np.fromfile(dump, dtype=np.float32).reshape(-1, vocab)
        # How decisive the greedy picks are: the gap between the two best logits of each row that
        # chose a token, relative to the row's largest |logit|; it must stay well above the error.
        top2 = np.sort(ours_logits[args.prompt_len - 1:], axis=1)[:, -2:]
        margin = (top2[:, 1] - top2[:, 0]) / np.abs(ours_logits[args.prompt_len - 1:]).max(axis=1)
        entry = {"model": name, "flags": flags, "ours_tokens": ours_json["generated"],
                 "min_greedy_margin_rel": float(margin.min())}
        for attn in ("eager", "sdpa"):
            hf_logits, hf_tokens = run_hf(model_dir, ours_json["prompt"], args.steps, attn,
                                          device)
            assert hf_logits.shape == ours_logits.shape, (hf_logits.shape, ours_logits.shape)
            diff = np.abs(ours_logits - hf_logits).max(axis=1)
            scale = np.abs(hf_logits).max(axis=1)
            rel = diff / scale
            n = args.prompt_len
            entry[attn] = {
                "prefill_max_rel_error": float(rel[:n].max()),
                "decode_max_rel_error": float(rel[n:].max()),
                "hf_tokens": hf_tokens,
                "tokens_equal": hf_tokens == ours_json["generated"],
            }
            ok &= entry[attn]["tokens_equal"] and float(rel.max()) < 1e-3
        result["models"].append(entry)
    result["pass"] = bool(ok)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
