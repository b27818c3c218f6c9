#!/usr/bin/env python3
"""Baseline for ttft_bench: Hugging Face transformers (bf16, sdpa attention) on the same
checkpoint, one forward with logits for the last token only, median over repetitions, peak
memory from torch.cuda.max_memory_allocated. Prints one JSON object per length."""
import argparse
import json
import time

import torch
import transformers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--lengths", default="4096,16384,32768,65536,131072")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="sdpa").to("cuda").eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    warm = False
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, vocab, (1, n), generator=generator).to("cuda")
        with torch.no_grad():
            if not warm:
                model(input_ids=ids, logits_to_keep=1)
                warm = True
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            seconds = []
            reps = args.reps if n <= 32768 else 1
            try:
                for _ in range(reps):
                    start = time.perf_counter()
                    out = model(input_ids=ids, logits_to_keep=1)
                    torch.cuda.synchronize()
                    seconds.append(time.perf_counter() - start)
                    del out
            except torch.OutOfMemoryError:
                print(json.dumps({"tokens": n, "error": "out of memory"}), flush=True)
                torch.cuda.empty_cache()
                continue
        seconds.sort()
        print(json.dumps({"tokens": n, "ttft_s": round(seconds[len(seconds) // 2], 4),
                          "reps": reps,
                          "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30,
                                                      3)}), flush=True)


if __name__ == "__main__":
    main()
