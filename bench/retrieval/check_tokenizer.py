#!/usr/bin/python3
"""Checks that the tokenizer.json of passkey.write_tokenizer gives passkey.encode's ids in C++.

A text prompt sent to the decode service is encoded by model/text/tokenizer.cc, while training and
eval.py use passkey.encode; a mismatch would silently change every prompt, so this compares
the two on passkey prompts and on text with multi-byte characters and whitespace runs.

  bazel build //bench/retrieval:encode_text
  /usr/bin/python3 bench/retrieval/check_tokenizer.py
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import passkey  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def texts():
    """Passkey prompts of several lengths and depths, then harder text for the byte mapping."""
    rng = random.Random(7)
    for num_tokens, depth in ((128, 0.0), (1024, 0.3), (4096, 1.0), (16384, 0.77)):
        yield passkey.prompt_text(num_tokens, depth, rng.randrange(1000000), rng)
    yield "  leading, trailing  \n\n\t tabs\r\nand runs     of spaces   "
    yield "caf\u00e9 \u00ad soft hyphen, \u4e2d\u6587, \U0001F600, \u0000 and \u007f controls"
    yield "it's 123456789 o'clock, isn't it? The pass key is 000042."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--encode_text",
                        default=os.path.join(ROOT, "bazel-bin/bench/retrieval/encode_text"))
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="passkey_tokenizer_") as directory:
        passkey.write_tokenizer(directory)
        for i, text in enumerate(texts()):
            run = subprocess.run([args.encode_text, directory], input=text.encode("utf-8"),
                                 capture_output=True, check=False)
            if run.returncode != 0:
                print("text %d: encode_text failed: %s" % (i, run.stderr.decode().strip()))
                failures += 1
                continue
            ours = [int(x) for x in run.stdout.decode().strip().split(",")]
            expected = passkey.encode(text)
            same = ours == expected
            failures += not same
            print("text %d: %d ids, %s (%s)" % (i, len(expected), "same" if same else "DIFFERENT",
                                               run.stderr.decode().strip()))
    print("%s" % ("all ids equal" if failures == 0 else "%d texts differ" % failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
